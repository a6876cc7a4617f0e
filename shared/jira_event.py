"""What a Jira webhook body is about: its event type, the issue it concerns, and its time.

Tolerant by design (see tests/fixtures/jira-webhooks/NOTES.md): unknown keys are allowed, nearly
every field is optional, ids arrive as strings or integers. Only what routing needs is modelled; the
consumer reads the issue fields from the raw body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

# Event types jiralake itself puts on the queue (backfill snapshots, reconcile deletes).
SNAPSHOT_EVENT = "jiralake:issue_snapshot"
RECONCILED_DELETE_EVENT = "jiralake:issue_deleted"

# Events that concern one issue, by prefix. Everything else (sprint_*, board_*, project_*, user_*,
# jira:version_*, ...) concerns no issue and is ignored.
ISSUE_EVENT_PREFIXES: tuple[str, ...] = (
    "jira:issue_",
    "jira:worklog_",
    "comment_",
    "worklog_",
    "attachment_",
    "issuelink_",
    "jiralake:issue_",
)

_COMMENT_SELF = re.compile(r"/issue/([0-9]+)/comment/")
# ASCII digits only: \d and str.isdigit() also take other scripts' digits and "²", which int() or SQS
# refuse (a 500, or a MessageGroupId SQS rejects).
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_ANY_DIGITS = re.compile(r"^[0-9]+$")

# What the consumer can store and order by; the receiver refuses (400) what lies outside, rather than
# queue an event the consumer could only dead-letter. One definition, for both.
# PostgreSQL's bigint, the type of ap_jira_task.issue_id.
MAX_ISSUE_ID = 2**63 - 1
# An event's time (its version, consumer/ordering.py) in ms since the epoch: after the epoch, and at
# most 9999-12-31T23:59:59.999Z, the last millisecond both Python and PostgreSQL represent.
MAX_VERSION_MS = 253_402_300_799_999


def is_issue_id(text: str) -> bool:
    """``text`` is an issue id the consumer can store: 1-19 ASCII digits, at most :data:`MAX_ISSUE_ID`."""
    return _DIGITS.match(text) is not None and int(text) <= MAX_ISSUE_ID


def is_event_time_ms(ms: int) -> bool:
    """``ms`` is an event time the consumer can order by and store (see :data:`MAX_VERSION_MS`)."""
    return 0 < ms <= MAX_VERSION_MS


class InvalidEvent(ValueError):
    """The body can never be routed or applied: not JSON, not an object, an issue event without a
    usable issue id, or one whose time lies outside what the consumer can store."""


def _id_text(value: Any) -> Any:
    if isinstance(value, bool):
        return value  # let pydantic reject it
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return value


IdText = Annotated[str, BeforeValidator(_id_text)]


def _no_time_unless_whole(value: Any) -> Any:
    """What is no whole number nor text is no timestamp: it does not count (the event falls back to
    ``fields.updated``), rather than fail the event. pydantic's lax int would read true as 1 ms and
    refuse 1.5, an object or a list, which made the receiver answer 400 and Jira drop the event."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


Timestamp = Annotated[int | str | None, BeforeValidator(_no_time_unless_whole)]


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class IssueRef(_Tolerant):
    id: IdText | None = None
    key: str | None = None
    fields: dict[str, Any] | None = None


class CommentRef(_Tolerant):
    id: IdText | None = None
    self_url: str | None = Field(default=None, alias="self")


class WorklogRef(_Tolerant):
    id: IdText | None = None
    issueId: IdText | None = None


class IssueLinkRef(_Tolerant):
    id: IdText | None = None
    sourceIssueId: IdText | None = None
    destinationIssueId: IdText | None = None


class ChangelogRef(_Tolerant):
    id: IdText | None = None
    items: list[dict[str, Any]] | None = None


class JiraWebhook(_Tolerant):
    webhookEvent: str | None = None
    timestamp: Timestamp = None
    issue_event_type_name: str | None = None
    issue: IssueRef | None = None
    comment: CommentRef | None = None
    worklog: WorklogRef | None = None
    issueLink: IssueLinkRef | None = None
    changelog: ChangelogRef | None = None
    user: dict[str, Any] | None = None


