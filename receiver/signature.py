"""Jira's webhook signature: ``X-Hub-Signature: sha256=<hex>``, an HMAC-SHA256 of the raw body keyed
with the webhook's secret (Jira Cloud admin webhooks and Data Center use the same scheme)."""

from __future__ import annotations

import hashlib
import hmac
import re

SIGNATURE_HEADER = "X-Hub-Signature"
_SCHEME = "sha256="
_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


def sign(secret: str, body: bytes) -> str:
    """The header value Jira sends for ``body``."""
    return _SCHEME + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def signature_problem(secret: str, body: bytes, header_value: str | None) -> str | None:
    """None when ``header_value`` signs ``body`` with ``secret``; else why not (never the values)."""
    if header_value is None or not header_value.strip():
        return f"missing {SIGNATURE_HEADER} header"
    value = header_value.strip()
    if not value.lower().startswith(_SCHEME) or not _HEX_DIGEST.match(value[len(_SCHEME) :]):
        return f"{SIGNATURE_HEADER} must be sha256=<64 hex digits>"
    expected = sign(secret, body).encode("ascii")
    given = (_SCHEME + value[len(_SCHEME) :].lower()).encode("ascii")
    if not hmac.compare_digest(expected, given):
        return f"{SIGNATURE_HEADER} does not match the body"
    return None
