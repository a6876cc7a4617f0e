"""How deep the SQS queues are: visible, in flight and delayed messages (``GetQueueAttributes``), and
the age of the oldest message where it can be known without consuming anything; plus the periodic
poller that publishes them as ``jiralake_queue_messages`` / ``jiralake_queue_oldest_message_age_seconds``.

Oldest age:
- An empty queue's oldest age is 0.
- The main queue is never peeked: a receive there counts toward its ``maxReceiveCount``, so enough
  peeks would send healthy events to the dead-letter queue. Its age is "unknown" here; CloudWatch's
  ``ApproximateAgeOfOldestMessage`` has it.
- The dead-letter queue has no redrive policy, so a peek (receive with a short visibility timeout,
  then visibility back to 0 at once) moves nothing. It adds one to the peeked messages'
  ``ApproximateReceiveCount`` and hides their FIFO groups for the few milliseconds in between.
  The age is that of the oldest ``SentTimestamp`` among the (up to 10) messages one receive returns:
  exact while the queue holds at most 10 issues' worth of heads, a lower bound beyond that.
- A queue with a redrive policy is never peeked, whatever the caller asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from shared.aws import error_code, sqs_client
from shared.metrics import QUEUE_DEPTH_READ, QUEUE_MESSAGES, QUEUE_OLDEST_AGE_SECONDS
from shared.settings import AwsSettings, QueueSettings
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S, SQS_ERRORS, counted, describe

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import ChangeMessageVisibilityBatchRequestEntryTypeDef

log = structlog.get_logger()

# The ``queue`` label values of the gauges, and the ``state`` label values.
MAIN_QUEUE = "main"
DEAD_LETTER_QUEUE = "dlq"
STATES = ("visible", "in_flight", "delayed")  # also QueueDepth's attribute names

# Visibility of peeked messages between the receive and the reset to 0 (only matters if we crash).
PEEK_HOLD_S = 30
# One ChangeMessageVisibilityBatch of make_visible answers within this long or its messages are left to
# reappear by themselves.
RELEASE_CALL_TIMEOUT_S = PROMPT_CALL_TIMEOUT_S
# Long-poll briefly so a peek queries every SQS server, not a sample (short polling may miss).
PEEK_WAIT_S = 1
# The poller re-peeks the dead-letter queue when a message left it, else at least this often.
REPEEK_EVERY_S = 300.0
# A peek the role may not make (AccessDenied) is asked again this much later: often enough to notice
# a grant restored (IAM changes take a while to apply everywhere), seldom enough that the refusals do
# not count toward the SQS error alert.
DENIED_REPEEK_S = 3600.0


@dataclass(frozen=True)
class QueueCounts:
    visible: int
    in_flight: int
    delayed: int
    # A queue with a redrive policy is a source queue: receiving from it counts toward maxReceiveCount.
    has_redrive_policy: bool

    @property
    def total(self) -> int:
        return self.visible + self.in_flight + self.delayed


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    url: str
    visible: int
    in_flight: int
    delayed: int
    # None: cannot be known without consuming (the main queue while it is not empty).
    oldest_age_s: float | None

    @property
    def total(self) -> int:
        return self.visible + self.in_flight + self.delayed

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "url": self.url,
            "visible": self.visible,
            "in_flight": self.in_flight,
            "delayed": self.delayed,
            "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 3),
        }


def queue_urls(settings: QueueSettings) -> dict[str, str]:
    """The ``queue`` label -> URL mapping every process uses for the depth gauges."""
    return {MAIN_QUEUE: settings.queue_url, DEAD_LETTER_QUEUE: settings.dlq_url}


# What SQS answers a receive the role may not make: the IAM refusal, and the refusal of the queue's
# KMS key (a dead-letter queue encrypted with a key whose policy leaves the role out), which botocore
# reads from SQS's query-compatible error header or, without it, from the JSON error's type.
_DENIED_CODES = frozenset(
    ("AccessDenied", "AccessDeniedException", "KMS.AccessDeniedException", "KmsAccessDenied")
)


def _access_denied(exc: BaseException) -> bool:
    return error_code(exc) in _DENIED_CODES


async def read_counts(sqs: SQSClient, url: str, *, timeout_s: float | None = None) -> QueueCounts:
    """The queue's counts; past ``timeout_s`` (None: botocore's own limits) :class:`TimeoutError`."""
    resp = await counted(
        "GetQueueAttributes",
        sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
                "RedrivePolicy",
            ],
        ),
        timeout_s=timeout_s,
    )
    attrs = resp.get("Attributes", {})
    return QueueCounts(
        visible=int(attrs.get("ApproximateNumberOfMessages", 0)),
        in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
        delayed=int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
        has_redrive_policy=bool(attrs.get("RedrivePolicy")),
    )


async def make_visible(sqs: SQSClient, url: str, receipt_handles: Sequence[str]) -> int:
    """Set the visibility of received messages back to 0; returns how many could not be reset.

    A message that could not be reset (its receipt handle expired, the call failed) reappears by
    itself when the visibility timeout it was received with runs out. The calls (10 messages each) go
    out at once, each given up after RELEASE_CALL_TIMEOUT_S: against an SQS that takes them and never
    answers, one after another with botocore's retries, a stopping replay held its messages for minutes.
    """
    chunks = [receipt_handles[start : start + 10] for start in range(0, len(receipt_handles), 10)]
    return sum(await asyncio.gather(*(_reset_visibility(sqs, url, chunk) for chunk in chunks)))


async def _reset_visibility(sqs: SQSClient, url: str, chunk: Sequence[str]) -> int:
    entries: list[ChangeMessageVisibilityBatchRequestEntryTypeDef] = [
        {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0} for i, h in enumerate(chunk)
    ]
    try:
        resp = await counted(
            "ChangeMessageVisibilityBatch",
            sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries),
            timeout_s=RELEASE_CALL_TIMEOUT_S,
        )
    except SQS_ERRORS as exc:
        error = (
            f"no answer within {RELEASE_CALL_TIMEOUT_S:g} s"
            if isinstance(exc, TimeoutError)
            else describe(exc)
        )
        log.warning("visibility_reset_failed", queue_url=url, count=len(chunk), error=error)
        return len(chunk)
    failed = resp.get("Failed", [])
    if failed:
        log.warning(
            "visibility_reset_failed",
            queue_url=url,
            count=len(failed),
            error=f"{failed[0].get('Code')}: {failed[0].get('Message', '')}",
        )
    return len(failed)


async def peek_oldest_sent_ms(sqs: SQSClient, url: str, *, timeout_s: float | None = None) -> int | None:
    """The oldest ``SentTimestamp`` (ms) among the messages one receive returns, visibility reset at
    once; past ``timeout_s`` (None: botocore's own limits) :class:`TimeoutError`. Never call this on
    a queue with a redrive policy (see the module docstring)."""
    resp = await counted(
        "ReceiveMessage",
        sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=PEEK_HOLD_S,
            WaitTimeSeconds=PEEK_WAIT_S,
            MessageSystemAttributeNames=["SentTimestamp"],
            # A retry after a lost answer gets the same messages back, not the younger ones behind them.
            ReceiveRequestAttemptId=uuid.uuid4().hex,
        ),
        timeout_s=timeout_s,
    )
    messages = resp.get("Messages", [])
    try:
        sent = [int(m["Attributes"]["SentTimestamp"]) for m in messages if "SentTimestamp" in m["Attributes"]]
        return min(sent) if sent else None
    finally:
        await asyncio.shield(make_visible(sqs, url, [m["ReceiptHandle"] for m in messages]))


async def read_depth(
    sqs: SQSClient,
    queue: str,
    url: str,
    *,
    peek_oldest: bool,
    now_s: Callable[[], float] = time.time,
    timeout_s: float | None = None,
) -> QueueDepth:
    """Counts for one queue and its oldest age: 0 when empty, from a peek when ``peek_oldest`` and
    the queue has no redrive policy, else None (unknown). Each call is given up after ``timeout_s``
    (None: botocore's own limits): the counts' then raises :class:`TimeoutError`, the peek's leaves
    the age unknown."""
    counts = await read_counts(sqs, url, timeout_s=timeout_s)
    oldest: float | None = None
    if counts.total == 0:
        oldest = 0.0
    elif peek_oldest and not counts.has_redrive_policy and counts.visible > 0:
        try:
            sent_ms = await peek_oldest_sent_ms(sqs, url, timeout_s=timeout_s)
        except SQS_ERRORS as exc:
            # The counts are read, and the thresholds need only them: the age stays unknown.
            log.warning("queue_oldest_age_unavailable", queue=queue, error=describe(exc))
            sent_ms = None
        if sent_ms is not None:
            oldest = max(0.0, now_s() - sent_ms / 1000)
    return _depth(queue, url, counts, oldest)


def _depth(queue: str, url: str, counts: QueueCounts, oldest_age_s: float | None) -> QueueDepth:
    return QueueDepth(
        queue=queue,
        url=url,
        visible=counts.visible,
        in_flight=counts.in_flight,
        delayed=counts.delayed,
        oldest_age_s=oldest_age_s,
    )


def publish(depth: QueueDepth) -> None:
    """Set the gauges for one queue; an unknown age removes the age series rather than leave it stale."""
    for state in STATES:
        QUEUE_MESSAGES.labels(depth.queue, state).set(getattr(depth, state))
    if depth.oldest_age_s is None:
        with contextlib.suppress(KeyError):
            QUEUE_OLDEST_AGE_SECONDS.remove(depth.queue)
    else:
        QUEUE_OLDEST_AGE_SECONDS.labels(depth.queue).set(depth.oldest_age_s)


@dataclass
class _Peeked:
    total: int
    oldest_sent_ms: int
    peeked_at_s: float


class OldestAgeTracker:
    """Oldest-message age for the poller with as few peeks as possible: arrivals cannot change which
    message is oldest, so it peeks again only when the count dropped (something left) or the last
    peek is older than ``repeek_every_s``. Between peeks the age grows with the clock. A queue whose
    peek the role may not make (AccessDenied: deploy/iam/README.md lets the consumer drop that
    grant) is peeked again only after ``DENIED_REPEEK_S``: every refusal counts as a failed SQS
    call, and one every poll would trip the SQS error alert."""

    def __init__(self, *, repeek_every_s: float = REPEEK_EVERY_S, now_s: Callable[[], float] = time.time):
        self._repeek_every_s = repeek_every_s
        self._now_s = now_s
        self._peeked: dict[str, _Peeked] = {}
        self._denied_at: dict[str, float] = {}

    async def depth(self, sqs: SQSClient, queue: str, url: str, *, peek: bool) -> QueueDepth:
        counts = await read_counts(sqs, url)
        now = self._now_s()
        if counts.total == 0:
            self._peeked.pop(queue, None)
            return _depth(queue, url, counts, 0.0)
        denied_at = self._denied_at.get(queue)
        recently_denied = denied_at is not None and now - denied_at < DENIED_REPEEK_S
        if not peek or counts.has_redrive_policy or recently_denied:
            return _depth(queue, url, counts, None)
        last = self._peeked.get(queue)
        stale = last is None or counts.total < last.total or now - last.peeked_at_s >= self._repeek_every_s
        if stale and counts.visible > 0:
            try:
                sent_ms = await peek_oldest_sent_ms(sqs, url)
            except SQS_ERRORS as exc:
                # The counts are read: publish them (the DLQ alert needs them) with the age unknown,
                # rather than nothing at all while the peek keeps failing (e.g. no sqs:ReceiveMessage).
                denied = _access_denied(exc)
                if denied:
                    self._denied_at[queue] = now
                log.warning(
                    "queue_oldest_age_unavailable",
                    queue=queue,
                    error=describe(exc),
                    asked_again_in_s=DENIED_REPEEK_S if denied else None,
                )
                self._peeked.pop(queue, None)
                return _depth(queue, url, counts, None)
            self._denied_at.pop(queue, None)
            if sent_ms is not None:
                last = self._peeked[queue] = _Peeked(counts.total, sent_ms, now)
        elif last is not None and counts.total > last.total:
            last.total = counts.total
        if last is None:
            return _depth(queue, url, counts, None)
        return _depth(queue, url, counts, max(0.0, now - last.oldest_sent_ms / 1000))


async def poll_queue_depths(
    aws: AwsSettings,
    queue_urls: Mapping[str, str],
    interval_s: float,
    stop: asyncio.Event,
    *,
    peek: Collection[str] = (DEAD_LETTER_QUEUE,),
    tracker: OldestAgeTracker | None = None,
) -> None:
    """Publish every queue's depth each ``interval_s`` until ``stop`` is set. ``queue_urls`` maps the
    ``queue`` label to the URL (see :func:`queue_urls`); only the queues named in ``peek`` are peeked
    for their oldest age. An SQS failure is logged and the gauges keep their last values; each
    queue's ``jiralake_queue_depth_read_timestamp_seconds`` (set to the start, then to every read that
    succeeds) tells how old they are.

    Run it as a named task: ``create_task(poll_queue_depths(...), name="queue-depth-poller")``.
    """
    tracker = tracker or OldestAgeTracker()
    log.info("queue_depth_poller_started", queues=sorted(queue_urls), interval_s=interval_s)
    for queue in queue_urls:
        QUEUE_DEPTH_READ.labels(queue).set_to_current_time()
    async with sqs_client(aws, timeout_s=min(30.0, max(5.0, interval_s))) as sqs:
        while not stop.is_set():
            for queue, url in queue_urls.items():
                try:
                    depth = await tracker.depth(sqs, queue, url, peek=queue in peek)
                except SQS_ERRORS as exc:
                    log.warning("queue_depth_unavailable", queue=queue, error=describe(exc))
                    continue
                publish(depth)
                QUEUE_DEPTH_READ.labels(queue).set_to_current_time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
    log.info("queue_depth_poller_stopped")
