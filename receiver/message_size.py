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

from shared.errors import CommandError
from shared.metrics import SQS_CALLS
from shared.provision import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()

QUEUE_LIMIT_ATTRIBUTE: Final = "MaximumMessageSize"
# Dead-lettering adds four error attributes (at most ~1.4 KiB); every stored message keeps room for them.
DEAD_LETTER_ROOM_BYTES = 2048
LOG_QUEUE_LIMIT_UNKNOWN = "queue_message_limit_unknown"
LOG_QUEUE_LIMIT_SMALL = "queue_message_limit_small"


@dataclass(frozen=True)
class MessageLimits:
    # JIRALAKE_MAX_BODY_BYTES.
    max_body_bytes: int
    # The queue's MaximumMessageSize; SQS's largest (1 MiB) until it is known, or if it cannot be read.
    queue_max_message_bytes: int = MAX_MESSAGE_BYTES
    # Whether queue_max_message_bytes was read from the queue (else it is assumed).
    queue_limit_read: bool = False

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
        limit = (
            f"the queue's {QUEUE_LIMIT_ATTRIBUTE} of {self.queue_max_message_bytes} bytes"
            if self.queue_limit_read
            else f"SQS's largest message, {self.queue_max_message_bytes} bytes (the queue's "
            f"{QUEUE_LIMIT_ATTRIBUTE} could not be read)"
        )
        return f"{limit}, less {DEAD_LETTER_ROOM_BYTES} kept for dead-letter attributes"

    def check_queue(self) -> None:
        """Refuse to start on a queue whose messages leave no room for a webhook; warn when it takes
        less than SQS's largest, as larger webhooks will be refused."""
        if self.max_entry_bytes <= 0:
            raise CommandError(
                f"the queue's {QUEUE_LIMIT_ATTRIBUTE} of {self.queue_max_message_bytes} bytes leaves no "
                f"room for a webhook ({DEAD_LETTER_ROOM_BYTES} bytes of every message are kept for "
                f"dead-letter reasons); set it to {MAX_MESSAGE_BYTES}, SQS's largest"
            )
        if self.queue_max_message_bytes < MAX_MESSAGE_BYTES:
            log.warning(
                LOG_QUEUE_LIMIT_SMALL,
                queue_max_message_bytes=self.queue_max_message_bytes,
                detail=f"webhooks whose message is over {self.max_entry_bytes} bytes get 413; set the "
                f"queue's {QUEUE_LIMIT_ATTRIBUTE} to {MAX_MESSAGE_BYTES}, SQS's largest",
            )


async def queue_message_limit(sqs: SQSClient, queue_url: str, *, timeout_s: float) -> int | None:
    """The queue's ``MaximumMessageSize``; None, with a warning, when it cannot be read: the caller
    then assumes SQS's largest (1 MiB), and a smaller queue would refuse a whole batch that holds a
    message over its limit."""
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
    return None
