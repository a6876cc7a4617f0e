"""When and how long the Jira client waits before retrying a request: the statuses it retries, the
wait Jira asks for (``Retry-After``, else on a 429 Jira Cloud's ``X-RateLimit-Reset``), exponential
backoff with jitter otherwise, and what of Jira's ``RateLimit-Reason`` may be logged
(docs/backfill.md, "Rate limits and failures")."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Headers that set the wait before a retry (docs/backfill.md, "Rate limits and failures").
RETRY_AFTER = "Retry-After"
RATE_LIMIT_RESET = "X-RateLimit-Reset"
RATE_LIMIT_REASON = "RateLimit-Reason"
# Atlassian's RateLimit-Reason values are lowercase words joined by hyphens (``jira-burst-based``).
# Only such a value is logged: a mixed-case or long one (a token a proxy echoed, say) is not.
_REASON_SHAPE = re.compile(r"[a-z0-9][a-z0-9._:,-]{0,79}")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_s: float = 1.0
    max_s: float = 60.0
    max_retry_after_s: float = 600.0

    def delay_s(self, attempt: int, requested_s: float | None, rng: random.Random) -> float:
        """Wait before retry number ``attempt`` (0-based). When Jira asked for a wait
        (:func:`requested_wait`: Retry-After, or the time to X-RateLimit-Reset), that wait, capped at
        ``max_retry_after_s``, plus up to 10 % jitter (Jira answers early retries with a longer
        wait); else backoff with equal jitter."""
        if requested_s is not None:
            wait = min(max(requested_s, 0.0), self.max_retry_after_s)
            return wait + rng.uniform(0.0, 0.1 * wait)
        ceiling = min(self.max_s, self.base_s * (2.0**attempt))
        return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


def parse_retry_after(value: str | None, *, now_s: float | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date; None when absent or garbage."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        delta = float(text)
    except ValueError:
        pass
    else:  # "nan" and "inf" parse as floats but are no wait
        return max(delta, 0.0) if math.isfinite(delta) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    seconds: float = when.timestamp() - (time.time() if now_s is None else now_s)
    return max(seconds, 0.0)


def parse_rate_limit_reset(value: str | None, *, now_s: float | None = None) -> float | None:
    """Seconds until ``X-RateLimit-Reset``, an ISO 8601 time with a zone (``Z`` or an offset). None
    when absent, garbage, without a zone, or not ahead of now: the caller backs off instead."""
    if value is None or not value.strip():
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    seconds = when.timestamp() - (time.time() if now_s is None else now_s)
    return seconds if seconds > 0.0 else None


@dataclass(frozen=True)
class RequestedWait:
    """The wait Jira asked for, in seconds, and the header that asked."""

    seconds: float
    header: str


def requested_wait(
    status: int, headers: Mapping[str, str], *, now_s: float | None = None
) -> RequestedWait | None:
    """Which wait Jira asked for: a usable ``Retry-After`` first; else, on a 429, the time until
    ``X-RateLimit-Reset`` (Jira Cloud may throttle without Retry-After); else None (back off). The
    reset is read only on a 429: on a 5xx it says when a quota renews, not when Jira recovers."""
    retry_after = parse_retry_after(headers.get(RETRY_AFTER), now_s=now_s)
    if retry_after is not None:
        return RequestedWait(retry_after, RETRY_AFTER)
    if status == 429:
        reset_in = parse_rate_limit_reset(headers.get(RATE_LIMIT_RESET), now_s=now_s)
        if reset_in is not None:
            return RequestedWait(reset_in, RATE_LIMIT_RESET)
    return None


def loggable_reason(value: str | None) -> str | None:
    """``RateLimit-Reason`` as it may be logged: Atlassian's shape of value, else "unrecognised"."""
    if value is None:
        return None
    text = value.strip()
    return text if _REASON_SHAPE.fullmatch(text) else "unrecognised"
