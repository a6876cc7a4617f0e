"""The message contract between the receiver (and backfill) that enqueue and the consumer (and the
dead-letter tools) that read: one Jira event per SQS FIFO message.

- Body: the webhook body as Jira sent it (UTF-8 JSON text), except that the characters SQS refuses
  in a body travel as their JSON escapes (:func:`sqs_safe_json`): the same JSON value.
- ``MessageGroupId``: the Jira issue id, so events for one issue stay in order.
- ``MessageDeduplicationId``: Jira's delivery identifier (stable across its retries), else the
  SHA-256 of the body.
- Attributes: :data:`ENVELOPE_ATTRIBUTES` (6). Dead-lettering adds :data:`ERROR_ATTRIBUTES` (4),
  which keeps every message within SQS's limit of 10 attributes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ATTR_EVENT_TYPE = "event_type"
ATTR_ISSUE_ID = "issue_id"
ATTR_EVENT_TS = "event_ts_ms"
ATTR_RECEIVED_AT = "received_at_ms"
ATTR_DELIVERY_ID = "delivery_id"
ATTR_RETRY_COUNT = "retry_count"
ENVELOPE_ATTRIBUTES = (
    ATTR_EVENT_TYPE,
    ATTR_ISSUE_ID,
    ATTR_EVENT_TS,
    ATTR_RECEIVED_AT,
    ATTR_DELIVERY_ID,
    ATTR_RETRY_COUNT,
)

ATTR_ERROR_CLASS = "error_class"
ATTR_ERROR_MESSAGE = "error_message"
ATTR_FAILED_AT = "failed_at"
ATTR_ORIGINAL_GROUP_ID = "original_group_id"
ERROR_ATTRIBUTES = (ATTR_ERROR_CLASS, ATTR_ERROR_MESSAGE, ATTR_FAILED_AT, ATTR_ORIGINAL_GROUP_ID)

MAX_ATTRIBUTES = 10
assert len(ENVELOPE_ATTRIBUTES) + len(ERROR_ATTRIBUTES) <= MAX_ATTRIBUTES

_DEDUP_ID = re.compile(r"^[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}$")
# Characters SQS refuses in a message attribute value (it takes #x9, #xA, #xD, #x20-#xD7FF,
# #xE000-#xFFFD and #x10000-#x10FFFF): other control characters, surrogates, U+FFFE and U+FFFF.
_SQS_REFUSED = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Of those, the ones valid JSON text may hold raw (inside strings): surrogates, U+FFFE and U+FFFF.
_JSON_RAW_SQS_REFUSED = re.compile("[\ud800-\udfff\ufffe\uffff]")


def sqs_safe_json(text: str) -> str:
    """JSON text that SQS takes as a message body: each character that valid JSON may hold raw but
    SQS refuses (U+FFFE, U+FFFF, and in a Python string a lone surrogate decoded from an escape such
    as ``"\\ud83d"``) written as its JSON escape. They stand only inside strings, where the escape
    means the same character: the JSON value does not change. Anything else SQS refuses (a raw
    control character) is no valid JSON, and is left for the parser to refuse."""
    if text.isascii():
        return text
    return _JSON_RAW_SQS_REFUSED.sub(lambda char: f"\\u{ord(char.group()):04x}", text)


class InvalidEnvelope(ValueError):
    """A queued message lacks the attributes jiralake puts on every message."""


def body_sha256(body: bytes | str) -> str:
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return hashlib.sha256(raw).hexdigest()


def delivery_id_for(header_value: str | None, body: bytes | str) -> str:
    """Jira's ``X-Atlassian-Webhook-Identifier`` when present, else ``sha256:<hex of the body>``."""
    if header_value and header_value.strip():
        return header_value.strip()[:512]
    return "sha256:" + body_sha256(body)


def dedup_id_for(delivery_id: str) -> str:
    """A valid ``MessageDeduplicationId`` (<= 128 chars of ASCII punctuation/alnum) for a delivery."""
    if _DEDUP_ID.match(delivery_id):
        return delivery_id
    return body_sha256(delivery_id)


