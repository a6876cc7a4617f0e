"""Jira's webhook signature: ``X-Hub-Signature: sha256=<hex>``, an HMAC-SHA256 of the raw body keyed
with the webhook's secret (Jira Cloud admin webhooks and Data Center use the same scheme).

During a secret rotation two secrets are valid: the current one and, optionally, the previous one.
Both are checked in full and in constant time, whatever the first comparison gave, so the time an
answer takes does not tell a caller which secret (if either) its signature matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field

SIGNATURE_HEADER = "X-Hub-Signature"
_SCHEME = "sha256="
_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")

# Which secret a signature matched: logged and counted, never the secret itself.
MATCHED_CURRENT = "current"
MATCHED_PREVIOUS = "previous"


@dataclass(frozen=True)
class WebhookSecrets:
    """The secret Jira signs with now and, while a rotation is in progress, the one it used before."""

    current: str = field(repr=False)
    previous: str | None = field(default=None, repr=False)


class BadSignature(Exception):
    """The signature is missing, malformed or matches no secret; the message never holds values."""


def sign(secret: str, body: bytes) -> str:
    """The header value Jira sends for ``body``."""
    return _SCHEME + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(secrets: WebhookSecrets, body: bytes, header_value: str | None) -> str:
    """Which secret signed ``body`` (:data:`MATCHED_CURRENT` or :data:`MATCHED_PREVIOUS`), or
    :class:`BadSignature` saying why none did (never the values)."""
    if header_value is None or not header_value.strip():
        raise BadSignature(f"missing {SIGNATURE_HEADER} header")
    value = header_value.strip()
    if not value.lower().startswith(_SCHEME) or not _HEX_DIGEST.match(value[len(_SCHEME) :]):
        raise BadSignature(f"{SIGNATURE_HEADER} must be sha256=<64 hex digits>")
    given = (_SCHEME + value[len(_SCHEME) :].lower()).encode("ascii")
    current = hmac.compare_digest(sign(secrets.current, body).encode("ascii"), given)
    # The previous secret is checked even when the current one matched: no early exit.
    previous = secrets.previous is not None and hmac.compare_digest(
        sign(secrets.previous, body).encode("ascii"), given
    )
    if current:
        return MATCHED_CURRENT
    if previous:
        return MATCHED_PREVIOUS
    raise BadSignature(f"{SIGNATURE_HEADER} does not match the body")
