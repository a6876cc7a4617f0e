"""The dead-letter queue: list it without consuming, replay it to the main queue in order, purge it.

What is in the DLQ (see ``shared/envelope.py``):
- events the consumer dead-lettered: the 6 envelope attributes plus ``error_class``,
  ``error_message``, ``failed_at`` and ``original_group_id``;
- events SQS moved by itself after ``maxReceiveCount`` receives: the envelope attributes only;
- anything else someone put there: listed, never replayed.

Listing and replay receive with a visibility timeout and hold what they do not delete until they are
done, then set its visibility back to 0. Holding is what lets them page through a FIFO queue (held
groups are skipped by later receives) and what keeps each issue's order: while one message of a group
is held, SQS hands out no later message of that group. The DLQ has no redrive policy, so receiving
from it moves nothing; it only adds to ``ApproximateReceiveCount``.

Replay reads each event's routing attributes (event type, issue id, event time) again from its body
with this version's rules (:func:`rerouted`): another version's receiver may have read an edge-case
body differently, and the consumer refuses attributes that disagree with the body, so copies of the
old ones would come straight back. A body that no longer routes stays in the DLQ, with the reason.

Replay sends first and deletes from the DLQ only after SQS stored the copy, the pair under
:func:`asyncio.shield`. A crash or failure between the two leaves the event in both queues: the
duplicate is harmless (the consumer's version guard makes the second application a no-op), a loss
is impossible.

Every SQS call here is given up after ``call_timeout_s`` (PROMPT_CALL_TIMEOUT_S, 10 s) without an
answer, botocore's retries included: against an SQS that takes a call and never answers, botocore
alone waits minutes, and a stop signal waits for the shielded pair. A send given up has an unknown
outcome, so its messages stay in the DLQ (a second copy in the main queue is harmless: the same
deduplication id within SQS's 5 minutes, the same delivery id for the consumer after), and replay
stops; so it does after a delete given up, whose messages were sent and may still be in the DLQ.

A call that fails after it may have reached SQS (its answer lost: a read timeout, a connection
closed or reset mid-answer, a 5xx; ``sqs_requests.maybe_done`` decides) has an unknown outcome too,
and is reported as such, not as "not sent" or "still in the dead-letter queue": those are said only
when SQS answered with a refusal or no connection to SQS was made.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import structlog
from botocore.exceptions import ClientError

from shared import strict_json
from shared.aws import error_code
from shared.envelope import (
    ATTR_DELIVERY_ID,
    ATTR_ERROR_CLASS,
    ATTR_ERROR_MESSAGE,
    ATTR_EVENT_TS,
    ATTR_EVENT_TYPE,
    ATTR_FAILED_AT,
    ATTR_ISSUE_ID,
    ATTR_ORIGINAL_GROUP_ID,
    Envelope,
    InvalidEnvelope,
    read_attribute,
)
from shared.jira_event import Ignored, InvalidEvent, route
from shared.queue_depth import make_visible, read_counts
from shared.settings import QueueSettings
from shared.shutdown import finish_then_cancel
from shared.sqs_batch import send_entries
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S, SQS_ERRORS, counted, describe, maybe_done

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import DeleteMessageBatchRequestEntryTypeDef

log = structlog.get_logger()

# How long listing and replay hold received messages before they would reappear by themselves.
LIST_HOLD_S = 60
REPLAY_HOLD_S = 300
# Messages per receive, SQS's maximum. On a FIFO queue, also the most of one issue's messages a reader
# that holds what it received (a listing, a dry run) can see: SQS hands out no more of that group.
RECEIVE_BATCH = 10
# Long-poll briefly: a short poll samples a subset of SQS servers and may come back empty too early.
RECEIVE_WAIT_S = 1

MAX_RECEIVE_REASON = "exceeded maxReceiveCount"
NOT_ENVELOPE_REASON = "not a jiralake envelope"
EARLIER_FAILED_REASON = "an earlier event of this issue failed to replay"
# The consumer dead-letters an event that still cannot be applied under a new message id: met again,
# it is left in the DLQ, or a replay whose fix did not work would send it round for ever.
REPLAYED_AGAIN_REASON = (
    "this event was already replayed in this run and is back in the DLQ (it failed again, or this is "
    "a second copy); left in the DLQ"
)
# Why a second copy of a replayed event is harmless: replay's deduplication id is the DLQ message's,
# so SQS drops a copy sent again within its 5-minute window, and the consumer skips a delivery id it
# has already applied (and its version guard any older event).
HARMLESS = "which is harmless (SQS drops a second copy within 5 minutes, the consumer skips it after)"
# A send given up without an answer, or whose answer was lost: SQS may have stored the copy.
MAYBE_SENT = "it stays in the dead-letter queue and may be in the main queue as well (harmless)"
# A delete from the dead-letter queue given up without an answer, or whose answer was lost.
MAYBE_DELETED = "it may still be there, and a later replay sends it again, which is harmless"


@dataclass(frozen=True)
class DeadLetter:
    """One message in the DLQ, as far as its attributes tell."""

    message_id: str
    receipt_handle: str
    # The group to replay into: ``original_group_id`` when the consumer set it, else the message's own.
    group_id: str | None
    issue_id: str | None
    event_type: str | None
    event_ts_ms: int | None
    delivery_id: str | None
    error_class: str | None
    error_message: str | None
    failed_at: str | None
    receive_count: int
    sent_ms: int | None
    body_bytes: int
    # None when the message lacks the envelope attributes (it can be listed, not replayed).
    envelope: Envelope | None

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> DeadLetter:
        system = message.get("Attributes") or {}
        try:
            envelope: Envelope | None = Envelope.from_message(message)
        except InvalidEnvelope:
            envelope = None
        body = message.get("Body") or ""
        return cls(
            message_id=message["MessageId"],
            receipt_handle=message["ReceiptHandle"],
            group_id=_original_group(message),
            issue_id=read_attribute(message, ATTR_ISSUE_ID),
            event_type=read_attribute(message, ATTR_EVENT_TYPE),
            event_ts_ms=_int_or_none(read_attribute(message, ATTR_EVENT_TS)),
            delivery_id=read_attribute(message, ATTR_DELIVERY_ID),
            error_class=read_attribute(message, ATTR_ERROR_CLASS),
            error_message=read_attribute(message, ATTR_ERROR_MESSAGE),
            failed_at=read_attribute(message, ATTR_FAILED_AT),
            receive_count=_int_or_none(system.get("ApproximateReceiveCount")) or 0,
            sent_ms=_int_or_none(system.get("SentTimestamp")),
            body_bytes=len(body.encode("utf-8")),
            envelope=envelope,
        )

    @property
    def reason(self) -> str:
        """Why it is here: the consumer's error, SQS's redrive, or "not a jiralake envelope"."""
        if self.error_class:
            return f"{self.error_class}: {self.error_message or ''}".rstrip(": ")
        if self.envelope is None:
            return NOT_ENVELOPE_REASON
        return MAX_RECEIVE_REASON

    def replay_entry(self, entry_id: str) -> dict[str, Any]:
        """A ``SendMessageBatch`` entry for the main queue: the original body and group, only the 6
        envelope attributes (a second dead-lettering must fit in 10) and a new deduplication id.

        The new id is derived from this DLQ message's id: the original one may still be inside
        SQS's 5-minute deduplication window and the replay would be dropped silently. Only a second
        replay of this same DLQ message, whose first copy SQS already stored, can be deduplicated.
        """
        if self.envelope is None:
            raise InvalidEnvelope(f"message {self.message_id} is not a jiralake envelope")
        entry = self.envelope.send_entry(entry_id, dedup_id=f"replay-{self.message_id}")
        entry["MessageGroupId"] = self.group_id or self.envelope.group_id
        return entry

    def rerouted(self) -> DeadLetter | str:
        """This event with its routing attributes read again from its body (and its issue's group with
        them when that moved), or why its body no longer routes. See the module's docstring."""
        assert self.envelope is not None
        try:
            routed = route(strict_json.loads(self.envelope.body))
        except (ValueError, InvalidEvent) as exc:
            return f"its body no longer routes: {exc}"
        if isinstance(routed, Ignored):
            return f"its body is a {routed.event_type[:80]!r} event, which concerns no issue"
        envelope = replace(
            self.envelope,
            event_type=routed.event_type,
            issue_id=routed.issue_id,
            # A body without a time of its own keeps the time its receiver gave it.
            event_ts_ms=self.envelope.event_ts_ms if routed.event_ts_ms is None else routed.event_ts_ms,
        )
        group_id = routed.issue_id if self.group_id in (None, self.envelope.group_id) else self.group_id
        return replace(self, envelope=envelope, group_id=group_id)

    def matches_issue(self, issue_id: str) -> bool:
        """Whether this event concerns ``issue_id`` (a numeric Jira id), by its issue id as stored or
        its group, compared as numbers: an older receiver kept an id's leading zeros (``0010040``)."""
        stored = self.issue_id or self.group_id
        if stored is None or not (stored.isascii() and stored.isdigit()):
            return stored == issue_id
        return stored.lstrip("0") == issue_id.lstrip("0")

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "issue_id": self.issue_id,
            "group_id": self.group_id,
            "event_type": self.event_type,
            "event_time": _iso_ms(self.event_ts_ms),
            "delivery_id": self.delivery_id,
            "reason": self.reason,
            "error_class": self.error_class,
            "error_message": self.error_message,
            "failed_at": self.failed_at,
            "receive_count": self.receive_count,
            "sent_at": _iso_ms(self.sent_ms),
            "body_bytes": self.body_bytes,
            "replayable": self.envelope is not None,
        }