@dataclass(frozen=True)
class Envelope:
    body: str
    event_type: str
    issue_id: str
    event_ts_ms: int
    received_at_ms: int
    delivery_id: str
    retry_count: int = 0

    @property
    def group_id(self) -> str:
        return self.issue_id

    @property
    def dedup_id(self) -> str:
        return dedup_id_for(self.delivery_id)

    def attributes(self) -> dict[str, dict[str, str]]:
        return {
            ATTR_EVENT_TYPE: _string(self.event_type),
            ATTR_ISSUE_ID: _string(self.issue_id),
            ATTR_EVENT_TS: _number(self.event_ts_ms),
            ATTR_RECEIVED_AT: _number(self.received_at_ms),
            ATTR_DELIVERY_ID: _string(self.delivery_id),
            ATTR_RETRY_COUNT: _number(self.retry_count),
        }

    def send_entry(self, entry_id: str, *, dedup_id: str | None = None) -> dict[str, Any]:
        """One ``SendMessageBatch`` entry (``dedup_id`` overrides, as a dead-letter replay needs)."""
        return {
            "Id": entry_id,
            "MessageBody": self.body,
            "MessageGroupId": self.group_id,
            "MessageDeduplicationId": dedup_id or self.dedup_id,
            "MessageAttributes": self.attributes(),
        }

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Envelope:
        """Parse a message from ``ReceiveMessage`` (requested with ``MessageAttributeNames=["All"]``)."""
        attrs = message.get("MessageAttributes") or {}
        try:
            return cls(
                body=message["Body"],
                event_type=_read(attrs, ATTR_EVENT_TYPE),
                issue_id=_read(attrs, ATTR_ISSUE_ID),
                event_ts_ms=_read_int(attrs, ATTR_EVENT_TS),
                received_at_ms=_read_int(attrs, ATTR_RECEIVED_AT),
                delivery_id=_read(attrs, ATTR_DELIVERY_ID),
                retry_count=_read_int(attrs, ATTR_RETRY_COUNT),
            )
        except (KeyError, ValueError) as exc:
            reason = exc.args[0] if exc.args else type(exc).__name__  # str(KeyError) adds quotes
            raise InvalidEnvelope(f"message is not a jiralake envelope: {reason}") from None


# Bytes, not characters: SQS counts a message's size in bytes, and the room a producer keeps free for
# these attributes (receiver/message_size.py) is counted in bytes. 1024 non-ASCII characters could be
# three times the room's share.
ERROR_CLASS_MAX_BYTES = 256
ERROR_MESSAGE_MAX_BYTES = 1024


def error_attributes(
    *, error_class: str, error_message: str, failed_at_iso: str, original_group_id: str
) -> dict[str, dict[str, str]]:
    """The reason attributes of a dead-lettered message. The texts can quote what a body held (an
    event type, a value PostgreSQL refused): a character SQS refuses becomes U+FFFD, or the DLQ
    would refuse the message and it would stay on the queue, to be redriven without its reason."""
    return {
        ATTR_ERROR_CLASS: _string(_clip_utf8(_SQS_REFUSED.sub("\ufffd", error_class), ERROR_CLASS_MAX_BYTES)),
        ATTR_ERROR_MESSAGE: _string(
            _clip_utf8(_SQS_REFUSED.sub("\ufffd", error_message), ERROR_MESSAGE_MAX_BYTES) or "-"
        ),
        ATTR_FAILED_AT: _string(failed_at_iso),
        ATTR_ORIGINAL_GROUP_ID: _string(original_group_id),
    }


def _clip_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    return text.encode()[:max_bytes].decode(errors="ignore")


def read_attribute(message: Mapping[str, Any], name: str) -> str | None:
    attrs = message.get("MessageAttributes") or {}
    entry = attrs.get(name)
    if not entry:
        return None
    value = entry.get("StringValue")
    return value if isinstance(value, str) else None


def _read(attrs: Mapping[str, Any], name: str) -> str:
    entry = attrs.get(name)
    if not entry or "StringValue" not in entry:
        raise KeyError(f"missing attribute {name}")
    return str(entry["StringValue"])


def _read_int(attrs: Mapping[str, Any], name: str) -> int:
    text = _read(attrs, name)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"attribute {name} is not an integer: {text[:40]!r}") from None


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _number(value: int) -> dict[str, str]:
    return {"DataType": "Number", "StringValue": str(value)}
