"""route_json (the receiver's one-parse routing) agrees with route(json.loads(...)) on every body it
answers, and never accepts a body the full path refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.jira_event import (
    MAX_ISSUE_ID,
    MAX_VERSION_MS,
    Ignored,
    InvalidEvent,
    Routed,
    route,
    route_json,
)
from tests import jira_fixtures


def _full(text: str) -> Routed | Ignored | str:
    try:
        return route(json.loads(text, parse_constant=_refuse))
    except (ValueError, InvalidEvent) as exc:
        return f"refused: {type(exc).__name__}"


def _refuse(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


@pytest.mark.parametrize("name", jira_fixtures.names())
def test_every_real_fixture_takes_the_fast_path_with_the_same_answer(name: str) -> None:
    text = jira_fixtures.raw(name).decode("utf-8")
    assert route_json(text) == _full(text)


# Around the largest issue id the consumer can store (a bigint), as numbers and as text.
near_max_id = st.integers(min_value=MAX_ISSUE_ID - 2, max_value=MAX_ISSUE_ID + 2)
ids = st.one_of(
    st.none(),
    st.integers(min_value=-5, max_value=10**20),
    near_max_id,
    near_max_id.map(str),
    st.text(alphabet="0123456789A- ", max_size=22),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.floats(allow_nan=False),
)
# Jira times from year 1 to 9999 at offsets up to +-14:00: the extremes fall outside the times the
# consumer can store, in UTC, on either side.
jira_times = st.builds(
    lambda year, offset: f"{year:04d}-{'01-01T00:00' if year < 5000 else '12-31T23:59'}:59.999{offset}",
    st.sampled_from([1, 1969, 1970, 2024, 9999]),
    st.sampled_from(["Z", "+1400", "-1400", "+0000"]),
)
near_max_time = st.integers(min_value=MAX_VERSION_MS - 1, max_value=MAX_VERSION_MS + 1)
times = st.one_of(
    st.none(),
    st.integers(min_value=-1, max_value=2**63),
    near_max_time,
    near_max_time.map(str),
    st.sampled_from([10**40, 10**200, "9" * 30]),
    jira_times,
    st.text(max_size=12),
    st.floats(),
    st.booleans(),
)
events = st.sampled_from(
    [
        "jira:issue_updated",
        "comment_created",
        "worklog_created",
        "issuelink_deleted",
        "sprint_started",
        "",
        None,
    ]
)


@st.composite
def bodies(draw: st.DrawFn) -> str:
    body: dict[str, Any] = {}
    if (event := draw(events)) is not None:
        body["webhookEvent"] = event
    if draw(st.booleans()):
        body["timestamp"] = draw(times)
    if draw(st.booleans()):
        fields = draw(st.one_of(st.none(), st.just({}), st.fixed_dictionaries({"updated": times})))
        body["issue"] = draw(
            st.one_of(st.just("x"), st.fixed_dictionaries({"id": ids, "fields": st.just(fields)}))
        )
    if draw(st.booleans()):
        body["worklog"] = {"issueId": draw(ids)}
    if draw(st.booleans()):
        body["issueLink"] = {"sourceIssueId": draw(ids)}
    if draw(st.booleans()):
        body["comment"] = {
            "self": draw(st.sampled_from(["https://j/rest/api/2/issue/10013/comment/1", "x", 5]))
        }
    if draw(st.booleans()):
        body["accountId"] = "557058:abc"
    text = json.dumps(body)
    return draw(st.sampled_from([text, text[:-1], "[" + text + "]", text.replace("{", '{"n": NaN, ', 1)]))


@settings(max_examples=300, deadline=None)
@given(bodies())
def test_the_fast_path_never_disagrees_with_the_full_path(text: str) -> None:
    fast = route_json(text)
    if fast is not None:
        assert fast == _full(text)
