"""One queued message as the consumer sees it: what it may change and where it sorts.

Event kinds (docs/consumer.md):
- field-carrying (:data:`FIELD_EVENTS`) with a *full* issue object: may set the field columns;
- deletes (:data:`DELETE_EVENTS`): set ``deleted_version`` / ``deleted_at``;
- everything else (comment_*, worklog_*, issuelink_*, attachment_*, slim issue objects, unknown
  issue events): history only, never touches ``ap_jira_task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from consumer.issue_row import IssueRow, is_full, is_full_delete, issue_row, user_id
from consumer.ordering import tiebreak_for, version_time
from consumer.outcomes import InvalidMessage
from shared import strict_json
from shared.envelope import Envelope
from shared.jira_event import (
    RECONCILED_DELETE_EVENT,
    SNAPSHOT_EVENT,
    Ignored,
    is_event_time_ms,
    is_issue_id,
    route,
)

FIELD_EVENTS = frozenset(
    {"jira:issue_created", "jira:issue_updated", "jira:worklog_updated", "jira:issue_deleted", SNAPSHOT_EVENT}
)
DELETE_EVENTS = frozenset({"jira:issue_deleted", RECONCILED_DELETE_EVENT})
SOURCES = {SNAPSHOT_EVENT: "backfill", RECONCILED_DELETE_EVENT: "reconcile"}
WEBHOOK_SOURCE = "webhook"


@dataclass(frozen=True)
class ConsumerEvent:
    delivery_id: str
    issue_id: int
    event_type: str
    issue_event_type_name: str | None
    version: int
    tiebreak: str
    event_at: datetime
    received_at: datetime | None
    source: str
    changelog: list[Any] | None
    actor_account_id: str | None
    actor_display_name: str | None
    # The field columns, when this event may set them (field-carrying type and a full issue object).
    row: IssueRow | None
    deletes: bool
    # The message body as received (JSON text): PostgreSQL reads ``raw`` from it (consumer/apply.py).
    body: str = field(repr=False)

    @property
    def order_key(self) -> tuple[int, str]:
        return (self.version, self.tiebreak)

    @property
    def touches_row(self) -> bool:
        return self.row is not None or self.deletes


def parse_envelope(envelope: Envelope) -> ConsumerEvent:
    """Raises :class:`InvalidMessage` (or ``InvalidEvent``) when the message can never be applied."""
    if not is_issue_id(envelope.issue_id):
        raise InvalidMessage(f"issue_id attribute {envelope.issue_id[:40]!r} is not a Jira issue id")
    if not is_event_time_ms(envelope.event_ts_ms):
        raise InvalidMessage(f"event_ts_ms attribute {envelope.event_ts_ms} is not a time in ms")
    try:
        payload = decode_json(envelope.body)
        tiebreak = tiebreak_for(_changelog(payload).get("id"), envelope.body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeError, too deeply nested
        raise InvalidMessage(f"body is not valid JSON: {type(exc).__name__}: {exc}") from None
    routed = route(payload)
    if isinstance(routed, Ignored):
        raise InvalidMessage(f"event {routed.event_type!r} concerns no issue")
    if routed.issue_id != envelope.issue_id:
        raise InvalidMessage(f"body concerns issue {routed.issue_id}, attributes say {envelope.issue_id}")
    if routed.event_type != envelope.event_type:
        raise InvalidMessage(f"body is a {routed.event_type!r} event, attributes say {envelope.event_type!r}")
    # The attribute orders the event (its version). Every jiralake producer sets it to the body's own
    # time when the body has one (else to when it was received or found), so a disagreement is another
    # producer's error, which would otherwise win or lose against newer state by a time Jira never sent.
    if routed.event_ts_ms is not None and routed.event_ts_ms != envelope.event_ts_ms:
        raise InvalidMessage(
            f"body's time is {routed.event_ts_ms} ms since the epoch, attributes say {envelope.event_ts_ms}"
        )
    issue = payload.get("issue")
    deletes = routed.event_type in DELETE_EVENTS
    full = is_full_delete(issue) if deletes else is_full(issue)
    row = issue_row(issue) if routed.event_type in FIELD_EVENTS and full else None
    actor = _actor(payload)
    items = _changelog(payload).get("items")
    name = payload.get("issue_event_type_name")
    return ConsumerEvent(
        delivery_id=envelope.delivery_id,
        issue_id=int(envelope.issue_id),
        event_type=routed.event_type,
        issue_event_type_name=name if isinstance(name, str) else None,
        version=envelope.event_ts_ms,
        tiebreak=tiebreak,
        event_at=version_time(envelope.event_ts_ms),
        received_at=(
            version_time(envelope.received_at_ms) if is_event_time_ms(envelope.received_at_ms) else None
        ),
        source=SOURCES.get(routed.event_type, WEBHOOK_SOURCE),
        changelog=items if isinstance(items, list) else None,
        actor_account_id=user_id(actor),
        actor_display_name=actor.get("displayName") if isinstance(actor.get("displayName"), str) else None,
        row=row,
        deletes=deletes,
        body=envelope.body,
    )


def decode_json(body: str) -> Any:
    """The body as Python values; raises ``ValueError`` when it is not JSON.

    orjson parses a 4-47 KB webhook three to four times faster than the standard library, which was
    the largest part of the consumer's CPU per event (docs/benchmarks.md). What orjson refuses but
    the standard parser may take (unpaired surrogate escapes) goes to the standard parser
    (:mod:`shared.strict_json`), so the
    set of bodies accepted is the same; both reject NaN and Infinity. One difference remains: an
    integer beyond 64 bits reads as a float rather than an int, and no column takes such a number.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return strict_json.loads(body)


def _changelog(payload: Any) -> dict[str, Any]:
    changelog = payload.get("changelog") if isinstance(payload, dict) else None
    return changelog if isinstance(changelog, dict) else {}


def _actor(payload: dict[str, Any]) -> dict[str, Any]:
    """Who caused the event: ``user`` on issue events; a comment's or worklog's (update) author otherwise."""
    candidates: list[Any] = [payload.get("user")]
    for holder in ("comment", "worklog"):
        obj = payload.get(holder)
        if isinstance(obj, dict):
            candidates += [obj.get("updateAuthor"), obj.get("author")]
    for candidate in candidates:
        if isinstance(candidate, dict) and candidate:
            return candidate
    return {}