async def _receive(
    sqs: SQSClient, url: str, *, hold_s: int, wait_s: int, timeout_s: float
) -> list[dict[str, Any]]:
    resp = await counted(
        "ReceiveMessage",
        sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=RECEIVE_BATCH,
            VisibilityTimeout=hold_s,
            WaitTimeSeconds=wait_s,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            # FIFO: botocore's retry of a receive whose answer was lost reuses the id and gets the same
            # messages back, instead of finding them hidden for hold_s and reading that as an empty queue.
            ReceiveRequestAttemptId=uuid.uuid4().hex,
        ),
        timeout_s=timeout_s,
    )
    return [dict(m) for m in resp.get("Messages", [])]


def _duration(seconds: int) -> str:
    """``5 minutes`` for 300, ``45 s`` for 45."""
    return f"{seconds // 60} minutes" if seconds % 60 == 0 and seconds >= 120 else f"{seconds} s"


async def list_dead_letters(
    sqs: SQSClient,
    dlq_url: str,
    *,
    limit: int,
    hold_s: int = LIST_HOLD_S,
    wait_s: int = RECEIVE_WAIT_S,
    stop: asyncio.Event | None = None,
    call_timeout_s: float = PROMPT_CALL_TIMEOUT_S,
) -> list[DeadLetter]:
    """Up to ``limit`` DLQ messages in FIFO order per issue, left in the queue (visible again at once).

    While listing, the listed messages and their issues' later messages are hidden from other readers.
    ``stop`` ends the listing between receives (what was listed is still made visible and returned).
    A receive without an answer within ``call_timeout_s`` raises :class:`TimeoutError` (after the
    release of what was held).
    """
    listed: dict[str, DeadLetter] = {}
    held: list[str] = []
    try:
        while len(listed) < limit and not _stopping(stop):
            batch = await _receive(sqs, dlq_url, hold_s=hold_s, wait_s=wait_s, timeout_s=call_timeout_s)
            if not batch:
                break
            wrapped = False
            for message in batch:
                held.append(message["ReceiptHandle"])
                # Seen again: the hold ran out during a long listing and we came round; stop there.
                wrapped = wrapped or message["MessageId"] in listed
                if not wrapped and len(listed) < limit:
                    listed[message["MessageId"]] = DeadLetter.from_message(message)
            if wrapped:
                break
    finally:
        await finish_then_cancel(make_visible(sqs, dlq_url, held), name="dlq-release")
    return list(listed.values())


