"""From an HTTP request to an :class:`Envelope` (or :class:`Ignored`), or a :class:`Rejected` saying why not.

The checks run cheapest-first and never hold more than the body limit (plus one read chunk) of a
body in memory: the declared ``Content-Length`` is checked before reading (:func:`check_headers`, run
also before ``100 Continue`` is sent), and a chunked body is read in chunks and abandoned as soon as it
passes the limit. The signature is verified on the body's bytes (after aiohttp decoded a gzip or deflate
Content-Encoding, which Jira does not use) before anything parses them.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import StreamReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from receiver.message_size import MessageLimits
from receiver.outcomes import Outcome, Rejected
from receiver.signature import SIGNATURE_HEADER, BadSignature, WebhookSecrets, verify
from shared import strict_json
from shared.envelope import Envelope, delivery_id_for, sqs_safe_json
from shared.http_server import fault_text
from shared.jira_event import Ignored, InvalidEvent, Routed, route, route_json
from shared.sqs_batch import entry_bytes

DELIVERY_HEADER = "X-Atlassian-Webhook-Identifier"
RETRY_HEADER = "X-Atlassian-Webhook-Retry"
JSON_TYPE = "application/json"
# What aiohttp decodes before the handler reads the body (it refuses br and zstd itself, without their
# libraries); any other value it would pass on undecoded, as if it were identity.
CONTENT_ENCODINGS = ("", "identity", "gzip", "deflate")
READ_CHUNK_BYTES = 64 * 1024

_RETRY_COUNT = re.compile(r"^[0-9]{1,9}$")
# Printable ASCII without spaces: what Jira sends, and safe as an SQS attribute value.
_DELIVERY_ID = re.compile(r"^[\x21-\x7e]{1,512}$")
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9:_.\-]{1,128}\Z")  # \Z: `$` also matches before a final newline
# What an ignored event whose webhookEvent is no plain name is reported (and logged) as.
UNNAMED_EVENT = "unknown"
# The only characters valid UTF-8 JSON text can hold raw that SQS refuses in a message body (UTF-8
# holds no surrogates): queued as their JSON escapes (shared.envelope.sqs_safe_json).
_SQS_FORBIDDEN = ("\ufffe", "\uffff")


@dataclass(frozen=True)
class IntakeRules:
    # How large a body and its message may be (JIRALAKE_MAX_BODY_BYTES and the queue's limit).
    limits: MessageLimits
    # None only when unsigned webhooks are accepted (--insecure-no-signature).
    secrets: WebhookSecrets | None
    accepted_event_prefixes: tuple[str, ...]
    # Longest wait for the whole body once the handler runs; then 408.
    body_timeout_s: float = 30.0


@dataclass(frozen=True)
class Admitted:
    """A request that passed intake: what to do with it, and which secret signed it (None: unsigned).

    For an envelope, also its ``SendMessageBatch`` entry and the bytes SQS counts for it, made once
    here (to check the size) and handed to the batcher as they are."""

    result: Envelope | Ignored
    signed_with: str | None
    entry: dict[str, Any] | None = None
    entry_bytes: int = 0


async def admit(request: web.Request, rules: IntakeRules, *, received_at_ms: int) -> Admitted:
    """Check a webhook request; raises :class:`Rejected` with the answer when it cannot be queued."""
    check_headers(request, rules)
    try:
        async with asyncio.timeout(rules.body_timeout_s):
            body = await read_limited(request.content, rules.limits)
    except TimeoutError:
        reason = f"the body did not arrive within {rules.body_timeout_s:g}s"
        raise Rejected(Outcome.TIMED_OUT, reason) from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        # Broken chunked framing, or a Content-Encoding that does not decode (aiohttp's pure-Python
        # parser fails a read with the framing error itself, its C parser with RequestPayloadError;
        # framing its C parser finds broken in a later packet never fails the read: that body times
        # out, 408, docs/receiver.md).
        raise Rejected(Outcome.BAD_REQUEST, f"the body could not be read: {fault_text(exc)}") from None
    except (ConnectionError, RuntimeError) as exc:
        # The client closed the connection before the whole body arrived: aiohttp fails the read
        # with ConnectionResetError, or with RuntimeError("Connection closed.") when the connection
        # was already gone as the read began. Any other RuntimeError is a bug, and goes on.
        if isinstance(exc, RuntimeError) and request.transport is not None:
            raise
        reason = "the client closed the connection before the whole body arrived"
        raise Rejected(Outcome.CLIENT_CLOSED, reason) from None
    signed_with: str | None = None
    if rules.secrets is not None:
        try:
            signed_with = verify(rules.secrets, body, request.headers.get(SIGNATURE_HEADER))
        except BadSignature as exc:
            raise Rejected(Outcome.UNAUTHORIZED, str(exc)) from None
    result = _envelope(request, rules, body, received_at_ms)
    if isinstance(result, Ignored):
        return Admitted(result, signed_with)
    entry = result.send_entry("0")
    size = entry_bytes(entry)
    if size > rules.limits.max_entry_bytes:
        # Never sent: SQS would refuse the whole batch it joined, failing the other webhooks in it too.
        raise Rejected(Outcome.TOO_LARGE, rules.limits.message_too_large(size))
    return Admitted(result, signed_with, entry, size)


def _envelope(
    request: web.Request, rules: IntakeRules, body: bytes, received_at_ms: int
) -> Envelope | Ignored:
    delivery_header = request.headers.get(DELIVERY_HEADER)
    if delivery_header and delivery_header.strip() and not _DELIVERY_ID.match(delivery_header.strip()):
        raise Rejected(
            Outcome.BAD_REQUEST, f"{DELIVERY_HEADER} must be 1-512 visible ASCII characters, no spaces"
        )
    text = _decode(body)
    # One parse that reads only the routing fields; any body it does not accept outright goes the
    # full way (json.loads, then the tolerant model), which gives the exact reason for a refusal.
    routed = route_json(text, rules.accepted_event_prefixes) or _route(
        _parse(text), rules.accepted_event_prefixes
    )
    if isinstance(routed, Ignored):
        # The type of an ignored event is echoed to the caller and logged: only a plain name is,
        # never a long or control-character-laden value from the body.
        return routed if _EVENT_TYPE.match(routed.event_type) else Ignored(UNNAMED_EVENT)
    if not _EVENT_TYPE.match(routed.event_type):
        raise Rejected(Outcome.BAD_REQUEST, "webhookEvent is not a valid event type name")
    return Envelope(
        body=text,
        event_type=routed.event_type,
        issue_id=routed.issue_id,
        event_ts_ms=routed.event_ts_ms if routed.event_ts_ms is not None else received_at_ms,
        received_at_ms=received_at_ms,
        delivery_id=delivery_id_for(delivery_header, body),
        retry_count=retry_count(request.headers.get(RETRY_HEADER)),
    )


async def read_limited(content: StreamReader, limits: MessageLimits) -> bytes:
    """The whole body, or :class:`Rejected` (413) as soon as more than the body limit arrived."""
    max_bytes = limits.body_limit_bytes
    buffer = bytearray()
    async for chunk in content.iter_chunked(READ_CHUNK_BYTES):
        buffer += chunk
        if len(buffer) > max_bytes:
            raise Rejected(Outcome.TOO_LARGE, limits.body_too_large())
    return bytes(buffer)


def retry_count(header_value: str | None) -> int:
    """``X-Atlassian-Webhook-Retry`` as a number; 0 when absent or not a plain count."""
    if header_value is None:
        return 0
    value = header_value.strip()
    return int(value) if _RETRY_COUNT.match(value) else 0


def check_headers(request: web.Request, rules: IntakeRules) -> None:
    """What can be refused from the headers alone, before a byte of the body is read: a declared
    Content-Type that is not JSON or a Content-Encoding aiohttp does not decode (415), a declared
    Content-Length over the body limit (413)."""
    # A missing Content-Type is accepted (some proxies drop it); a declared non-JSON one is not.
    declared_type = request.headers.get(hdrs.CONTENT_TYPE, "").strip()
    if declared_type and request.content_type.lower() != JSON_TYPE:
        raise Rejected(
            Outcome.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type must be {JSON_TYPE}, got {request.content_type[:100]!r}",
        )
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding not in CONTENT_ENCODINGS:
        raise Rejected(
            Outcome.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding must be gzip, deflate or identity, got {encoding[:40]!r}",
        )
    declared_length = request.content_length
    if declared_length is not None and declared_length > rules.limits.body_limit_bytes:
        raise Rejected(Outcome.TOO_LARGE, rules.limits.body_too_large())


def _decode(body: bytes) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(
            Outcome.BAD_REQUEST, f"body is not UTF-8 (invalid byte at offset {exc.start})"
        ) from None
    # Plain substring tests: much cheaper than a regex scan of a non-ASCII body; ASCII skips both.
    if not text.isascii() and any(char in text for char in _SQS_FORBIDDEN):
        return sqs_safe_json(text)
    return text


def _parse(text: str) -> Any:
    try:
        return strict_json.loads(text)
    except ValueError as exc:  # "nested too deeply" included
        raise Rejected(Outcome.BAD_REQUEST, f"body is not JSON: {exc}") from None


def _route(payload: Any, accepted: tuple[str, ...]) -> Routed | Ignored:
    try:
        routed = route(payload, accepted)
    except InvalidEvent as exc:
        raise Rejected(Outcome.BAD_REQUEST, str(exc)) from None
    except RecursionError:
        raise Rejected(Outcome.BAD_REQUEST, "body is nested too deeply") from None
    return routed
