"""``jiralake backfill`` against tests/jira_api_server.py (Jira REST shapes, real fixture issues),
real Postgres and moto's SQS server."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from structlog.testing import capture_logs

from backfill.backfill import LAST_RUN, BackfillRequest, run_backfill
from backfill.command import backfill_report
from backfill.jira_client import JiraClient, JiraRequestError, JiraUnavailable
from backfill.settings import JiraSettings
from backfill.snapshot import snapshot_envelope
from shared import db
from shared.envelope import Envelope
from shared.errors import CommandError
from shared.jira_event import SNAPSHOT_EVENT, Routed, parse_jira_time_ms, route
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from tests.conftest import drain
from tests.jira_api_server import (
    API_TOKEN,
    EMAIL,
    JiraApiServer,
    RateLimited,
    backfill_settings,
    fixture_issue,
    fixture_issues,
)
from tests.tcp_proxy import postgres_proxy, through


class RecordingSleep:
    """An injected sleep: records each wait and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


class SteppingClock:
    """Wall time shared by the client and the server that moves only when the client sleeps."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def queued_ids(messages: list[dict[str, Any]]) -> list[str]:
    return sorted(Envelope.from_message(m).issue_id for m in messages)


def ids_of(issues: list[dict[str, Any]]) -> list[str]:
    return sorted(i["id"] for i in issues)


# -- snapshots --


def test_a_snapshot_is_the_issue_as_jira_returned_it_versioned_by_its_updated_time() -> None:
    # GIVEN a real fixture's issue object
    issue = fixture_issue(
        0, issue_id=41_000, key="BF-7", updated=datetime(2024, 3, 1, 12, 30, 15, 250_000, tzinfo=UTC)
    )
    # WHEN it becomes a snapshot
    env = snapshot_envelope(issue, received_at_ms=1_700_000_000_000)
    # THEN the body wraps the untouched issue, the version is fields.updated, the delivery id is stable
    updated_ms = 1_709_296_215_250
    assert json.loads(env.body) == {"webhookEvent": SNAPSHOT_EVENT, "timestamp": updated_ms, "issue": issue}
    assert (env.event_type, env.issue_id, env.event_ts_ms, env.received_at_ms) == (
        SNAPSHOT_EVENT,
        "41000",
        updated_ms,
        1_700_000_000_000,
    )
    assert env.delivery_id == env.dedup_id == f"backfill:41000:{updated_ms}"
    routed = route(json.loads(env.body))
    assert isinstance(routed, Routed)
    assert (routed.event_type, routed.issue_id, routed.event_ts_ms) == (SNAPSHOT_EVENT, "41000", updated_ms)


# -- backfill runs --


async def test_a_cloud_backfill_lands_every_issue_on_the_queue_as_a_snapshot(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Jira Cloud with 150 issues made from the real fixtures (tests/test_backfill_e2e.py takes
    # a few hundred through to the table)
    server, url = jira
    server.issues = fixture_issues(150)
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    # WHEN the default backfill runs
    summary = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN two pages (100 and 50) went out, each issue once, as snapshots of its own version
    assert (summary.pages, summary.sent, summary.total) == (2, 150, 150)
    assert summary.complete and summary.refused == []
    assert server.jqls == ["project IS NOT EMPTY ORDER BY created ASC"] * 2
    assert dict(server.page_requests) == {0: 1, 1: 1}
    messages = await drain(aws_settings, queues.queue_url)
    assert queued_ids(messages) == ids_of(server.issues)
    by_id = {i["id"]: i for i in server.issues}
    for message in messages:
        env = Envelope.from_message(message)
        assert env.event_type == SNAPSHOT_EVENT
        assert message["Attributes"]["MessageGroupId"] == env.issue_id
        assert env.event_ts_ms == parse_jira_time_ms(by_id[env.issue_id]["fields"]["updated"])
        assert json.loads(env.body)["issue"] == by_id[env.issue_id]
    # AND the cursor is gone and the run's start is the watermark
    assert await pg.fetchval("SELECT count(*) FROM jiralake_backfill_run") == 0
    row = await pg.fetchrow("SELECT watermark, issues_sent FROM jiralake_backfill_watermark")
    assert (row["watermark"], row["issues_sent"]) == (summary.watermark, 150)


async def test_a_cloud_snapshot_carries_rich_text_as_cloud_webhooks_do_not_as_adf(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Jira Cloud, whose REST v3 returns a description as an Atlassian Document Format object,
    # while its webhooks carry the REST v2 representation: the wiki-markup string
    server, url = jira
    server.issues = fixture_issues(2)
    server.issues[0]["fields"]["description"] = "h1. Steps\n* open the *door*"
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    # WHEN the backfill runs
    await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN it searched REST v2's enhanced search, and the snapshot holds the string a webhook holds
    assert server.search_paths == ["/rest/api/2/search/jql"]
    bodies = {
        Envelope.from_message(m).issue_id: json.loads(Envelope.from_message(m).body)
        for m in await drain(aws_settings, queues.queue_url)
    }
    assert bodies[server.issues[0]["id"]]["issue"]["fields"]["description"] == "h1. Steps\n* open the *door*"


async def test_a_data_center_backfill_pages_with_start_at(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Jira Data Center (PAT, REST v2) with 25 issues and pages of 10
    server, url = jira
    server.issues = fixture_issues(25)
    settings = backfill_settings(
        url, queues, db_settings, aws_settings, deployment="datacenter", page_size=10
    )
    # WHEN the backfill runs
    summary = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN startAt 0, 10, 20 were read once each, the total came from Jira, and all 25 were enqueued
    assert (summary.pages, summary.sent, summary.total) == (3, 25, 25)
    assert dict(server.page_requests) == {0: 1, 1: 1, 2: 1}
    assert server.count_requests == 0
    assert queued_ids(await drain(aws_settings, queues.queue_url)) == ids_of(server.issues)


async def test_throttling_is_retried_after_the_wait_jira_asks_for(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Jira answering the second page first with 429 (Retry-After: 2), then 503 (Retry-After: 1)
    server, url = jira
    server.issues = fixture_issues(30)
    server.throttle = {1: [(429, "2"), (503, "1")]}
    settings = backfill_settings(url, queues, db_settings, aws_settings, page_size=10)
    sleep = RecordingSleep()
    # WHEN the backfill runs
    summary = await run_backfill(settings, BackfillRequest(), sleep=sleep, progress_tty=False)
    # THEN it waited at least as long as asked (plus at most 10 % jitter) and asked again each time
    assert len(sleep.waits) == 2
    assert 2.0 <= sleep.waits[0] <= 2.2
    assert 1.0 <= sleep.waits[1] <= 1.1
    assert dict(server.page_requests) == {0: 1, 1: 3, 2: 1}
    assert (summary.sent, summary.jira_retries) == (30, 2)
    assert queued_ids(await drain(aws_settings, queues.queue_url)) == ids_of(server.issues)


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_a_killed_backfill_resumes_after_its_last_saved_page(
    deployment: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN 50 issues in pages of 10, and a Jira that fails hard from the fourth page on
    server, url = jira
    server.issues = fixture_issues(50)
    server.fail_from_page = 3
    settings = backfill_settings(
        url, queues, db_settings, aws_settings, deployment=deployment, page_size=10, max_attempts=2
    )
    sleep = RecordingSleep()
    # WHEN the first run dies on page four
    with pytest.raises(JiraUnavailable, match="after 2 attempts"):
        await run_backfill(settings, BackfillRequest(), sleep=sleep, progress_tty=False)
    # THEN the first three pages were enqueued and saved
    saved = await pg.fetchrow("SELECT pages_done, issues_sent, next_cursor FROM jiralake_backfill_run")
    assert (saved["pages_done"], saved["issues_sent"]) == (3, 30)
    assert queued_ids(await drain(aws_settings, queues.queue_url)) == ids_of(server.issues[:30])
    # WHEN Jira is back and the same backfill runs again
    server.fail_from_page = None
    summary = await run_backfill(settings, BackfillRequest(), sleep=sleep, progress_tty=False)
    # THEN it started at page four: pages one to three were read once in all, page four twice by the
    # dead run (one retry) and once now
    assert summary.resumed_after_page == 3
    assert (summary.pages, summary.sent, summary.issues_sent_total) == (2, 20, 50)
    assert dict(server.page_requests) == {0: 1, 1: 1, 2: 1, 3: 3, 4: 1}
    assert queued_ids(await drain(aws_settings, queues.queue_url)) == ids_of(server.issues[30:])
    assert await pg.fetchval("SELECT count(*) FROM jiralake_backfill_run") == 0
    assert await pg.fetchval("SELECT issues_sent FROM jiralake_backfill_watermark") == 50


async def test_a_run_resumed_after_its_page_token_expired_starts_again_at_page_one(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a Cloud run that died after three of five pages
    server, url = jira
    server.issues = fixture_issues(50)
    server.fail_from_page = 3
    settings = backfill_settings(url, queues, db_settings, aws_settings, page_size=10, max_attempts=1)
    with pytest.raises(JiraUnavailable):
        await run_backfill(settings, BackfillRequest(), progress_tty=False)
    await drain(aws_settings, queues.queue_url)
    # AND more than 7 days went by: Jira no longer accepts the saved nextPageToken
    server.fail_from_page = None
    server.token_generation += 1
    # WHEN the same backfill runs again (a nightly job that no one reran by hand, say)
    summary = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN it tried the saved token once, then read every page from the first, and completed
    assert summary.restarted_after_expired_token
    assert (summary.pages, summary.sent, summary.issues_sent_total, summary.complete) == (5, 50, 50, True)
    assert dict(server.page_requests) == {0: 2, 1: 2, 2: 2, 3: 2, 4: 1}
    assert queued_ids(await drain(aws_settings, queues.queue_url)) == ids_of(server.issues)
    assert await pg.fetchval("SELECT count(*) FROM jiralake_backfill_run") == 0
    assert summary.watermark is not None


async def test_restart_ignores_the_saved_cursor(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a run that died after its first page
    server, url = jira
    server.issues = fixture_issues(20)
    server.fail_from_page = 1
    settings = backfill_settings(url, queues, db_settings, aws_settings, page_size=10, max_attempts=1)
    with pytest.raises(JiraUnavailable):
        await run_backfill(settings, BackfillRequest(), progress_tty=False)
    server.fail_from_page = None
    # WHEN it is run again with restart
    summary = await run_backfill(settings, BackfillRequest(restart=True), progress_tty=False)
    # THEN it read from page one again
    assert (summary.resumed_after_page, summary.pages, summary.sent) == (None, 2, 20)
    assert dict(server.page_requests) == {0: 2, 1: 2}
    await drain(aws_settings, queues.queue_url)


async def test_last_run_fetches_only_issues_updated_since_the_previous_complete_run(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a complete backfill of five issues, by an account whose Jira time zone is Berlin
    server, url = jira
    server.time_zone = "Europe/Berlin"
    server.issues = fixture_issues(5)
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    first = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    assert first.watermark is not None
    await drain(aws_settings, queues.queue_url)
    # AND then one issue changed and one was created
    now = datetime.now(UTC)
    server.issues[2]["fields"]["updated"] = now.strftime("%Y-%m-%dT%H:%M:%S.000+0000")
    server.issues.append(fixture_issue(7, issue_id=39_999, key="BF-99", updated=now))
    # WHEN the backfill runs with --updated-since last-run
    second = await run_backfill(settings, BackfillRequest(updated_since=LAST_RUN), progress_tty=False)
    # THEN the JQL asks for issues updated since the watermark less the overlap, in Berlin time
    since = (first.watermark - timedelta(minutes=10)).astimezone(ZoneInfo("Europe/Berlin"))
    assert server.jqls[-1] == (
        f'(project IS NOT EMPTY) AND updated >= "{since:%Y-%m-%d %H:%M}" ORDER BY created ASC'
    )
    # AND only those two went out, and the watermark moved on
    assert second.sent == 2
    assert queued_ids(await drain(aws_settings, queues.queue_url)) == sorted(
        [server.issues[2]["id"], "39999"]
    )
    assert second.watermark is not None and second.watermark > first.watermark
    assert await pg.fetchval("SELECT watermark FROM jiralake_backfill_watermark") == second.watermark


async def test_a_later_since_date_does_not_move_the_watermark(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN no complete run yet
    server, url = jira
    server.issues = fixture_issues(3)
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    # WHEN a backfill covers only issues updated since a date
    since = datetime(2024, 1, 1, 0, 1, tzinfo=UTC)
    summary = await run_backfill(settings, BackfillRequest(updated_since=since), progress_tty=False)
    # THEN it fetched those, but stored no watermark: everything before the date is not covered
    assert server.jqls[-1] == '(project IS NOT EMPTY) AND updated >= "2024-01-01 00:01" ORDER BY created ASC'
    assert (summary.sent, summary.complete, summary.watermark) == (2, True, None)
    assert await pg.fetchval("SELECT count(*) FROM jiralake_backfill_watermark") == 0
    await drain(aws_settings, queues.queue_url)


async def test_a_dry_run_counts_and_enqueues_nothing(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    server, url = jira
    server.issues = fixture_issues(12)
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    summary = await run_backfill(
        settings, BackfillRequest(jql="project = BF ORDER BY key DESC", dry_run=True), progress_tty=False
    )
    assert (summary.total, summary.jql, summary.sent) == (12, "project = BF ORDER BY key DESC", 0)
    assert server.page_requests == {}
    assert await drain(aws_settings, queues.queue_url) == []
    assert await pg.fetchval("SELECT count(*) FROM jiralake_backfill_run") == 0


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_a_dry_run_of_a_jql_jira_refuses_says_why(
    deployment: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
) -> None:
    # GIVEN a JQL with a misspelt field, which Jira refuses
    server, url = jira
    server.issues = fixture_issues(5)
    server.refused_jql = {"projct": "Field 'projct' does not exist or you do not have permission to view it."}
    settings = backfill_settings(url, queues, db_settings, aws_settings, deployment=deployment)
    # WHEN the dry run the runbook has one try first runs; THEN it fails with Jira's reason
    with pytest.raises(JiraRequestError, match="^Jira answered HTTP 400 to .*: Field 'projct' does not"):
        await run_backfill(settings, BackfillRequest(jql="projct = BF", dry_run=True), progress_tty=False)


@pytest.mark.parametrize(
    ("summary", "escape"),
    [("deploy \ud83d fix", r"\ud83d"), ("odd \uffff end", r"\uffff")],
    ids=["lone-surrogate", "uffff"],
)
async def test_an_issue_with_characters_sqs_refuses_goes_out_escaped_as_jira_sent_them(
    summary: str,
    escape: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
) -> None:
    # GIVEN an issue whose summary Jira sends with the JSON escape of half an emoji, or of U+FFFF:
    # characters that UTF-8 (a lone surrogate) or SQS (U+FFFF) do not take raw
    server, url = jira
    server.issues = fixture_issues(3)
    server.issues[1]["fields"]["summary"] = summary
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    # WHEN the backfill runs
    result = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN every issue went out, that one with the escape in its body: the same JSON value
    assert (result.sent, result.refused) == (3, [])
    messages = await drain(aws_settings, queues.queue_url)
    body = next(e.body for e in map(Envelope.from_message, messages) if e.issue_id == server.issues[1]["id"])
    assert escape in body
    assert json.loads(body)["issue"]["fields"]["summary"] == summary


async def test_an_issue_too_large_for_sqs_is_reported_and_the_rest_go_out(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN three issues, one with a description larger than an SQS message
    server, url = jira
    server.issues = fixture_issues(3)
    server.issues[1]["fields"]["description"] = "x" * 1_100_000
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    # WHEN the backfill runs
    summary = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN the other two were enqueued, the large one is named, and the watermark is stored all the
    # same: fetched again unchanged, the issue would be refused again
    assert summary.sent == 2
    [(refused_id, reason)] = [(r.issue_id, r.reason) for r in summary.refused]
    assert refused_id == server.issues[1]["id"]
    assert reason.startswith("message of ")
    assert reason.endswith(" bytes with its attributes; the queue takes at most 1046528")
    assert summary.watermark is not None
    assert queued_ids(await drain(aws_settings, queues.queue_url)) == sorted(
        [server.issues[0]["id"], server.issues[2]["id"]]
    )
    # WHEN the issue is trimmed in Jira (so updated after the watermark) and last-run goes
    server.issues[1]["fields"]["description"] = "trimmed"
    server.issues[1]["fields"]["updated"] = (summary.watermark + timedelta(hours=1)).isoformat()
    again = await run_backfill(settings, BackfillRequest(updated_since=LAST_RUN), progress_tty=False)
    # THEN last-run asks only for what changed since the watermark, and the issue goes out now
    assert (again.refused, again.watermark is not None) == ([], True)
    assert queued_ids(await drain(aws_settings, queues.queue_url)) == [server.issues[1]["id"]]


async def test_on_a_queue_of_256_kib_an_issue_over_it_is_refused_alone_not_with_its_page(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    small_queue: str,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a queue made by hand with MaximumMessageSize 256 KiB, and three issues on one page, the
    # second with a 300 KB description (SQS would refuse the whole SendMessageBatch holding it)
    server, url = jira
    server.issues = fixture_issues(3)
    server.issues[1]["fields"]["description"] = "x" * 300_000
    settings = backfill_settings(url, QueuePair(small_queue, queues.dlq_url), db_settings, aws_settings)
    # WHEN the backfill runs
    summary = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN the large one is refused, naming what the queue takes, and the other two of its page went out
    assert [r.issue_id for r in summary.refused] == [server.issues[1]["id"]]
    assert summary.refused[0].reason.endswith(" bytes with its attributes; the queue takes at most 260096")
    assert queued_ids(await drain(aws_settings, small_queue)) == sorted(
        [server.issues[0]["id"], server.issues[2]["id"]]
    )


async def test_a_resumed_run_remembers_an_issue_refused_before_the_crash(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN 30 issues in pages of 10, one on page one too large for SQS, and a Jira that fails hard
    # from the third page on
    server, url = jira
    server.issues = fixture_issues(30)
    server.issues[4]["fields"]["description"] = "x" * 1_100_000
    server.fail_from_page = 2
    settings = backfill_settings(url, queues, db_settings, aws_settings, page_size=10, max_attempts=1)
    # WHEN the first run dies on page three, after refusing that issue
    with pytest.raises(JiraUnavailable):
        await run_backfill(settings, BackfillRequest(), sleep=RecordingSleep(), progress_tty=False)
    assert await pg.fetchval("SELECT issues_refused FROM jiralake_backfill_run") == 1
    # WHEN Jira is back and the same backfill resumes and completes
    server.fail_from_page = None
    summary = await run_backfill(settings, BackfillRequest(), sleep=RecordingSleep(), progress_tty=False)
    # THEN the resumed part refused nothing itself, and the summary still counts the earlier refusal
    # (the command exits 1 on it); the watermark is stored, as for a refusal in one process
    assert (summary.resumed_after_page, summary.refused, summary.refused_before_resume) == (2, [], 1)
    assert summary.complete and summary.watermark is not None
    assert await pg.fetchval("SELECT count(*) FROM jiralake_backfill_watermark") == 1
    assert "  not enqueued before the resume: 1 issues (see that run's snapshot_refused log lines)" in (
        backfill_report(summary)
    )


@pytest.mark.timeout(60)
async def test_a_backfill_whose_last_commit_goes_unanswered_says_so(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN one page of issues, and a backfill reaching PostgreSQL through a proxy (its statement bound
    # lowered to 1.5 s) that, from the COMMIT that ends the run on, passes what it sends and loses what
    # the server answers
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1.5)
    server, url = jira
    server.issues = fixture_issues(5)
    proxy = await postgres_proxy(database_url)
    commit = asyncpg.transaction.Transaction.commit

    async def commit_unanswered(transaction: asyncpg.transaction.Transaction) -> None:
        proxy.freeze_answers()
        await commit(transaction)

    settings = backfill_settings(
        url, queues, DatabaseSettings(url=through(proxy, database_url)), aws_settings, page_size=5
    )
    try:
        with monkeypatch.context() as patched:
            patched.setattr(asyncpg.transaction.Transaction, "commit", commit_unanswered)
            # WHEN the backfill runs
            with pytest.raises(CommandError) as failed:
                await asyncio.wait_for(
                    run_backfill(settings, BackfillRequest(), sleep=RecordingSleep(), progress_tty=False),
                    timeout=30,
                )
    finally:
        await proxy.close()
    # THEN its line says the COMMIT went unanswered (the run's end may well be recorded), not that some
    # statement did
    assert str(failed.value).startswith(
        "PostgreSQL did not answer the COMMIT of a transaction within 1.5 s (a server or network that "
        "stopped answering); "
    )
    # AND the server did commit it: the run's cursor is gone and its watermark stored
    assert await pg.fetchval("SELECT count(*) FROM jiralake_backfill_run") == 0
    assert await pg.fetchval("SELECT count(*) FROM jiralake_backfill_watermark") == 1


# -- the client on its own --


async def test_jira_s_own_error_message_reaches_the_operator(jira: tuple[JiraApiServer, str]) -> None:
    # GIVEN a JQL without a restriction, which Jira Cloud refuses
    server, url = jira
    async with JiraClient(
        JiraSettings(url=url, deployment="cloud", email=EMAIL, api_token=API_TOKEN)
    ) as client:
        with pytest.raises(JiraRequestError) as caught:
            await client.search_page("ORDER BY created", None)
    assert str(caught.value) == (
        "Jira answered HTTP 400 to /rest/api/2/search/jql: Unbounded JQL queries are not allowed here. "
        "Please add a search restriction to your query."
    )


async def test_network_failures_back_off_exponentially_with_jitter() -> None:
    # GIVEN a Jira URL nothing listens on, and a seeded jitter
    settings = JiraSettings(
        url="http://127.0.0.1:9", deployment="cloud", email=EMAIL, api_token=API_TOKEN, max_attempts=4
    )
    sleep = RecordingSleep()
    async with JiraClient(settings, sleep=sleep, rng=random.Random(7)) as client:
        with pytest.raises(JiraUnavailable, match="after 4 attempts"):
            await client.myself()
    # THEN the waits double (1, 2, 4 s ceilings), each between half its ceiling and the ceiling
    assert len(sleep.waits) == 3
    for wait, ceiling in zip(sleep.waits, [1.0, 2.0, 4.0], strict=True):
        assert ceiling / 2 <= wait <= ceiling


def _resolver_says_no_such_name(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as exc:
        return exc.errno == socket.EAI_NONAME
    return False


async def test_a_jira_host_name_that_does_not_resolve_ends_at_once_naming_it() -> None:
    if not _resolver_says_no_such_name("acme.jiralake.invalid"):
        pytest.skip("this machine's resolver does not answer 'no such name' (EAI_NONAME) for .invalid")
    # GIVEN a Jira URL whose host name no resolver knows (a typo; .invalid never resolves, RFC 6761)
    settings = JiraSettings(
        url="https://acme.jiralake.invalid", deployment="cloud", email=EMAIL, api_token=API_TOKEN
    )
    sleep = RecordingSleep()
    async with JiraClient(settings, sleep=sleep) as client:
        # WHEN the first request is made THEN it ends at once, naming the host, without 8 attempts of
        # backoff (minutes) that would not mend a typo
        with pytest.raises(JiraUnavailable) as caught:
            await client.myself()
    assert str(caught.value) == (
        "Jira's host name 'acme.jiralake.invalid' does not resolve (Name or service not known): check "
        "JIRALAKE_JIRA_URL"
    )
    assert sleep.waits == []


async def test_a_host_name_that_stops_resolving_after_jira_answered_is_retried(
    jira: tuple[JiraApiServer, str],
) -> None:
    # GIVEN a client Jira has answered
    _, url = jira
    settings = JiraSettings(url=url, deployment="cloud", email=EMAIL, api_token=API_TOKEN, max_attempts=3)
    sleep = RecordingSleep()
    async with JiraClient(settings, sleep=sleep) as client:
        await client.myself()
        # WHEN its host name stops resolving (the client pointed at a name that does not: a resolver
        # answering "no such name" for a while, after a DNS change)
        client.settings = replace(settings, url="https://acme.jiralake.invalid")
        # THEN that is retried with backoff like any network failure, not taken for a typo
        with pytest.raises(JiraUnavailable, match="after 3 attempts"):
            await client.myself()
    assert len(sleep.waits) == 2


async def test_a_429_with_only_x_ratelimit_reset_is_retried_once_after_the_reset(
    jira: tuple[JiraApiServer, str],
) -> None:
    # GIVEN Jira Cloud throttling with a 429 that has no Retry-After, only X-RateLimit-Reset 5 s
    # ahead, and answering every search before the reset with the same 429
    server, url = jira
    server.issues = fixture_issues(3)
    clock = SteppingClock(datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp())
    server.clock = clock
    server.throttle = {0: [RateLimited(reset_in_s=5.0, reason="jira-burst-based")]}
    settings = JiraSettings(url=url, deployment="cloud", email=EMAIL, api_token=API_TOKEN)
    # WHEN the client searches (its sleep moves the shared clock instead of waiting)
    with capture_logs() as logs:
        async with JiraClient(settings, sleep=clock.sleep, rng=random.Random(5), clock=clock) as client:
            page = await client.search_page("project = BF", None)
    # THEN it asked twice: throttled once, then answered, the retry arriving after the reset the
    # server announced (not a backoff's second or two later, which would meet another 429)
    reset_s = datetime(2024, 5, 1, 10, 0, 5, tzinfo=UTC).timestamp()
    assert server.rate_limit_resets == [reset_s]
    assert dict(server.page_requests) == {0: 2}
    (_, first), (_, retry) = server.page_request_times
    assert first < reset_s <= retry
    assert (len(page.issues), client.retries) == (3, 1)
    # AND the wait is the time to the reset plus at most 10 % jitter, logged with its reason
    assert len(clock.waits) == 1 and 5.0 <= clock.waits[0] <= 5.5
    retries = [e for e in logs if e["event"] == "jira_retry"]
    assert [
        (e["wait_reason"], e["reset_in_s"], e["retry_after_s"], e["rate_limit_reason"]) for e in retries
    ] == [("X-RateLimit-Reset", 5.0, None, "jira-burst-based")]
    assert API_TOKEN not in repr(logs)


@pytest.mark.timeout(60)
async def test_a_backfill_postgresql_stops_answering_ends_in_one_line_and_a_rerun_resumes(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN 25 issues in pages of 5, a backfill reaching PostgreSQL through a proxy (its statement bound
    # lowered to 1.5 s; a minute in the product), and PostgreSQL that stops answering (its packets
    # dropped, nothing closed) once Jira has answered the third page, no signal sent
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1.5)
    server, url = jira
    server.issues = fixture_issues(25)
    proxy = await postgres_proxy(database_url)
    frozen_at: list[float] = []

    def freeze(_: list[dict[str, Any]]) -> None:
        proxy.freeze()
        frozen_at.append(time.monotonic())

    server.change_after_page = {2: freeze}
    through_proxy = DatabaseSettings(url=through(proxy, database_url))
    settings = backfill_settings(
        url, queues, through_proxy, aws_settings, deployment="datacenter", page_size=5
    )
    try:
        # WHEN the backfill runs
        with pytest.raises(CommandError) as failed:
            await asyncio.wait_for(
                run_backfill(settings, BackfillRequest(), sleep=RecordingSleep(), progress_tty=False),
                timeout=30,
            )
        elapsed = time.monotonic() - frozen_at[0]
    finally:
        await proxy.close()
    # THEN it ends soon after the statement bound, in one line that says what to do: exit 1
    assert elapsed < 1.5 + 8
    assert failed.value.exit_code == 1
    assert str(failed.value) == (
        "PostgreSQL did not answer a statement within 1.5 s (a server or network that stopped answering); "
        "every page SQS accepted stays enqueued, and a rerun resumes after the last page whose place was "
        "saved (a page sent again changes nothing); check the server, then run the same command again"
    )
    # AND the saved cursor is not ahead of what SQS accepted: at most the page in progress is unsaved
    saved = await pg.fetchval("SELECT pages_done FROM jiralake_backfill_run")
    first = queued_ids(await drain(aws_settings, queues.queue_url))
    assert first in (ids_of(server.issues[: saved * 5]), ids_of(server.issues[: (saved + 1) * 5]))
    # WHEN PostgreSQL answers again and the same backfill runs again
    direct = backfill_settings(url, queues, db_settings, aws_settings, deployment="datacenter", page_size=5)
    summary = await run_backfill(direct, BackfillRequest(), sleep=RecordingSleep(), progress_tty=False)
    # THEN it resumed after the last saved page, and every issue went out
    assert summary.resumed_after_page == saved and summary.complete
    rest = queued_ids(await drain(aws_settings, queues.queue_url))
    assert sorted(set(first) | set(rest)) == ids_of(server.issues)