Outcome = Literal["replayed", "would_replay", "skipped", "failed"]


@dataclass(frozen=True)
class ReplayResult:
    message_id: str
    issue_id: str | None
    event_type: str | None
    outcome: Outcome
    reason: str | None = None
    # SQS's answer to its send or delete was lost (or never came): it may be in both queues.
    in_doubt: bool = False


@dataclass
class ReplaySummary:
    dry_run: bool
    results: list[ReplayResult] = field(default_factory=list)
    # Messages of other issues seen (and left in place) when replaying one issue.
    other_issues: int = 0
    # Why the replay stopped before the DLQ was exhausted (SQS unreachable), if it did.
    stopped: str | None = None

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def replayed(self) -> int:
        return self.count("would_replay" if self.dry_run else "replayed")

    @property
    def skipped(self) -> int:
        return self.count("skipped")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def in_doubt(self) -> int:
        """Failed messages that may be in both queues: SQS's answer to their send or delete was lost."""
        return sum(1 for r in self.results if r.in_doubt)

    def add(
        self, letter: DeadLetter, outcome: Outcome, reason: str | None = None, *, in_doubt: bool = False
    ) -> None:
        self.results.append(
            ReplayResult(letter.message_id, letter.issue_id, letter.event_type, outcome, reason, in_doubt)
        )
        log.info(
            "dlq_replay",
            outcome=outcome,
            message_id=letter.message_id,
            issue_id=letter.issue_id,
            event_type=letter.event_type,
            reason=reason,
        )


