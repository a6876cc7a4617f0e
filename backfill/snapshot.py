"""Envelopes jiralake makes itself: an issue snapshot (backfill) and a reconciled delete.

Both are ordinary messages on the one FIFO queue, so the consumer's ordering rules apply unchanged:

- A snapshot's body is ``{"webhookEvent": SNAPSHOT_EVENT, "timestamp": <updated ms>, "issue": <the
  issue as Jira returned it>}``; its version is the issue's ``updated`` time, so it never overwrites a
  newer webhook and repairs an older one. Its delivery id ``backfill:<id>:<updated ms>`` makes a
  re-sent version a duplicate, in SQS (5-minute dedup window) and in the history table.
- A reconciled delete's body is ``{"webhookEvent": RECONCILED_DELETE_EVENT, "timestamp": <now ms>,
  "issue": {"id", "key"}}``; its delivery id ``reconcile:deleted:<id>:<row version>`` names the row
  state it deletes (the ``version`` reconcile read), so running reconcile twice before the consumer
  caught up records the delete once, while an issue that came back (a newer webhook after a 404
  for lost access) and vanished again gets a delete of its own, recorded in the history like any.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shared.envelope import Envelope, sqs_safe_json
from shared.jira_event import (
    RECONCILED_DELETE_EVENT,
    SNAPSHOT_EVENT,
    InvalidEvent,
    Routed,
    parse_jira_time_ms,
    route,
)


class InvalidSnapshot(ValueError):
    """Jira returned an issue that cannot become a snapshot (no numeric id, no ``updated`` time)."""


def snapshot_envelope(issue: Mapping[str, Any], *, received_at_ms: int) -> Envelope:
    fields = issue.get("fields")
    updated_ms = parse_jira_time_ms(fields.get("updated")) if isinstance(fields, Mapping) else None
    if updated_ms is None:
        raise InvalidSnapshot(f"issue {str(issue.get('id'))[:40]} has no fields.updated time")
    body = _dumps({"webhookEvent": SNAPSHOT_EVENT, "timestamp": updated_ms, "issue": issue})
    issue_id = _routed_issue_id(body)
    return Envelope(
        body=body,
        event_type=SNAPSHOT_EVENT,
        issue_id=issue_id,
        event_ts_ms=updated_ms,
        received_at_ms=received_at_ms,
        delivery_id=f"backfill:{issue_id}:{updated_ms}",
    )


def reconciled_delete_envelope(
    issue_id: str, issue_key: str | None, *, row_version: int, now_ms: int
) -> Envelope:
    issue: dict[str, Any] = {"id": issue_id}
    if issue_key:
        issue["key"] = issue_key
    body = _dumps({"webhookEvent": RECONCILED_DELETE_EVENT, "timestamp": now_ms, "issue": issue})
    routed_id = _routed_issue_id(body)
    return Envelope(
        body=body,
        event_type=RECONCILED_DELETE_EVENT,
        issue_id=routed_id,
        event_ts_ms=now_ms,
        received_at_ms=now_ms,
        delivery_id=f"reconcile:deleted:{routed_id}:{row_version}",
    )


def _routed_issue_id(body: str) -> str:
    """The issue id exactly as the consumer will route it, or InvalidSnapshot."""
    try:
        routed = route(json.loads(body))
    except InvalidEvent as exc:
        raise InvalidSnapshot(str(exc)) from None
    assert isinstance(routed, Routed), "jiralake:issue_* events always route"
    return routed.issue_id


def _dumps(payload: Mapping[str, Any]) -> str:
    # Jira's `"\ud83d"` (half an emoji) decodes to a lone surrogate, which neither UTF-8 nor SQS
    # takes: written back as that escape, as the webhook carries it.
    return sqs_safe_json(json.dumps(payload, ensure_ascii=False, separators=(",", ":")))
