"""A Jira issue object (``issue`` of a webhook, or one issue from the REST API) -> ``ap_jira_task`` columns.

Tolerant like every reader of Jira payloads (tests/fixtures/jira-webhooks/NOTES.md): a field of an
unexpected shape becomes NULL instead of failing the event. Only a *full* issue object may set the
field columns; comment, attachment and hand-trimmed payloads carry slim objects that lack most fields,
and applying one would blank them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from shared.jira_event import parse_jira_time

# A full issue object has its key and these fields, each a non-null value (webhook issue events and
# REST snapshots with the default fields all do; slim objects in comment and attachment events don't).
FULL_ISSUE_FIELDS = ("created", "status", "issuetype", "project")

# A delete's issue object must also carry every one of these fields (null or not) to replace the field
# columns: Forge-era Cloud deletes are trimmed (NOTES.md) and may still hold the four above, and
# applied, they would blank the deleted issue's last priority, labels, due date... `parent` is not
# here: Jira leaves it out for an issue that has none. Every full delete in the fixtures carries them.
DELETE_COLUMN_FIELDS = (
    "summary", "priority", "labels", "duedate", "resolution", "resolutiondate", "assignee", "reporter",
    "updated",
)  # fmt: skip

_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*-([0-9]{1,9})$")
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_MAX_BIGINT = 2**63 - 1


@dataclass(frozen=True)
class IssueRow:
    """The field columns of ``ap_jira_task`` that come from one issue object."""

    issue_key: str | None
    project_id: int | None
    project_key: str | None
    project_name: str | None
    issue_number: int | None
    summary: str | None
    status: str | None
    status_category: str | None
    issue_type: str | None
    priority: str | None
    resolution: str | None
    assignee_account_id: str | None
    assignee_display_name: str | None
    reporter_account_id: str | None
    reporter_display_name: str | None
    labels: list[str] | None
    created_at: datetime | None
    updated_at: datetime | None
    resolved_at: datetime | None
    due_date: date | None
    parent_key: str | None
    raw: dict[str, Any]


def is_full(issue: Any) -> bool:
    """True when the issue object can replace every field column (see :data:`FULL_ISSUE_FIELDS`)."""
    if not isinstance(issue, dict) or not isinstance(issue.get("key"), str) or not issue["key"]:
        return False
    fields = issue.get("fields")
    return isinstance(fields, dict) and all(fields.get(name) is not None for name in FULL_ISSUE_FIELDS)


def is_full_delete(issue: Any) -> bool:
    """True when a delete's issue object can replace every field column (see
    :data:`DELETE_COLUMN_FIELDS`); a trimmed one only flags the row."""
    return is_full(issue) and all(name in issue["fields"] for name in DELETE_COLUMN_FIELDS)


def issue_row(issue: dict[str, Any]) -> IssueRow:
    fields = issue.get("fields")
    f: dict[str, Any] = fields if isinstance(fields, dict) else {}
    key = _text(issue.get("key"))
    project = _obj(f.get("project"))
    assignee = _obj(f.get("assignee"))
    reporter = _obj(f.get("reporter"))
    return IssueRow(
        issue_key=key,
        project_id=_bigint(project.get("id")),
        project_key=_text(project.get("key")) or _project_of_key(key),
        project_name=_text(project.get("name")),
        issue_number=issue_number(key),
        summary=_text(f.get("summary")),
        status=_name(f.get("status")),
        status_category=_text(_obj(_obj(f.get("status")).get("statusCategory")).get("key")),
        issue_type=_name(f.get("issuetype")),
        priority=_name(f.get("priority")),
        resolution=_name(f.get("resolution")),
        assignee_account_id=user_id(assignee),
        assignee_display_name=_text(assignee.get("displayName")),
        reporter_account_id=user_id(reporter),
        reporter_display_name=_text(reporter.get("displayName")),
        labels=_labels(f.get("labels")),
        created_at=_time(f.get("created")),
        updated_at=_time(f.get("updated")),
        resolved_at=_time(f.get("resolutiondate")),
        due_date=_date(f.get("duedate")),
        parent_key=_text(_obj(f.get("parent")).get("key")),
        raw=issue,
    )


def issue_number(key: str | None) -> int | None:
    """MAG-21513 -> 21513; None for anything that is not a Jira issue key."""
    match = _KEY.match(key or "")
    return int(match[1]) if match else None


def user_id(user: dict[str, Any]) -> str | None:
    """Cloud's ``accountId``; on Server/DC the username (``name``, as changelogs use), else ``key``."""
    for attr in ("accountId", "name", "key"):
        value = _text(user.get(attr))
        if value:
            return value
    return None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _name(value: Any) -> str | None:
    return _text(_obj(value).get("name"))


def _bigint(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value <= _MAX_BIGINT else None
    if isinstance(value, str) and _DIGITS.match(value.strip()):
        number = int(value)
        return number if number <= _MAX_BIGINT else None
    return None


def _project_of_key(key: str | None) -> str | None:
    return key.rsplit("-", 1)[0] if key and issue_number(key) is not None else None


def _labels(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    return [label for label in value if isinstance(label, str)]


def _time(value: Any) -> datetime | None:
    """A Jira time, or None where it has no UTC equivalent Python holds (year 1 at +14:00, 9999-12-31
    at -14:00): asyncpg converts to UTC, and failing there would make the whole event invalid."""
    parsed = parse_jira_time(value)
    if parsed is None:
        return None
    try:
        parsed.astimezone(UTC)
    except OverflowError:
        return None
    return parsed


def _date(value: Any) -> date | None:
    if not isinstance(value, str):
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None