async def replay_dead_letters(
    sqs: SQSClient,
    queues: QueueSettings,
    *,
    limit: int | None = None,
    issue_id: str | None = None,
    dry_run: bool = False,
    hold_s: int = REPLAY_HOLD_S,
    wait_s: int = RECEIVE_WAIT_S,
    stop: asyncio.Event | None = None,
    call_timeout_s: float = PROMPT_CALL_TIMEOUT_S,
) -> ReplaySummary:
    """Move up to ``limit`` DLQ messages (only ``issue_id``'s when given) back to the main queue in
    their original order per issue. Nothing changes with ``dry_run``.

    Per issue, a failed send stops that issue for this run (its later events stay in the DLQ, so
    order holds). ``stop`` ends the replay between batches (a batch's send-then-delete always
    finishes, each call within ``call_timeout_s``). A call without an answer within
    ``call_timeout_s`` stops the replay (``summary.stopped`` says which and what it means).
    Everything not moved is made visible again at the end.
    """
    summary = ReplaySummary(dry_run=dry_run)
    held: dict[str, str] = {}  # message id -> its latest receipt handle
    seen: set[str] = set()
    sent_deliveries: set[str] = set()  # delivery ids sent back to the main queue in this run
    failed_groups: set[str | None] = set()

    def attempted() -> int:
        return summary.replayed + summary.failed

    try:
        while (limit is None or attempted() < limit) and not _stopping(stop) and summary.stopped is None:
            try:
                received = await _receive(
                    sqs, queues.dlq_url, hold_s=hold_s, wait_s=wait_s, timeout_s=call_timeout_s
                )
            except SQS_ERRORS as exc:
                failure = describe(exc)
                summary.stopped = f"cannot receive from the dead-letter queue: {failure}"
                if isinstance(exc, TimeoutError):
                    summary.stopped += (
                        f" (what SQS may have handed out is visible again within {_duration(hold_s)})"
                    )
                log.warning("dlq_replay_stopped", reason=summary.stopped)
                break
            batch = [DeadLetter.from_message(m) for m in received]
            if not batch:
                break
            to_send: list[DeadLetter] = []
            for letter in batch:
                if letter.message_id in seen:
                    # Held before, and the hold ran out during a long replay: SQS hands such a message
                    # out again before the ones not yet read. This receive holds it again; go on, to
                    # the receive that finds nothing left (stopping here would leave the rest unread).
                    held[letter.message_id] = letter.receipt_handle
                    continue
                seen.add(letter.message_id)
                if issue_id is not None and not letter.matches_issue(issue_id):
                    summary.other_issues += 1
                    held[letter.message_id] = letter.receipt_handle
                elif limit is not None and attempted() + len(to_send) >= limit:
                    held[letter.message_id] = letter.receipt_handle
                elif letter.envelope is None:
                    summary.add(letter, "skipped", NOT_ENVELOPE_REASON)
                    held[letter.message_id] = letter.receipt_handle
                elif isinstance(rerouted := letter.rerouted(), str):
                    summary.add(letter, "skipped", rerouted)
                    held[letter.message_id] = letter.receipt_handle
                elif rerouted.group_id in failed_groups:
                    summary.add(letter, "skipped", EARLIER_FAILED_REASON)
                    held[letter.message_id] = letter.receipt_handle
                elif letter.envelope.delivery_id in sent_deliveries:
                    summary.add(letter, "failed", REPLAYED_AGAIN_REASON)
                    failed_groups.add(rerouted.group_id)  # its issue's later events stay behind it
                    held[letter.message_id] = letter.receipt_handle
                elif dry_run:
                    sent_deliveries.add(letter.envelope.delivery_id)  # as the replay would
                    summary.add(letter, "would_replay")
                    held[letter.message_id] = letter.receipt_handle
                else:
                    sent_deliveries.add(letter.envelope.delivery_id)
                    to_send.append(rerouted)
            if to_send:
                await finish_then_cancel(
                    _send_then_delete(sqs, queues, to_send, summary, failed_groups, held, call_timeout_s),
                    name="dlq-replay-step",
                )
                if summary.stopped:
                    log.warning("dlq_replay_stopped", reason=summary.stopped)
    finally:
        await finish_then_cancel(make_visible(sqs, queues.dlq_url, list(held.values())), name="dlq-release")
    return summary


