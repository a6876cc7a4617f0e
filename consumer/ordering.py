"""Which event wins: the ordering key, its tie-break, and coalescing a batch per issue.

The version of an event is its own time in ms (the envelope's ``event_ts_ms``: Jira's ``timestamp``,
or the issue's ``updated`` time for backfill snapshots). Events with the same version are ordered by
a tie-break text that sorts byte-wise (``COLLATE "C"`` in SQL):

    <Jira changelog id, digits, zero-padded to 20> ":" <SHA-256 hex of the message body>

Jira's changelog ids grow with every change on an instance, so within one millisecond the later
change wins; events without a changelog use twenty zeros and sort first; the body hash makes the
order total and deterministic. A state only moves to a strictly greater ``(version, tiebreak)``, so an
exact duplicate changes nothing and any delivery order converges to the same row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from shared.envelope import body_sha256

if TYPE_CHECKING:
    from consumer.event import ConsumerEvent

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The range of versions (shared.jira_event.MAX_VERSION_MS) is defined with routing, which refuses
# events outside it before they are queued.
NO_CHANGELOG_ID = "0" * 20
_CHANGELOG_ID = re.compile(r"^\d{1,20}$")


def version_time(version_ms: int) -> datetime:
    """The exact timestamptz of a version (integer arithmetic: no float rounding of milliseconds)."""
    return _EPOCH + timedelta(milliseconds=version_ms)


def tiebreak_for(changelog_id: Any, body: str) -> str:
    text = str(changelog_id).strip() if isinstance(changelog_id, int | str) else ""
    padded = text.zfill(20) if _CHANGELOG_ID.match(text) else NO_CHANGELOG_ID
    return f"{padded}:{body_sha256(body)}"


@dataclass(frozen=True)
class IssueChange:
    """What one batch asks of one ``ap_jira_task`` row: the newest field-carrying event, the newest
    delete, and the newest of both (for ``last_event_*``), each None when the batch has none."""

    issue_id: int
    fields: ConsumerEvent | None
    delete: ConsumerEvent | None
    last: ConsumerEvent | None


def coalesce(events: list[ConsumerEvent]) -> list[IssueChange]:
    """One change per issue that the events touch, in issue id order (a stable lock order)."""
    fields: dict[int, ConsumerEvent] = {}
    deletes: dict[int, ConsumerEvent] = {}
    for event in events:  # queue order: among equal keys the first delivery is the one recorded as applied
        if event.row is not None and _newer(event, fields.get(event.issue_id)):
            fields[event.issue_id] = event
        if event.deletes and _newer(event, deletes.get(event.issue_id)):
            deletes[event.issue_id] = event
    changes = []
    for issue_id in sorted(fields.keys() | deletes.keys()):
        f, d = fields.get(issue_id), deletes.get(issue_id)
        last = f if d is None or (f is not None and _newer(f, d)) else d
        changes.append(IssueChange(issue_id, f, d, last))
    return changes


def _newer(event: ConsumerEvent, than: ConsumerEvent | None) -> bool:
    return than is None or event.order_key > than.order_key
