"""The JQL a backfill sends: the operator's query, an ``updated >=`` bound, and a stable order.

- Jira Cloud's enhanced search refuses unbounded queries ("Unbounded JQL queries are not allowed
  here"), so the default query is ``project IS NOT EMPTY``: every issue the account can browse.
- ``ORDER BY created ASC`` unless the operator gave an order: creation order does not move when an
  issue is updated during the run, so ``startAt`` paging (Data Center) neither skips nor repeats
  because of edits; new issues land at the end.
- JQL dates have minute precision and are read in the searching account's time zone (its Jira
  profile setting), so an instant is written in that zone (from ``/myself``), floored to the minute.
  When the zone is unknown, the bound moves 14 hours earlier (the widest UTC offset), which only
  re-sends a few snapshots: snapshots are idempotent. A wall time in the hour that repeats when
  clocks go back is ambiguous, so such a bound moves back by the offset change (one hour).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_WHERE = "project IS NOT EMPTY"
DEFAULT_ORDER = "created ASC"
# How far before the last complete run's start ``--updated-since last-run`` reaches back: Jira's
# search index lags a little behind writes, and clocks differ.
WATERMARK_OVERLAP = timedelta(minutes=10)
UNKNOWN_ZONE_MARGIN = timedelta(hours=14)
EARLIEST_SINCE = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_SINCE = datetime(9998, 12, 31, tzinfo=UTC)

_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)
_QUOTED = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")


def split_order_by(jql: str) -> tuple[str, str | None]:
    """``(where part, order part or None)``; an ``order by`` inside a quoted string does not count."""
    masked = _QUOTED.sub(lambda m: "x" * len(m.group(0)), jql)
    matches = list(_ORDER_BY.finditer(masked))
    if not matches:
        return jql.strip(), None
    last = matches[-1]
    return jql[: last.start()].strip(), jql[last.end() :].strip() or None


def build_jql(
    user_jql: str | None, *, updated_since: datetime | None = None, zone: tzinfo | None = None
) -> str:
    where, order = split_order_by(user_jql or "")
    where = where or DEFAULT_WHERE
    if updated_since is not None:
        where = f'({where}) AND updated >= "{jql_time(updated_since, zone)}"'
    return f"{where} ORDER BY {order or DEFAULT_ORDER}"


def jql_time(instant: datetime, zone: tzinfo | None) -> str:
    """An instant as JQL's ``yyyy-MM-dd HH:mm`` in the account's zone, floored to the minute."""
    if instant.tzinfo is None:
        raise ValueError("jql_time needs an aware datetime")
    if zone is None:
        return (instant - UNKNOWN_ZONE_MARGIN).astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    local = instant.astimezone(zone)
    later = local.replace(fold=1).utcoffset()
    if local.fold == 0 and later is not None and local.utcoffset() != later:
        # The first pass through a repeated hour (clocks going back): Jira may read the wall time as
        # the second pass, up to an hour later, and miss updates. Write the time that is not after
        # the instant under either reading: earlier by the offset change.
        local -= local.utcoffset() - later  # type: ignore[operator]
    return local.strftime("%Y-%m-%d %H:%M")


def jira_zone(name: object) -> tzinfo | None:
    """The zone of a Jira profile's ``timeZone`` ("Europe/Berlin"), or None when unknown."""
    if not isinstance(name, str) or not name.strip():
        return None
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder (Europe), a name too long
        return None


def parse_since(text: str) -> datetime:
    """``--updated-since``: ``2024-05-01`` (midnight UTC) or an ISO 8601 time (UTC when it has no
    offset). Raises ValueError with a message for the operator."""
    raw = text.strip()
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            parsed = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--updated-since must be a date like 2024-05-01, a time like 2024-05-01T08:30:00Z, "
            f"or last-run; got {text!r}"
        ) from None
    since = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    if not EARLIEST_SINCE <= since <= LATEST_SINCE:
        # Jira holds no issue from before 1970, and the edges of datetime's range overflow when the
        # bound is written in the account's zone.
        raise ValueError(f"--updated-since must lie between 1970 and 9998; got {text!r}")
    return since
