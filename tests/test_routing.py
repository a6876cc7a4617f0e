"""Routing every real fixture: which issue it concerns, or that it concerns none."""

from __future__ import annotations

import json
import re

import pytest

from shared.jira_event import (
    MAX_ISSUE_ID,
    MAX_VERSION_MS,
    Ignored,
    InvalidEvent,
    Routed,
    parse_jira_time_ms,
    route,
    route_json,
)
from tests import jira_fixtures

EXPECTED_ISSUE = {
    "jira-to-matrix__comment_created.json": "26313",
    "mattermost-plugin-jira__webhook-server-comment-created.json": "10013",
    "zulip__worklog_created.json": "10014",
    "pinpoint-jira__issuelink_created.json": "20192",
    "zulip__attachment_created.json": "10000",
    "pinpoint-jira__jira_issue_updated.project.json": "19518",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ISSUE))
def test_issue_id_is_found_where_each_event_type_keeps_it(name: str) -> None:
    routed = route(jira_fixtures.load(name))
    assert isinstance(routed, Routed)
    assert routed.issue_id == EXPECTED_ISSUE[name]


def test_every_fixture_either_routes_to_a_numeric_issue_or_is_ignored() -> None:
    kinds = {n: route(jira_fixtures.load(n)) for n in jira_fixtures.names()}
    routed = {n for n, r in kinds.items() if isinstance(r, Routed)}
    ignored = {n: r.event_type for n, r in kinds.items() if isinstance(r, Ignored)}
    assert len(routed) + len(ignored) == len(kinds) == 66
    assert all(kinds[n].issue_id.isdigit() for n in routed)  # type: ignore[union-attr]
    assert ignored["pinpoint-jira__user_deleted.json"] == "user_deleted"
    assert ignored["zulip__example_anomalous_payload.json"] == "user_deleted"
    assert {e.split("_")[0] for e in ignored.values()} == {"board", "project", "sprint", "user"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([1, 2], "body must be a JSON object, got list"),
        ({"webhookEvent": "jira:issue_updated", "issue": {"key": "A-1"}}, "carries no issue id"),
        ({"webhookEvent": "jira:issue_updated", "issue": {"id": "A-1"}}, "non-numeric issue id"),
        (
            {"webhookEvent": "comment_created", "comment": {"self": "https://x/comment/1"}},
            "carries no issue id",
        ),
    ],
)
def test_unroutable_issue_events_are_rejected_with_a_reason(payload: object, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        route(payload)


def test_jira_times_parse_with_colonless_offsets() -> None:
    assert parse_jira_time_ms("2019-02-15T19:01:52.971-0800") == 1550286112971
    assert parse_jira_time_ms("2020-07-07T00:37:08.707Z") == 1594082228707
    assert parse_jira_time_ms("30/Mar/18") is None


def _issue_event(issue: dict[str, object], **body: object) -> dict[str, object]:
    return {"webhookEvent": "jira:issue_updated", **body, "issue": issue}


TOO_LATE = f"is more than {MAX_VERSION_MS} ms since the epoch"
OUT_OF_RANGE = "is outside the times jiralake can store"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_issue_event({"id": "9223372036854775808"}, timestamp=1),
         "has issue id '9223372036854775808', beyond the largest one jiralake can store"),
        (_issue_event({"id": "9999999999999999999"}, timestamp=1), "beyond the largest one"),
        (_issue_event({"id": 10**30}, timestamp=1), "beyond the largest one"),
        (_issue_event({"id": "1"}, timestamp=MAX_VERSION_MS + 1), TOO_LATE),
        (_issue_event({"id": "1"}, timestamp=10**40), TOO_LATE),
        (_issue_event({"id": "1"}, timestamp=10**200), TOO_LATE),
        (_issue_event({"id": "1"}, timestamp="9" * 30), TOO_LATE),
        (_issue_event({"id": "1", "fields": {"updated": "0001-01-01T00:00:00.000+1400"}}),
         f"issue.fields.updated '0001-01-01T00:00:00.000+1400' {OUT_OF_RANGE}"),
        (_issue_event({"id": "1", "fields": {"updated": "9999-12-31T23:59:59.999-1400"}}), OUT_OF_RANGE),
        (_issue_event({"id": "1", "fields": {"updated": "1969-12-31T23:59:59.999Z"}}), OUT_OF_RANGE),
        (_issue_event({"id": "1", "fields": {"updated": "1970-01-01T00:00:00.000Z"}}, timestamp=0),
         OUT_OF_RANGE),
    ],
    ids=[
        "id-2^63", "id-19-nines", "id-30-digits", "ts-max+1", "ts-1e40", "ts-1e200", "ts-30-digit-string",
        "updated-year-1", "updated-year-9999-west", "updated-1969", "updated-epoch-no-ts",
    ],
)  # fmt: skip
def test_events_the_consumer_could_never_store_are_refused(payload: object, reason: str) -> None:
    # The consumer stores the issue id as a bigint and orders by the event time in ms, which must lie
    # after the epoch and by 9999-12-31T23:59:59.999Z (consumer/event.py parse_envelope).
    with pytest.raises(InvalidEvent, match=re.escape(reason)):
        route(payload)


