"""``SendMessageBatch`` in calls SQS accepts (at most 10 entries and 1 MiB in all) with per-entry
results, counted in ``jiralake_sqs_requests_total``.

Used by the receiver's micro-batcher, backfill and dead-letter replay: each caller learns exactly
which of its entries SQS stored and which it refused, so nothing is acknowledged that was not stored.
When the entries need several calls and one entry is not stored, the later entries of its message
group are not sent at all: SQS would store them ahead of it, out of the group's order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.provision import MAX_MESSAGE_BYTES
from shared.sqs_requests import SQS_ERRORS, counted, describe, maybe_done

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

MAX_BATCH = 10
# SQS counts a message's body plus its attributes' names, types and values against one limit, which
# is also the limit for a whole SendMessageBatch call: a call over it fails as a whole.
MAX_CALL_BYTES = MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class EntryResult:
    entry_id: str
    ok: bool
    # For failures: SQS's code and message, or the exception class and text of a failed call.
    error: str | None = None
    # True when retrying could succeed (throttling, network, 5xx); False for a refused entry.
    retryable: bool = False
    # True when it was never sent, because an earlier entry of its message group was not stored.
    held_back: bool = False
    # True when the call carrying it got no answer within the caller's timeout: SQS may have stored it.
    unanswered: bool = False
    # True when SQS may have stored it all the same: the call carrying it got no answer (``unanswered``),
    # or failed after it may have reached SQS (its answer lost; sqs_requests.maybe_done). False for
    # SQS's per-entry refusal and for a call SQS refused or that never reached it: certainly not stored.
    maybe_stored: bool = False


def entry_bytes(entry: Mapping[str, Any]) -> int:
    """What SQS counts against its size limits for one ``SendMessageBatch`` entry."""
    size = _utf8_len(entry["MessageBody"])
    for name, attr in entry.get("MessageAttributes", {}).items():
        size += _utf8_len(name) + _utf8_len(attr["DataType"]) + _value_len(attr)
    return size


def _value_len(attr: Mapping[str, Any]) -> int:
    if "BinaryValue" in attr:  # another producer's Binary attribute, kept on a dead-letter
        return len(attr["BinaryValue"])
    return _utf8_len(attr["StringValue"])


def _utf8_len(text: str) -> int:
    # ASCII text is one byte a character: skip encoding a copy of a body of up to 1 MiB.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def calls(entries: Sequence[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """The entries in order, cut into calls of at most MAX_BATCH entries and MAX_CALL_BYTES."""
    call: list[dict[str, Any]] = []
    call_bytes = 0
    for entry in entries:
        size = entry_bytes(entry)
        if call and (len(call) == MAX_BATCH or call_bytes + size > MAX_CALL_BYTES):
            yield call
            call, call_bytes = [], 0
        call.append(entry)
        call_bytes += size
    if call:
        yield call


async def send_entries(
    sqs: SQSClient, queue_url: str, entries: Sequence[dict[str, Any]], *, timeout_s: float | None = None
) -> list[EntryResult]:
    """Send entries (each with a unique ``Id``) in as few calls as SQS accepts; one result per entry,
    in order. A few large messages (backfill snapshots, dead letters) never share a call over 1 MiB.

    A call that gets no answer within ``timeout_s`` (None: botocore's own limits, minutes) is given
    up: its entries are ``unanswered`` (SQS may have stored them or not), and the later calls are not
    made (SQS is not answering; each would wait as long again). A call that fails after it may have
    reached SQS (its answer lost) fails its entries as ``maybe_stored`` too."""
    results: dict[str, EntryResult] = {}
    failed_groups: set[str] = set()
    silent = False
    for planned in calls(entries):
        if silent:
            for entry in planned:
                results[entry["Id"]] = EntryResult(
                    entry["Id"], False, _NOT_SENT_AFTER_SILENCE, retryable=True
                )
            continue
        chunk = []
        for entry in planned:
            group = entry.get("MessageGroupId")
            if group is not None and group in failed_groups:
                reason = f"held back: an earlier message of group {group} was not stored"
                results[entry["Id"]] = EntryResult(entry["Id"], False, reason, retryable=True, held_back=True)
            else:
                chunk.append(entry)
        if not chunk:
            continue
        try:
            resp = await counted(
                "SendMessageBatch",
                sqs.send_message_batch(QueueUrl=queue_url, Entries=chunk),  # type: ignore[arg-type]
                timeout_s=timeout_s,
            )
        except SQS_ERRORS as exc:
            # Given up without an answer: SQS may have stored them, and the later calls are not made.
            silent = timeout_s is not None and isinstance(exc, TimeoutError)
            reason = describe(exc)
            maybe = silent or maybe_done(exc)
            for entry in chunk:
                results[entry["Id"]] = EntryResult(
                    entry["Id"], False, reason, retryable=True, unanswered=silent, maybe_stored=maybe
                )
        else:
            for ok in resp.get("Successful", []):
                results[ok["Id"]] = EntryResult(ok["Id"], True)
            for failed in resp.get("Failed", []):
                results[failed["Id"]] = EntryResult(
                    failed["Id"],
                    False,
                    f"{failed.get('Code', 'Unknown')}: {failed.get('Message', '')}".strip(),
                    retryable=not failed.get("SenderFault", False),
                )
        failed_groups.update(
            e["MessageGroupId"] for e in chunk if "MessageGroupId" in e and not _stored(results, e["Id"])
        )
    return [
        results.get(e["Id"], EntryResult(e["Id"], False, "no result from SQS", retryable=True))
        for e in entries
    ]


_NOT_SENT_AFTER_SILENCE = "SQS did not answer an earlier call"


def _stored(results: Mapping[str, EntryResult], entry_id: str) -> bool:
    result = results.get(entry_id)
    return result is not None and result.ok
