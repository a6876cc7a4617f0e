"""The SQS calls the consumer makes, each counted in ``jiralake_sqs_requests_total``.

Batch calls return the messages SQS did not act on, so callers can log them; a failed call raises
(consumer/outcomes.py decides what that means).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shared.sqs_requests import counted

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

Message = dict[str, Any]


async def receive(
    sqs: SQSClient, queue_url: str, *, max_messages: int, wait_time_s: int, visibility_timeout_s: int
) -> list[Message]:
    resp = await counted(
        "ReceiveMessage",
        sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=wait_time_s,
            VisibilityTimeout=visibility_timeout_s,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            # FIFO: botocore's retries of this call reuse the id and get the same messages back
            # instead of leaving them hidden for a visibility timeout.
            ReceiveRequestAttemptId=uuid.uuid4().hex,
        ),
    )
    return list(resp.get("Messages", []))  # type: ignore[arg-type]


async def delete_batch(sqs: SQSClient, queue_url: str, messages: Sequence[Message]) -> list[str]:
    """Delete up to 10 messages; returns the failure reasons (empty when all were deleted)."""
    if not messages:
        return []
    resp = await counted(
        "DeleteMessageBatch",
        sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        ),
    )
    return [f"{f.get('Code')}: {f.get('Message', '')}" for f in resp.get("Failed", [])]


async def change_visibility_batch(
    sqs: SQSClient, queue_url: str, timeouts: Sequence[tuple[Message, int]]
) -> list[str]:
    """Set each message's visibility timeout (up to 10); returns the failure reasons."""
    if not timeouts:
        return []
    resp = await counted(
        "ChangeMessageVisibilityBatch",
        sqs.change_message_visibility_batch(
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": timeout_s}
                for i, (m, timeout_s) in enumerate(timeouts)
            ],
        ),
    )
    return [f"{f.get('Code')}: {f.get('Message', '')}" for f in resp.get("Failed", [])]


def receive_count(message: Message) -> int:
    try:
        return max(1, int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1")))
    except ValueError:
        return 1


def group_id(message: Message) -> str:
    return str(message.get("Attributes", {}).get("MessageGroupId", ""))