@dataclass(frozen=True)
class Routed:
    """A body that concerns one issue: it goes on the queue in that issue's message group."""

    event_type: str
    issue_id: str
    # The event's own time in ms since the epoch, or None when the body carries none usable.
    event_ts_ms: int | None


@dataclass(frozen=True)
class Ignored:
    """A body that concerns no issue (sprint, board, project, user events; bare user_deleted)."""

    event_type: str


def route(payload: Any, accepted_prefixes: tuple[str, ...] = ISSUE_EVENT_PREFIXES) -> Routed | Ignored:
    """Classify a decoded JSON body. Raises :class:`InvalidEvent` with a reason a person can act on."""
    if not isinstance(payload, dict):
        raise InvalidEvent(f"body must be a JSON object, got {type(payload).__name__}")
    try:
        hook = JiraWebhook.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidEvent(f"invalid field {where}: {first['msg']}") from None
    event_type = hook.webhookEvent
    if not event_type:
        # Jira's bare user_deleted body: {"accountId": ..., "username": ...}, no envelope at all.
        return Ignored("user_deleted" if "accountId" in payload or "username" in payload else "unknown")
    if not event_type.startswith(ISSUE_EVENT_PREFIXES) or not event_type.startswith(accepted_prefixes):
        return Ignored(event_type)
    issue_id = issue_id_of(hook)
    if issue_id is None:
        raise InvalidEvent(f"{event_type} event carries no issue id")
    if not is_issue_id(issue_id):
        if _ANY_DIGITS.match(issue_id):
            raise InvalidEvent(
                f"{event_type} event has issue id {issue_id[:40]!r}, beyond the largest one jiralake "
                f"can store ({MAX_ISSUE_ID})"
            )
        raise InvalidEvent(f"{event_type} event has a non-numeric issue id {issue_id[:40]!r}")
    # One spelling per issue: its FIFO group and row key (Jira never pads ids with zeros; others might).
    return Routed(event_type, str(int(issue_id)), event_time_ms(hook))


def issue_id_of(hook: JiraWebhook) -> str | None:
    """Where each event type keeps the issue id (NOTES.md section 2 and 8)."""
    if hook.issue is not None and hook.issue.id:
        return hook.issue.id
    if hook.worklog is not None and hook.worklog.issueId:
        return hook.worklog.issueId
    if hook.issueLink is not None and hook.issueLink.sourceIssueId:
        return hook.issueLink.sourceIssueId
    if hook.comment is not None and hook.comment.self_url:
        # Server/DC comment events carry no issue object, only .../issue/10013/comment/10082.
        match = _COMMENT_SELF.search(hook.comment.self_url)
        if match:
            return match[1]
    return None


def event_time_ms(hook: JiraWebhook) -> int | None:
    """The event's own time: ``timestamp`` (ms) when it is one, else the issue's ``updated`` time;
    None when the body has neither. Raises :class:`InvalidEvent` when the time it finds lies outside
    what the consumer can store (:func:`is_event_time_ms`)."""
    updated = hook.issue.fields.get("updated") if hook.issue is not None and hook.issue.fields else None
    return _event_time_ms(hook.timestamp, updated)


def _event_time_ms(timestamp: Any, updated: Any) -> int | None:
    ts = timestamp_ms(timestamp)
    if ts is not None:
        if not is_event_time_ms(ts):
            raise InvalidEvent(
                f"timestamp is more than {MAX_VERSION_MS} ms since the epoch (9999-12-31T23:59:59.999Z), "
                "the last time jiralake can store"
            )
        return ts
    updated_ms = parse_jira_time_ms(updated)
    if updated_ms is not None and not is_event_time_ms(updated_ms):
        raise InvalidEvent(
            f"issue.fields.updated {str(updated)[:40]!r} is outside the times jiralake can store "
            "(after 1970-01-01T00:00:00Z, up to 9999-12-31T23:59:59.999Z)"
        )
    return updated_ms