def _stopping(stop: asyncio.Event | None) -> bool:
    return stop is not None and stop.is_set()


async def _send_then_delete(
    sqs: SQSClient,
    queues: QueueSettings,
    letters: Sequence[DeadLetter],
    summary: ReplaySummary,
    failed_groups: set[str | None],
    held: dict[str, str],
    call_timeout_s: float,
) -> None:
    """One batch: send, then delete what SQS stored. When the batch takes several calls (over 1 MiB)
    and one fails, the issue's later events are held back (send_entries), so order holds. Within one
    call SQS may refuse one entry and store the next one of the same issue; the older event then
    arrives after the newer one, which the consumer's version guard turns into a no-op (no
    regression). A send or delete without an answer within ``call_timeout_s`` sets
    ``summary.stopped``."""
    results = await send_entries(
        sqs,
        queues.queue_url,
        [letter.replay_entry(str(i)) for i, letter in enumerate(letters)],
        timeout_s=call_timeout_s,
    )
    sent: list[DeadLetter] = []
    unanswered = 0
    for letter, result in zip(letters, results, strict=True):
        if result.ok:
            sent.append(letter)
        elif result.held_back:
            held[letter.message_id] = letter.receipt_handle
            summary.add(letter, "skipped", EARLIER_FAILED_REASON)
        elif result.unanswered:
            # SQS may have stored it: it stays in the DLQ, and its issue's later events behind it.
            unanswered += 1
            failed_groups.add(letter.group_id)
            held[letter.message_id] = letter.receipt_handle
            summary.add(letter, "failed", f"{result.error}: {MAYBE_SENT}", in_doubt=True)
        elif result.maybe_stored:
            # The call may have reached SQS and its answer been lost: the same as unanswered, for this
            # message; SQS did answer (or fail) promptly, so the replay goes on with other issues.
            failed_groups.add(letter.group_id)
            held[letter.message_id] = letter.receipt_handle
            summary.add(letter, "failed", f"outcome unknown ({result.error}): {MAYBE_SENT}", in_doubt=True)
        else:
            # SQS refused it, or the call never reached SQS: certainly not in the main queue.
            failed_groups.add(letter.group_id)
            held[letter.message_id] = letter.receipt_handle
            summary.add(letter, "failed", f"not sent: {result.error}")
    if unanswered:
        summary.stopped = (
            f"SQS did not answer SendMessageBatch within {call_timeout_s:g} s; the {unanswered} message(s) "
            f"it carried stay in the dead-letter queue and may be in the main queue as well, {HARMLESS}; "
            "run the same command again"
        )
    if not sent:
        return
    not_deleted, delete_unanswered, maybe_deleted = await _delete(sqs, queues.dlq_url, sent, call_timeout_s)
    for letter in sent:
        if letter.message_id in not_deleted:
            held[letter.message_id] = letter.receipt_handle
            error = not_deleted[letter.message_id]
            if delete_unanswered:
                reason = f"sent, but its delete from the dead-letter queue got {error}: {MAYBE_DELETED}"
            elif maybe_deleted:
                reason = (
                    f"sent, but its delete from the dead-letter queue has an unknown outcome ({error}): "
                    f"{MAYBE_DELETED}"
                )
            else:  # SQS answered that it did not delete it, or the call never reached SQS
                reason = (
                    f"sent, but still in the dead-letter queue ({error}); a later replay sends it again, "
                    "which is harmless"
                )
            summary.add(letter, "failed", reason, in_doubt=maybe_deleted)
        else:
            summary.add(letter, "replayed")
    if delete_unanswered and summary.stopped is None:
        summary.stopped = (
            f"SQS did not answer DeleteMessageBatch within {call_timeout_s:g} s; the {len(sent)} message(s) "
            "it was deleting are in the main queue and may still be in the dead-letter queue, so a later "
            f"replay may send them again, {HARMLESS}"
        )


