"""How large a webhook may be: what the queue takes (shared/queue_limits.py), learned once at startup.

One webhook too large for the queue would fail every other webhook of its batch with it (503 for all
of them): intake refuses (413) any webhook whose message would not fit the queue, before it joins a
batch.

Every message also keeps room for the four error attributes a dead-letter adds, and its body is
never more than ``JIRALAKE_MAX_BODY_BYTES``: the body limit is the smaller of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from shared.provision import MAX_MESSAGE_BYTES
from shared.queue_limits import DEAD_LETTER_ROOM_BYTES, QUEUE_LIMIT_ATTRIBUTE, entry_room

log = structlog.get_logger()

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
        return entry_room(self.queue_max_message_bytes)

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
        entry_room(self.queue_max_message_bytes)
        if self.queue_max_message_bytes < MAX_MESSAGE_BYTES:
            log.warning(
                LOG_QUEUE_LIMIT_SMALL,
                queue_max_message_bytes=self.queue_max_message_bytes,
                detail=f"webhooks whose message is over {self.max_entry_bytes} bytes get 413; set the "
                f"queue's {QUEUE_LIMIT_ATTRIBUTE} to {MAX_MESSAGE_BYTES}, SQS's largest "
                "(jiralake setup sets it)",
            )
