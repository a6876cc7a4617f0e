"""How large a message a queue takes, learned from SQS, and the room every message keeps free.

SQS refuses a whole ``SendMessageBatch`` call when one of its entries is over the queue's
``MaximumMessageSize``, so a producer must refuse such an entry itself, before it joins a batch, or
the other entries of the call fail with it. jiralake's own setup and Terraform make queues that take
SQS's largest message (1 MiB); a queue made by hand or by an older Terraform may take 256 KiB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import structlog

from shared.errors import CommandError
from shared.provision import MAX_MESSAGE_BYTES
from shared.sqs_requests import SQS_ERRORS, counted

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()

QUEUE_LIMIT_ATTRIBUTE: Final = "MaximumMessageSize"
# Dead-lettering adds four error attributes (at most ~1.4 KiB: shared/envelope.py cuts their texts in
# bytes); every stored message keeps room for them, or the DLQ could refuse it.
DEAD_LETTER_ROOM_BYTES: Final = 2048
LOG_QUEUE_LIMIT_UNKNOWN: Final = "queue_message_limit_unknown"


async def queue_message_limit(sqs: SQSClient, queue_url: str, *, timeout_s: float) -> int | None:
    """The queue's ``MaximumMessageSize``; None, with a warning, when it cannot be read: the caller
    then assumes SQS's largest (1 MiB), and a smaller queue would refuse a whole batch that holds a
    message over its limit."""
    try:
        answer = await counted(
            "GetQueueAttributes",
            sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[QUEUE_LIMIT_ATTRIBUTE]),
            timeout_s=timeout_s,
        )
    except TimeoutError:
        error = f"SQS did not answer within {timeout_s:g}s"
    except SQS_ERRORS as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        raw = answer.get("Attributes", {}).get(QUEUE_LIMIT_ATTRIBUTE, "")
        if raw.isascii() and raw.isdigit() and int(raw) > 0:
            return int(raw)
        error = f"SQS's answer holds no usable {QUEUE_LIMIT_ATTRIBUTE} ({raw[:40]!r})"
    log.warning(LOG_QUEUE_LIMIT_UNKNOWN, error=error, assumed_bytes=MAX_MESSAGE_BYTES)
    return None


def entry_room(queue_limit: int) -> int:
    """What one message may count (body and attributes) on a queue of ``queue_limit``
    (``MaximumMessageSize``): that less the dead-letter room. A :class:`CommandError` when nothing
    fits, as SQS allows queues down to 1 KiB."""
    room = queue_limit - DEAD_LETTER_ROOM_BYTES
    if room <= 0:
        raise CommandError(
            f"the queue's {QUEUE_LIMIT_ATTRIBUTE} of {queue_limit} bytes leaves no room for a message "
            f"({DEAD_LETTER_ROOM_BYTES} bytes of each are kept for dead-letter reasons); set it to "
            f"{MAX_MESSAGE_BYTES}, SQS's largest (jiralake setup sets it)"
        )
    return room
