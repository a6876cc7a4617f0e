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
from shared.sqs_batch import send_entries

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
