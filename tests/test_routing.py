"""Routing every real fixture: which issue it concerns, or that it concerns none."""

from __future__ import annotations

import pytest

from shared.jira_event import Ignored, InvalidEvent, Routed, parse_jira_time_ms, route
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