@pytest.mark.parametrize(
    ("payload", "event_ts_ms"),
    [
        (_issue_event({"id": str(MAX_ISSUE_ID)}, timestamp=MAX_VERSION_MS), MAX_VERSION_MS),
        (_issue_event({"id": "1"}, timestamp="000000000000000000000001"), 1),
        (_issue_event({"id": "1", "fields": {"updated": "9999-12-31T23:59:59.999Z"}}), MAX_VERSION_MS),
        (_issue_event({"id": "1", "fields": {"updated": "1970-01-01T00:00:00.001Z"}}), 1),
        # A timestamp that is no time falls back to the updated time; one that is a time wins.
        (_issue_event({"id": "1", "fields": {"updated": "2020-07-07T00:37:08.707Z"}}, timestamp=-5),
         1594082228707),
        (_issue_event({"id": "1", "fields": {"updated": "2020-07-07T00:37:08.707Z"}}, timestamp=True),
         1594082228707),
        (_issue_event({"id": "1", "fields": {"updated": "0001-01-01T00:00:00.000+1400"}}, timestamp=7), 7),
        # Nor is a fraction, an object or a list: the event is kept, at its updated time.
        (_issue_event({"id": "1", "fields": {"updated": "2020-07-07T00:37:08.707Z"}}, timestamp=1.5),
         1594082228707),
        (_issue_event({"id": "1", "fields": {"updated": "2020-07-07T00:37:08.707Z"}}, timestamp={"ms": 1}),
         1594082228707),
        (_issue_event({"id": "1", "fields": {"updated": "2020-07-07T00:37:08.707Z"}}, timestamp=[1]),
         1594082228707),
        (_issue_event({"id": "1"}, timestamp=1594082228707.0), 1594082228707),
    ],
    ids=["largest-id-and-time", "zero-padded-ts", "updated-last-ms", "updated-first-ms", "ts-negative",
         "ts-true", "ts-wins", "ts-fraction", "ts-object", "ts-list", "ts-whole-float"],
)  # fmt: skip
def test_the_bounds_themselves_are_accepted(payload: object, event_ts_ms: int) -> None:
    routed = route(payload)
    assert isinstance(routed, Routed)
    assert routed.event_ts_ms == event_ts_ms
    # AND the receiver's one-parse path agrees, or leaves the body to the full path
    key = route_json(json.dumps(payload))
    assert key is None or (isinstance(key, Routed) and key.event_ts_ms == event_ts_ms)


def test_an_issue_id_padded_with_zeros_routes_as_the_same_issue() -> None:
    # One FIFO group and one row per issue, however a producer spells its id
    padded = _issue_event({"id": "0010013"}, timestamp=5)
    routed = route(padded)
    assert isinstance(routed, Routed) and routed.issue_id == "10013"
    key = route_json(json.dumps(padded))
    assert isinstance(key, Routed) and key.issue_id == "10013"