def timestamp_ms(ts: Any) -> int | None:
    """Jira's ``timestamp`` (ms since the epoch, a number or ASCII digits) when it is a positive one,
    else None. It may be too large to be a time: :func:`is_event_time_ms` tells."""
    if isinstance(ts, int) and not isinstance(ts, bool):
        return ts if ts > 0 else None
    if isinstance(ts, str) and _ANY_DIGITS.match(ts):
        digits = ts.lstrip("0")
        # Beyond 19 digits it is no time whatever the digits are: never int() an unbounded string.
        value = int(digits or "0") if len(digits) <= 19 else MAX_VERSION_MS + 1
        return value if value > 0 else None
    return None


def parse_jira_time(value: Any) -> datetime | None:
    """Jira's ``2019-02-15T19:01:52.971-0800`` (offset without colon) or ISO 8601; None if not a time."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def parse_jira_time_ms(value: Any) -> int | None:
    parsed = parse_jira_time(value)
    return None if parsed is None else int(parsed.timestamp() * 1000)


# -- the one-parse fast path (the receiver) --
#
# The same fields with the same types as JiraWebhook, but extra keys are skipped instead of rebuilt,
# and the free-form objects (issue.fields, changelog items, user) are only checked to be objects.


class _Object(BaseModel):
    """Any JSON object (what ``dict[str, Any]`` accepts from JSON), without building it."""

    model_config = ConfigDict(extra="ignore")


class _Slim(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _SlimFields(_Slim):
    updated: Any = None


class _SlimIssue(_Slim):
    id: IdText | None = None
    key: str | None = None
    fields: _SlimFields | None = None


class _SlimComment(_Slim):
    id: IdText | None = None
    self_url: str | None = Field(default=None, alias="self")


class _SlimWorklog(_Slim):
    id: IdText | None = None
    issueId: IdText | None = None


class _SlimIssueLink(_Slim):
    id: IdText | None = None
    sourceIssueId: IdText | None = None
    destinationIssueId: IdText | None = None


class _SlimChangelog(_Slim):
    id: IdText | None = None
    items: list[_Object] | None = None


class _SlimWebhook(_Slim):
    webhookEvent: str | None = None
    timestamp: Timestamp = None
    issue_event_type_name: str | None = None
    issue: _SlimIssue | None = None
    comment: _SlimComment | None = None
    worklog: _SlimWorklog | None = None
    issueLink: _SlimIssueLink | None = None
    changelog: _SlimChangelog | None = None
    user: _Object | None = None
    # Only their presence matters (Jira's bare user_deleted body).
    accountId: Any = None
    username: Any = None


# Tokens json.loads takes only through parse_constant (which the receiver refuses) but pydantic's
# JSON parser accepts: a body holding them anywhere, even inside a string, takes the full path.
_NON_JSON_TOKENS = ("NaN", "Infinity")


def route_json(
    text: str, accepted_prefixes: tuple[str, ...] = ISSUE_EVENT_PREFIXES
) -> Routed | Ignored | None:
    """``route(json.loads(text))`` in one parse that builds only what routing reads, for the bodies
    it accepts outright; None for every other body (not JSON, not an object, NaN, deeply nested, a
    field of the wrong type, an issue event without a usable id), for which the caller runs the full
    path that gives the exact reason. It never accepts a body that the full path refuses, and agrees
    with it on the event type, issue id and event time of every body it accepts."""
    if any(token in text for token in _NON_JSON_TOKENS):
        return None
    try:
        hook = _SlimWebhook.model_validate_json(text)
    except ValidationError:
        return None
    event_type = hook.webhookEvent
    if not event_type:
        present = hook.model_fields_set
        return Ignored("user_deleted" if "accountId" in present or "username" in present else "unknown")
    if not event_type.startswith(ISSUE_EVENT_PREFIXES) or not event_type.startswith(accepted_prefixes):
        return Ignored(event_type)
    issue_id = issue_id_of(hook)  # type: ignore[arg-type]  # same attribute names as JiraWebhook
    if issue_id is None or not is_issue_id(issue_id):
        return None
    # event_time_ms for the slim model: the same rules, reading issue.fields.updated.
    fields = hook.issue.fields if hook.issue is not None else None
    try:
        event_ts_ms = _event_time_ms(hook.timestamp, fields.updated if fields is not None else None)
    except InvalidEvent:
        return None
    return Routed(event_type, str(int(issue_id)), event_ts_ms)
