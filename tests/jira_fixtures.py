"""The real Jira webhook bodies in tests/fixtures/jira-webhooks (see SOURCES.md there), and a factory
that derives new events from them for ordering tests."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from shared.jira_event import Ignored, Routed, route

FIXTURES = Path(__file__).parent / "fixtures" / "jira-webhooks"


def names() -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.json"))


@cache
def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def load(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(raw(name))
    return body


def issue_fixtures() -> list[str]:
    """Every fixture that concerns an issue (it routes to an issue id)."""
    return [n for n in names() if isinstance(route(load(n)), Routed)]


def ignored_fixtures() -> list[str]:
    return [n for n in names() if isinstance(route(load(n)), Ignored)]


def make_event(
    name: str, *, issue_id: int | str | None = None, ts: int | None = None, **top: Any
) -> dict[str, Any]:
    """A copy of a real fixture with its issue id and/or timestamp replaced."""
    body = copy.deepcopy(load(name))
    if issue_id is not None:
        if isinstance(body.get("issue"), dict):
            body["issue"]["id"] = str(issue_id)
        if isinstance(body.get("worklog"), dict):
            body["worklog"]["issueId"] = str(issue_id)
        if isinstance(body.get("issueLink"), dict):
            body["issueLink"]["sourceIssueId"] = int(issue_id)
    if ts is not None:
        body["timestamp"] = ts
    body.update(top)
    return body
