"""How large a webhook may be: what the queue takes, learned once at startup.

SQS refuses a whole ``SendMessageBatch`` call when one of its entries is over the queue's
``MaximumMessageSize``, so one webhook too large for the queue would fail every other webhook of its
batch with it (503 for all of them). Intake therefore refuses (413) any webhook whose message would
not fit the queue, before it joins a batch. A queue made by hand or by an older Terraform may take
256 KiB; jiralake's own setup makes queues that take SQS's largest, 1 MiB.

Every message also keeps room for the four error attributes a dead-letter adds, and its body is
never more than ``JIRALAKE_MAX_BODY_BYTES``: the body limit is the smaller of the two.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from shared.metrics import SQS_CALLS
from shared.provision import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()

QUEUE_LIMIT_ATTRIBUTE: Final = "MaximumMessageSize"
# Dead-lettering adds four error attributes (at most ~1.4 KiB); every stored message keeps room for them.
DEAD_LETTER_ROOM_BYTES = 2048
LOG_QUEUE_LIMIT_UNKNOWN = "queue_message_limit_unknown"


@dataclass(frozen=True)
class MessageLimits:
    # JIRALAKE_MAX_BODY_BYTES.
    max_body_bytes: int
    # The queue's MaximumMessageSize; SQS's largest (1 MiB) until it is known, or if it cannot be read.
    queue_max_message_bytes: int = MAX_MESSAGE_BYTES

    @property
    def max_entry_bytes(self) -> int:
        """The most a message may count (its body plus attributes, as SQS counts them)."""
        return self.queue_max_message_bytes - DEAD_LETTER_ROOM_BYTES

    @property
    def body_limit_bytes(self) -> int:
        """The largest body taken: no more than JIRALAKE_MAX_BODY_BYTES, nor than the queue takes."""
        return min(self.max_body_bytes, self.max_entry_bytes)

    def body_too_large(self) -> str:
        """The reason a body over :attr:`body_limit_bytes` is refused, naming where the limit comes from."""
        reason = f"body is larger than the limit of {self.body_limit_bytes} bytes"
        if self.max_entry_bytes < self.max_body_bytes:
            return f"{reason} ({self._queue_room()})"
        return reason

    def message_too_large(self, size_bytes: int) -> str:
        """The reason a message (body plus attributes) over :attr:`max_entry_bytes` is refused."""
        return (
            f"the message would be {size_bytes} bytes with its attributes; at most "
            f"{self.max_entry_bytes} fit ({self._queue_room()})"
        )

    def _queue_room(self) -> str:
        return (
            f"the queue's {QUEUE_LIMIT_ATTRIBUTE} of {self.queue_max_message_bytes} bytes, "
            f"less {DEAD_LETTER_ROOM_BYTES} kept for dead-letter attributes"
        )


async def queue_message_limit(sqs: SQSClient, queue_url: str, *, timeout_s: float) -> int:
    """The queue's ``MaximumMessageSize``. When it cannot be read, SQS's largest (1 MiB, the limit
    the receiver assumed before it asked), with a warning: a smaller queue then refuses a whole
    batch that holds a message over its limit."""
    try:
        async with asyncio.timeout(timeout_s):
            answer = await sqs.get_queue_attributes(
                QueueUrl=queue_url, AttributeNames=[QUEUE_LIMIT_ATTRIBUTE]
            )
    except TimeoutError:
        SQS_CALLS.labels("GetQueueAttributes", "error").inc()
        error = f"SQS did not answer within {timeout_s:g}s"
    except (ClientError, BotoCoreError, OSError) as exc:
        SQS_CALLS.labels("GetQueueAttributes", "error").inc()
        error = f"{type(exc).__name__}: {exc}"
    else:
        SQS_CALLS.labels("GetQueueAttributes", "ok").inc()
        raw = answer.get("Attributes", {}).get(QUEUE_LIMIT_ATTRIBUTE, "")
        if raw.isascii() and raw.isdigit() and int(raw) > 0:
            return int(raw)
        error = f"SQS's answer holds no usable {QUEUE_LIMIT_ATTRIBUTE} ({raw[:40]!r})"
    log.warning(LOG_QUEUE_LIMIT_UNKNOWN, error=error, assumed_bytes=MAX_MESSAGE_BYTES)
    return MAX_MESSAGE_BYTES