async def _delete(
    sqs: SQSClient, dlq_url: str, letters: Sequence[DeadLetter], timeout_s: float
) -> tuple[dict[str, str], bool, bool]:
    """Delete from the DLQ; returns message id -> reason for those that were not (or maybe not)
    deleted, whether the call went unanswered, and whether SQS may have deleted them all the same
    (unanswered, or its answer lost: sqs_requests.maybe_done)."""
    entries: list[DeleteMessageBatchRequestEntryTypeDef] = [
        {"Id": str(i), "ReceiptHandle": letter.receipt_handle} for i, letter in enumerate(letters)
    ]
    try:
        resp = await counted(
            "DeleteMessageBatch",
            sqs.delete_message_batch(QueueUrl=dlq_url, Entries=entries),
            timeout_s=timeout_s,
        )
    except SQS_ERRORS as exc:
        reason = describe(exc)
        unanswered = isinstance(exc, TimeoutError)
        return {letter.message_id: reason for letter in letters}, unanswered, unanswered or maybe_done(exc)
    failed = {
        f["Id"]: f"{f.get('Code', 'Unknown')}: {f.get('Message', '')}".strip() for f in resp.get("Failed", [])
    }
    return {letters[int(i)].message_id: reason for i, reason in failed.items()}, False, False


# SQS's refusal of a purge within 60 s of the last one, by its query-compatible code and its JSON type.
_PURGE_IN_PROGRESS = frozenset(("AWS.SimpleQueueService.PurgeQueueInProgress", "PurgeQueueInProgress"))


@dataclass(frozen=True)
class PurgeResult:
    approximate_messages: int  # what the DLQ held just before
    # SQS refused the purge as one already under way (it takes one per queue per 60 s): a purge run
    # a moment ago, or this one's own request, retried by botocore after SQS's answer was lost.
    already_under_way: bool = False
    # SQS did not answer the purge within the call timeout: whether it purged is unknown.
    unanswered: bool = False


async def purge_dead_letters(
    sqs: SQSClient, dlq_url: str, *, call_timeout_s: float = PROMPT_CALL_TIMEOUT_S
) -> PurgeResult:
    """Delete everything in the DLQ for good. Reading its count without an answer within
    ``call_timeout_s`` raises :class:`TimeoutError` (nothing purged); the purge itself is then
    ``unanswered``."""
    counts = await read_counts(sqs, dlq_url, timeout_s=call_timeout_s)
    try:
        await counted("PurgeQueue", sqs.purge_queue(QueueUrl=dlq_url), timeout_s=call_timeout_s)
    except TimeoutError:
        log.warning("dlq_purge_unanswered", dlq_url=dlq_url, approximate_messages=counts.total)
        return PurgeResult(counts.total, unanswered=True)
    except ClientError as exc:
        if error_code(exc) not in _PURGE_IN_PROGRESS:
            raise
        log.warning("dlq_purge_already_under_way", dlq_url=dlq_url, approximate_messages=counts.total)
        return PurgeResult(counts.total, already_under_way=True)
    log.warning("dlq_purged", dlq_url=dlq_url, approximate_messages=counts.total)
    return PurgeResult(counts.total)


def _original_group(message: Mapping[str, Any]) -> str | None:
    """The consumer's ``original_group_id`` ("-" when the message had none), else the DLQ message's group."""
    original = read_attribute(message, ATTR_ORIGINAL_GROUP_ID)
    if original and original != "-":
        return original
    group = (message.get("Attributes") or {}).get("MessageGroupId")
    return str(group) if group else None


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _iso_ms(ms: int | None) -> str | None:
    """ISO 8601 in UTC; the number itself when it is no time (often why the event was dead-lettered)."""
    if ms is None:
        return None
    try:
        when = datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
