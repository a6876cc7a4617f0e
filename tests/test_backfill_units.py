"""Backfill's pure parts: settings, JQL, Retry-After and X-RateLimit-Reset, progress output."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from backfill.jira_retry import (
    RequestedWait,
    RetryPolicy,
    loggable_reason,
    parse_rate_limit_reset,
    parse_retry_after,
    requested_wait,
)
from backfill.jql import build_jql, jira_zone, jql_time, parse_since, split_order_by
from backfill.progress import Progress, format_duration
from backfill.settings import JiraSettings
from shared.settings import ConfigError

CLOUD_ENV = {
    "JIRALAKE_JIRA_URL": "https://acme.atlassian.net/",
    "JIRALAKE_JIRA_EMAIL": "bot@acme.example",
    "JIRALAKE_JIRA_API_TOKEN": "ATATT3xFfGF0-secret-token",
}


# -- settings --


def test_email_and_api_token_mean_cloud_and_stay_out_of_repr() -> None:
    settings = JiraSettings.from_env(CLOUD_ENV)
    assert (settings.url, settings.deployment, settings.api_version) == (
        "https://acme.atlassian.net",
        "cloud",
        "3",
    )
    assert "ATATT3xFfGF0" not in repr(settings)


def test_a_personal_access_token_means_data_center_and_stays_out_of_repr() -> None:
    settings = JiraSettings.from_env(
        {"JIRALAKE_JIRA_URL": "https://jira.acme.example/jira", "JIRALAKE_JIRA_PAT": "NjM0-pat"}
    )
    assert (settings.url, settings.deployment, settings.api_version) == (
        "https://jira.acme.example/jira",
        "datacenter",
        "2",
    )
    assert "NjM0-pat" not in repr(settings)


def test_the_deployment_can_be_forced() -> None:
    env = dict(CLOUD_ENV, JIRALAKE_JIRA_DEPLOYMENT="datacenter")
    assert JiraSettings.from_env(env).deployment == "datacenter"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "JIRALAKE_JIRA_URL is not set"),
        ({"JIRALAKE_JIRA_URL": "https://a.atlassian.net"}, "no Jira credentials"),
        (
            {"JIRALAKE_JIRA_URL": "https://a.atlassian.net", "JIRALAKE_JIRA_EMAIL": "x@y"},
            "JIRALAKE_JIRA_API_TOKEN is not",
        ),
        (
            {"JIRALAKE_JIRA_URL": "https://a.atlassian.net", "JIRALAKE_JIRA_API_TOKEN": "t"},
            "JIRALAKE_JIRA_EMAIL is not",
        ),
        (dict(CLOUD_ENV, JIRALAKE_JIRA_PAT="p"), "not both"),
        (dict(CLOUD_ENV, JIRALAKE_JIRA_URL="acme.atlassian.net"), "must be an http"),
        (dict(CLOUD_ENV, JIRALAKE_JIRA_URL="https://u:pw@acme.atlassian.net"), "must not carry credentials"),
        (dict(CLOUD_ENV, JIRALAKE_JIRA_DEPLOYMENT="onprem"), "must be auto, cloud or datacenter"),
        (dict(CLOUD_ENV, JIRALAKE_JIRA_URL="http://jira.acme.example"), "plain http: the Jira credentials"),
        (
            dict(CLOUD_ENV, JIRALAKE_JIRA_URL="http://jira.acme.example", JIRALAKE_JIRA_ALLOW_HTTP="no"),
            "set JIRALAKE_JIRA_ALLOW_HTTP=true for a Jira reached only over a trusted network",
        ),
        (dict(CLOUD_ENV, JIRALAKE_JIRA_PAGE_SIZE="500"), "must be <= 100"),
    ],
)
def test_bad_jira_settings_name_the_problem(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JiraSettings.from_env(env)


@pytest.mark.parametrize(
    ("url", "allow_http"),
    [
        ("https://jira.acme.example", None),
        ("http://127.0.0.1:8080", None),
        ("http://localhost:8080/jira", None),
        ("http://[::1]:8080", None),
        ("http://jira.internal.example", "true"),
    ],
)
def test_plain_http_is_taken_on_loopback_or_when_allowed(url: str, allow_http: str | None) -> None:
    env = dict(CLOUD_ENV, JIRALAKE_JIRA_URL=url)
    if allow_http is not None:
        env["JIRALAKE_JIRA_ALLOW_HTTP"] = allow_http
    assert JiraSettings.from_env(env).url == url


def test_a_jira_url_that_does_not_parse_is_not_repeated() -> None:
    # "me:TOKEN@jira.example" parses as scheme "me": repeating the value would print the token
    with pytest.raises(ConfigError) as refused:
        JiraSettings.from_env(dict(CLOUD_ENV, JIRALAKE_JIRA_URL="me:S3cretToken@jira.example"))
    assert "S3cretToken" not in str(refused.value)


# -- JQL --


def test_the_default_query_is_bounded_and_ordered_by_creation() -> None:
    assert build_jql(None) == "project IS NOT EMPTY ORDER BY created ASC"
    assert build_jql("  ") == "project IS NOT EMPTY ORDER BY created ASC"


def test_an_operator_order_is_kept_and_the_bound_goes_before_it() -> None:
    since = datetime(2024, 5, 1, 6, 30, 59, tzinfo=UTC)
    assert build_jql(
        "project = OPS order by key desc", updated_since=since, zone=ZoneInfo("Asia/Kolkata")
    ) == ('(project = OPS) AND updated >= "2024-05-01 12:00" ORDER BY key desc')


def test_order_by_inside_a_quoted_string_is_not_an_order_clause() -> None:
    assert split_order_by('summary ~ "order by me" ORDER BY created') == (
        'summary ~ "order by me"',
        "created",
    )
    assert split_order_by("summary ~ 'sort order by'") == ("summary ~ 'sort order by'", None)


def test_an_unknown_zone_moves_the_bound_fourteen_hours_earlier() -> None:
    assert jira_zone("Mars/Olympus_Mons") is None
    assert jira_zone(None) is None
    assert jira_zone("Europe") is None  # a folder of zones
    assert jira_zone("A" * 300) is None  # longer than a file name may be
    assert jql_time(datetime(2024, 5, 1, 20, 0, tzinfo=UTC), None) == "2024-05-01 06:00"


@pytest.mark.parametrize(
    ("instant", "expected"),
    [
        # Berlin, 27 Oct 2024: 02:00-03:00 local happens twice (00:00-01:00 UTC, then 01:00-02:00 UTC)
        (datetime(2024, 10, 26, 23, 59, tzinfo=UTC), "2024-10-27 01:59"),  # before: as it is
        (datetime(2024, 10, 27, 0, 30, tzinfo=UTC), "2024-10-27 01:30"),  # first pass: an hour back
        (datetime(2024, 10, 27, 1, 30, tzinfo=UTC), "2024-10-27 02:30"),  # second pass: as it is
        (datetime(2024, 10, 27, 2, 0, tzinfo=UTC), "2024-10-27 03:00"),
    ],
)
def test_a_bound_in_the_repeated_hour_is_not_after_the_instant_whichever_pass_jira_reads(
    instant: datetime, expected: str
) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    text = jql_time(instant, berlin)
    assert text == expected
    wall = datetime.strptime(text, "%Y-%m-%d %H:%M")
    assert all(wall.replace(tzinfo=berlin, fold=fold) <= instant for fold in (0, 1))


@pytest.mark.parametrize(
    "text", ["0001-01-01", "1969-12-31T23:00:00Z", "0001-01-01T00:00:00+05:00", "9999-12-31"]
)
def test_updated_since_outside_jira_s_time_is_refused_not_overflowed(text: str) -> None:
    with pytest.raises(ValueError, match="--updated-since must lie between 1970 and 9998"):
        parse_since(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-01T08:30:00Z", datetime(2024, 5, 1, 8, 30, tzinfo=UTC)),
        ("2024-05-01 08:30", datetime(2024, 5, 1, 8, 30, tzinfo=UTC)),
        ("2024-05-01T08:30:00+02:00", datetime(2024, 5, 1, 8, 30, tzinfo=timezone(timedelta(hours=2)))),
    ],
)
def test_updated_since_accepts_dates_and_iso_times(text: str, expected: datetime) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "2024-13-01", "01/05/2024", ""])
def test_updated_since_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="--updated-since must be a date"):
        parse_since(text)


# -- retry policy --


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert (
        parse_retry_after(
            "Wed, 01 May 2024 10:00:30 GMT", now_s=datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp()
        )
        == 30.0
    )
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_retry_after_wins_over_backoff_and_is_capped() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=60.0, max_retry_after_s=600.0)
    rng = random.Random(1)
    assert 30.0 <= policy.delay_s(0, 30.0, rng) <= 33.0
    assert 600.0 <= policy.delay_s(0, 86_400.0, rng) <= 660.0
    # Without Retry-After: between half the ceiling and the ceiling, the ceiling doubling up to max_s.
    for attempt, ceiling in [(0, 1.0), (3, 8.0), (10, 60.0)]:
        assert ceiling / 2 <= policy.delay_s(attempt, None, rng) <= ceiling


# The instant the rate-limit tests call now: 2024-05-01 10:00:00 UTC.
NOW_S = datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "reset",
    [
        "2024-05-01T10:00:30Z",
        "2024-05-01T10:00:30.000Z",
        "2024-05-01T12:00:30+02:00",
        "2024-05-01T07:30:30-02:30",
    ],
)
def test_x_ratelimit_reset_is_read_as_the_seconds_until_an_iso_time(reset: str) -> None:
    assert parse_rate_limit_reset(reset, now_s=NOW_S) == 30.0


@pytest.mark.parametrize(
    "reset",
    [
        None,
        "",
        "2024-05-01T09:59:59Z",  # in the past
        "2024-05-01T10:00:00Z",  # now: no wait to honour
        "2024-05-01T10:00:30",  # no zone: which 10:00 is unknown
        "1714557630",  # epoch seconds are not ISO 8601
        "soon",
    ],
)
def test_a_reset_that_is_absent_past_or_garbage_means_back_off(reset: str | None) -> None:
    assert parse_rate_limit_reset(reset, now_s=NOW_S) is None
    headers = {} if reset is None else {"X-RateLimit-Reset": reset}
    assert requested_wait(429, headers, now_s=NOW_S) is None
    rng = random.Random(1)
    assert 0.5 <= RetryPolicy(base_s=1.0).delay_s(0, None, rng) <= 1.0


def test_a_429_with_only_x_ratelimit_reset_waits_until_the_reset_capped_and_jittered() -> None:
    # GIVEN Jira Cloud's 429 without Retry-After
    headers = {"X-RateLimit-Reset": "2024-05-01T10:00:30Z", "RateLimit-Reason": "jira-burst-based"}
    # WHEN the wait is decided
    requested = requested_wait(429, headers, now_s=NOW_S)
    # THEN it is the time to the reset, with Retry-After's jitter and cap
    assert requested == RequestedWait(30.0, "X-RateLimit-Reset")
    policy, rng = RetryPolicy(max_retry_after_s=600.0), random.Random(1)
    assert 30.0 <= policy.delay_s(0, requested.seconds, rng) <= 33.0
    far = requested_wait(429, {"X-RateLimit-Reset": "2024-05-01T12:00:00Z"}, now_s=NOW_S)
    assert far == RequestedWait(7200.0, "X-RateLimit-Reset")
    assert 600.0 <= policy.delay_s(0, far.seconds, rng) <= 660.0


def test_retry_after_wins_over_x_ratelimit_reset_when_usable() -> None:
    reset = {"X-RateLimit-Reset": "2024-05-01T10:00:30Z"}
    both = requested_wait(429, {**reset, "Retry-After": "5"}, now_s=NOW_S)
    assert both == RequestedWait(5.0, "Retry-After")
    # a Retry-After that is no wait gives way to the reset
    for unusable in ("soon", "nan", "inf", ""):
        assert requested_wait(429, {**reset, "Retry-After": unusable}, now_s=NOW_S) == RequestedWait(
            30.0, "X-RateLimit-Reset"
        )


def test_x_ratelimit_reset_is_read_only_on_a_429() -> None:
    # a 503 says Jira is unwell; when a quota renews says nothing about when it recovers
    headers = {"X-RateLimit-Reset": "2024-05-01T10:00:30Z"}
    assert requested_wait(503, headers, now_s=NOW_S) is None
    assert requested_wait(503, {**headers, "Retry-After": "3"}, now_s=NOW_S) == RequestedWait(
        3.0, "Retry-After"
    )


def test_only_a_ratelimit_reason_shaped_like_atlassian_s_is_logged() -> None:
    assert loggable_reason(None) is None
    assert loggable_reason(" jira-quota-tenant-based ") == "jira-quota-tenant-based"
    for hostile in ("ATATT3xFfGF0-secret-token", "Bearer NjM0-pat", "x\nevent=forged", "a" * 200):
        assert loggable_reason(hostile) == "unrecognised"


# -- progress --


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_on_a_terminal_progress_is_a_redrawn_bar_with_rate_and_eta() -> None:
    # GIVEN a terminal and a run resumed at 100 of 400 issues
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(total=400, done=100, stream=stream, tty=True, clock=clock, width=10)
    # WHEN 100 more arrive over 4 seconds
    clock.now += 4.0
    progress.advance(100)
    # THEN the line shows the bar, the count, this process's rate and the time left
    assert stream.getvalue() == "\r[#####-----] 200/400 issues  25.0/s  ETA 8s\x1b[K"
    progress.finish()
    assert stream.getvalue().endswith("\n")


def test_off_a_terminal_progress_is_a_log_line_at_most_every_interval() -> None:
    clock = FakeClock()
    with capture_logs() as logs:
        progress = Progress(total=None, stream=io.StringIO(), tty=False, clock=clock, log_interval_s=10.0)
        clock.now += 1.0
        progress.advance(50)
        clock.now += 1.0
        progress.advance(50)  # within the interval: no line
        clock.now += 10.0
        progress.advance(60)
        progress.finish()  # nothing new since the last line: no line
    assert [(e["done"], e["total"], e["rate_per_s"], e["eta_s"]) for e in logs] == [
        (50, None, 50.0, None),
        (160, None, 13.3, None),
    ]


def test_durations_read_like_a_clock() -> None:
    assert [format_duration(s) for s in (4.4, 83, 3725)] == ["4s", "1m23s", "1h02m"]
