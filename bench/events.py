"""Benchmark events: real Jira webhook bodies (tests/fixtures/jira-webhooks) with varied issue ids,
timestamps and delivery ids, as raw bodies (for the receiver) or envelopes (for the consumer).

Two mixes:
- ``full_issue``: the issue created/updated webhooks that carry a full issue object, so each event
  rewrites one ``ap_jira_task`` row (the consumer apply stage compares "the same rows");
- ``all``: every fixture that concerns an issue (comments, links, worklogs, attachments too), the
  shape of real webhook traffic (the receiver and end-to-end stages).
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from shared.envelope import Envelope
from shared.jira_event import Routed, route

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "jira-webhooks"
FULL_ISSUE_EVENTS = ("jira:issue_created", "jira:issue_updated")
FULL_ISSUE_FIELDS = ("created", "status", "issuetype", "project")
# 2023-11-14T22:13:20Z: newer than any fixture, so benchmark events win over the pre-filled rows.
BASE_TS_MS = 1_700_000_000_000


@dataclass(frozen=True)
class Template:
    name: str
    payload: dict[str, Any]
    event_type: str


def _has_full_issue(payload: dict[str, Any]) -> bool:
    issue = payload.get("issue")
    if not isinstance(issue, dict) or not isinstance(issue.get("key"), str):
        return False
    fields = issue.get("fields")
    return isinstance(fields, dict) and all(fields.get(f) is not None for f in FULL_ISSUE_FIELDS)


@cache
def templates(mix: str) -> tuple[Template, ...]:
    found = []
    for path in sorted(FIXTURES.glob("*.json")):
        payload = json.loads(path.read_bytes())
        routed = route(payload)
        if not isinstance(routed, Routed):
            continue
        if mix == "full_issue" and not (routed.event_type in FULL_ISSUE_EVENTS and _has_full_issue(payload)):
            continue
        found.append(Template(path.name, payload, routed.event_type))
    if not found:
        raise RuntimeError(f"no fixtures for mix {mix!r} in {FIXTURES}")
    return tuple(found)


def body_for(template: Template, *, issue_id: int, ts_ms: int) -> dict[str, Any]:
    """A copy of the fixture about ``issue_id`` at ``ts_ms`` (the same fields make_event replaces)."""
    body = copy.deepcopy(template.payload)
    if isinstance(body.get("issue"), dict):
        body["issue"]["id"] = str(issue_id)
    if isinstance(body.get("worklog"), dict):
        body["worklog"]["issueId"] = str(issue_id)
    if isinstance(body.get("issueLink"), dict):
        body["issueLink"]["sourceIssueId"] = issue_id
    comment = body.get("comment")
    if isinstance(comment, dict) and isinstance(comment.get("self"), str) and "issue" not in body:
        # Comment events without an issue object name the issue in the comment's URL.
        comment["self"] = _replace_issue_in_url(comment["self"], issue_id)
    body["timestamp"] = ts_ms
    return body


def _replace_issue_in_url(url: str, issue_id: int) -> str:
    head, sep, tail = url.partition("/issue/")
    if not sep:
        return url
    _, slash, rest = tail.partition("/")
    return f"{head}/issue/{issue_id}{slash}{rest}"


@dataclass(frozen=True)
class Webhook:
    """One request body as Jira would send it, with its delivery id."""

    body: bytes
    delivery_id: str
    issue_id: int
    ts_ms: int


def webhooks(mix: str, count: int, *, first_issue_id: int, issue_ids: int, ts_ms: int) -> Iterator[Webhook]:
    """``count`` webhooks cycling through the mix; issue ids cycle over ``issue_ids`` ids from
    ``first_issue_id``; timestamps rise by 1 ms from ``ts_ms``; delivery ids are unique."""
    chosen = templates(mix)
    for i in range(count):
        template = chosen[i % len(chosen)]
        issue_id = first_issue_id + (i % issue_ids)
        ts = ts_ms + i
        body = json.dumps(body_for(template, issue_id=issue_id, ts_ms=ts), ensure_ascii=False)
        yield Webhook(body.encode("utf-8"), f"bench-{uuid.uuid4().hex}", issue_id, ts)


def envelope_of(hook: Webhook, *, received_at_ms: int | None = None) -> Envelope:
    """The envelope the receiver would queue for this webhook (receiver/intake.py)."""
    text = hook.body.decode("utf-8")
    routed = route(json.loads(text))
    assert isinstance(routed, Routed)
    return Envelope(
        body=text,
        event_type=routed.event_type,
        issue_id=routed.issue_id,
        event_ts_ms=routed.event_ts_ms if routed.event_ts_ms is not None else hook.ts_ms,
        received_at_ms=received_at_ms if received_at_ms is not None else hook.ts_ms + 50,
        delivery_id=hook.delivery_id,
    )


def envelopes(mix: str, count: int, *, first_issue_id: int, issue_ids: int, ts_ms: int) -> list[Envelope]:
    return [
        envelope_of(h)
        for h in webhooks(mix, count, first_issue_id=first_issue_id, issue_ids=issue_ids, ts_ms=ts_ms)
    ]
