"""Dead-lettering: an invalid message goes to the DLQ with the reason, then leaves the main queue.

The DLQ copy keeps the body, the original envelope attributes and the group id, and adds the four
error attributes of shared/envelope.py. Its deduplication id is new for every dead-lettering: reusing
the original one would let SQS silently drop a message that was replayed and failed again within its
5-minute deduplication window, and the consumer would then delete it from the main queue: lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from consumer.sqs import Message, group_id
from shared.envelope import ENVELOPE_ATTRIBUTES, ERROR_ATTRIBUTES, MAX_ATTRIBUTES, error_attributes
from shared.errors import CommandError
from shared.sqs_batch import send_entries
from shared.sqs_requests import counted, no_such_queue

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()


@dataclass(frozen=True)
class Rejected:
    message: Message
    error_class: str
    error_message: str


def dead_letter_entry(rejected: Rejected, entry_id: str, *, failed_at: datetime) -> dict[str, Any]:
    message = rejected.message
    original = message.get("MessageAttributes") or {}
    # Envelope attributes first, then any others, within SQS's limit of 10 with the 4 error attributes.
    names = [n for n in ENVELOPE_ATTRIBUTES if n in original]
    names += sorted(n for n in original if n not in ENVELOPE_ATTRIBUTES and n not in ERROR_ATTRIBUTES)
    attributes: dict[str, Any] = {
        name: {k: v for k, v in original[name].items() if k in ("DataType", "StringValue", "BinaryValue")}
        for name in names[: MAX_ATTRIBUTES - len(ERROR_ATTRIBUTES)]
    }
    original_group = group_id(message)
    attributes.update(
        error_attributes(
            error_class=rejected.error_class,
            error_message=rejected.error_message,
            failed_at_iso=failed_at.isoformat(timespec="milliseconds"),
            original_group_id=original_group or "-",
        )
    )
    return {
        "Id": entry_id,
        "MessageBody": message["Body"],
        "MessageGroupId": original_group or "jiralake-ungrouped",
        "MessageDeduplicationId": uuid.uuid4().hex,
        "MessageAttributes": attributes,
    }


async def dead_letter(sqs: SQSClient, dlq_url: str, rejected: Sequence[Rejected]) -> list[Message]:
    """Send to the DLQ; returns the messages the DLQ stored (only those may be deleted from the queue)."""
    if not rejected:
        return []
    failed_at = datetime.now(UTC)
    entries = [dead_letter_entry(r, str(i), failed_at=failed_at) for i, r in enumerate(rejected)]
    results = await send_entries(sqs, dlq_url, entries)
    stored = []
    for r, result in zip(rejected, results, strict=True):
        if result.ok:
            stored.append(r.message)
        else:
            log.warning(
                "dead_letter_failed",
                message_id=r.message.get("MessageId"),
                error=result.error,
                retryable=result.retryable,
            )
    return stored


# A start-up check answers within this long or is left to the pollers (SQS may be down at start).
DLQ_CHECK_TIMEOUT_S = 10.0


async def check_dead_letter_queue(sqs: SQSClient, dlq_url: str) -> None:
    """Refuse (CommandError, exit 1) a JIRALAKE_DLQ_URL that SQS says names no queue: dead-lettering into
    it would fail at every invalid event, each one only logged, until SQS's redrive moved the message
    to the DLQ without its reason. The main queue needs no such check: the first receive fails on it.
    Any other failure (SQS unreachable) is left to the pollers, which wait for SQS."""
    try:
        await counted(
            "GetQueueAttributes",
            sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]),
            timeout_s=DLQ_CHECK_TIMEOUT_S,
        )
    except Exception as exc:
        if no_such_queue(exc):
            raise CommandError(
                f"JIRALAKE_DLQ_URL names no queue SQS knows ({dlq_url}): create it (jiralake setup) or "
                "correct the URL",
                exit_code=1,
            ) from None
