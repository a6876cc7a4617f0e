"""``jiralake reconcile`` against tests/jira_api_server.py, real Postgres and moto's SQS server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest

from backfill import reconcile
from backfill.command import reconcile_report
from backfill.reconcile import ReconcileRequest, run_reconcile
from shared import db
from shared.envelope import Envelope, body_sha256
from shared.errors import CommandError
from shared.jira_event import RECONCILED_DELETE_EVENT
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from tests.conftest import drain
from tests.jira_api_server import (
    JiraApiServer,
    backfill_settings,
    fixture_issues,
)
from tests.jira_fixtures import load, make_event
from tests.tcp_proxy import postgres_proxy, through


async def live_rows(pg: asyncpg.Connection, rows: list[tuple[int, str]]) -> None:
    """Rows the table holds alive (as the consumer left them after some issue event)."""
    await pg.executemany(
        "INSERT INTO ap_jira_task (issue_id, issue_key, version) VALUES ($1, $2, 1700000000000)", rows
    )


async def listed_and_held(server: JiraApiServer, pg: asyncpg.Connection, count: int) -> None:
    """``count`` issues Jira lists, each a live row of the table."""
    server.issues = fixture_issues(count)
    await live_rows(pg, [(int(i["id"]), i["key"]) for i in server.issues])


async def jira_with_gaps(server: JiraApiServer, pg: asyncpg.Connection) -> None:
    """Five issues Jira lists and the table holds, plus four live rows Jira's search does not return:
    30010 deleted (404), 30011 no permission (403), 30012 outside the JQL (200), 30013 (401)."""
    server.issues = fixture_issues(5)
    outside = fixture_issues(13)[12]
    server.issues.append(outside)
    server.outside_jql = {outside["id"]}
    server.issue_status = {"30011": 403, "30013": 401}
    await live_rows(pg, [(int(i["id"]), i["key"]) for i in server.issues])
    await live_rows(pg, [(30010, "BF-11"), (30011, "BF-12"), (30013, "BF-14")])


def findings(items: list[Any]) -> list[tuple[str, str | None, int]]:
    return [(f.issue_id, f.issue_key, f.status) for f in items]


async def test_reconcile_marks_a_404_deleted_through_the_queue_and_leaves_a_403_alone(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN live rows that Jira's search does not return, for four different reasons
    server, url = jira
    await jira_with_gaps(server, pg)
    # WHEN reconcile runs
    summary = await run_reconcile(
        backfill_settings(url, queues, db_settings, aws_settings), ReconcileRequest()
    )
    # THEN Jira was asked only about the four missing ids, each once
    assert sorted(server.issue_lookups) == ["30010", "30011", "30012", "30013"]
    assert server.jqls == ["project IS NOT EMPTY ORDER BY created ASC"]
    # AND only the 404 became a delete; 403 and 401 are reported; the 200 is left alone
    assert (summary.jira_ids, summary.live_rows, summary.candidates) == (5, 9, 4)
    assert findings(summary.deleted) == [("30010", "BF-11", 404)]
    assert findings(summary.forbidden) == [("30011", "BF-12", 403), ("30013", "BF-14", 401)]
    assert findings(summary.still_exist) == [("30012", "BF-13", 200)]
    assert (summary.deletes_enqueued, summary.deletes_withheld) == (1, False)
    messages = await drain(aws_settings, queues.queue_url)
    assert len(messages) == 1
    env = Envelope.from_message(messages[0])
    assert json.loads(env.body) == {
        "webhookEvent": RECONCILED_DELETE_EVENT,
        "timestamp": env.event_ts_ms,
        "issue": {"id": "30010", "key": "BF-11"},
    }
    assert (env.event_type, env.issue_id, env.delivery_id) == (
        RECONCILED_DELETE_EVENT,
        "30010",
        "reconcile:deleted:30010:1700000000000",  # names the row version it deletes
    )
    assert messages[0]["Attributes"]["MessageGroupId"] == "30010"
    # AND this account may not read the failed-webhook list, which is reported, not an error
    assert summary.failed_webhooks is not None
    assert (summary.failed_webhooks.available, summary.failed_webhooks.reason) == (
        False,
        "HTTP 403: Only Connect apps can use this operation.",
    )


async def test_a_dry_run_reports_the_same_and_changes_nothing(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    server, url = jira
    await jira_with_gaps(server, pg)
    server.failed_webhooks = [failed_webhook("1661274651203", 1_700_000_000_000, issue_id=30001)]
    summary = await run_reconcile(
        backfill_settings(url, queues, db_settings, aws_settings), ReconcileRequest(dry_run=True)
    )
    assert findings(summary.deleted) == [("30010", "BF-11", 404)]
    assert findings(summary.forbidden) == [("30011", "BF-12", 403), ("30013", "BF-14", 401)]
    assert summary.deletes_enqueued == 0
    assert summary.failed_webhooks is not None and summary.failed_webhooks.replayed == 1
    assert await drain(aws_settings, queues.queue_url) == []
    assert await pg.fetchval("SELECT count(*) FROM jiralake_failed_webhook_cursor") == 0


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
async def test_more_404s_than_allowed_withholds_every_delete(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
    dry_run: bool,
) -> None:
    # GIVEN three live rows Jira answers 404 for, and a limit of two
    server, url = jira
    await live_rows(pg, [(40001, "GONE-1"), (40002, "GONE-2"), (40003, "GONE-3")])
    # WHEN reconcile runs (or its dry run, which must say what the run would do)
    summary = await run_reconcile(
        backfill_settings(url, queues, db_settings, aws_settings),
        ReconcileRequest(max_deletes=2, dry_run=dry_run),
    )
    # THEN the 404s are reported and nothing is enqueued
    assert [f.issue_id for f in summary.deleted] == ["40001", "40002", "40003"]
    assert (summary.deletes_withheld, summary.deletes_enqueued) == (True, 0)
    assert await drain(aws_settings, queues.queue_url) == []


async def test_a_search_that_returns_nothing_withholds_every_delete_unless_allowed(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a small table, and a Jira whose search returns nothing and which answers 404 for every
    # row: what an account that lost access to the project sees, far below --max-deletes
    server, url = jira
    server.issues = []
    await live_rows(pg, [(40001, "GONE-1"), (40002, "GONE-2")])
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    # WHEN reconcile runs with the default limit
    summary = await run_reconcile(settings, ReconcileRequest())
    # THEN nothing is deleted, and the summary says why
    assert [f.issue_id for f in summary.deleted] == ["40001", "40002"]
    assert (summary.deletes_withheld, summary.deletes_enqueued) == (True, 0)
    assert summary.withheld_because == (
        "Jira's search returned no issue at all, and all 2 live rows it was asked about answered 404"
    )
    assert await drain(aws_settings, queues.queue_url) == []
    # WHEN a scheduled run raised the limit for big deletions (which must not waive this guard)
    summary = await run_reconcile(settings, ReconcileRequest(max_deletes=500))
    # THEN nothing is deleted either
    assert (summary.deletes_withheld, summary.deletes_enqueued) == (True, 0)
    # WHEN the operator, who knows the project was removed, says every issue really is gone
    summary = await run_reconcile(settings, ReconcileRequest(allow_empty_search=True))
    # THEN the deletes go out
    assert (summary.deletes_withheld, summary.deletes_enqueued) == (False, 2)
    assert len(await drain(aws_settings, queues.queue_url)) == 2


async def test_data_center_reconcile_uses_rest_v2_and_has_no_failed_webhook_list(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    server, url = jira
    await jira_with_gaps(server, pg)
    summary = await run_reconcile(
        backfill_settings(url, queues, db_settings, aws_settings, deployment="datacenter"), ReconcileRequest()
    )
    assert findings(summary.deleted) == [("30010", "BF-11", 404)]
    assert findings(summary.forbidden) == [("30011", "BF-12", 403), ("30013", "BF-14", 401)]
    assert summary.failed_webhooks is not None
    assert summary.failed_webhooks.reason == "HTTP 404: Jira Data Center has no failed-webhook list"
    assert server.failed_webhook_afters == []
    assert [Envelope.from_message(m).issue_id for m in await drain(aws_settings, queues.queue_url)] == [
        "30010"
    ]


def failed_webhook(
    webhook_id: str, failure_ms: int, *, issue_id: int | None = None, body: str | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": webhook_id,
        "url": "https://jiralake.example/webhook",
        "failureTime": failure_ms,
    }
    if issue_id is not None:
        entry["body"] = json.dumps(
            make_event(
                "mattermost-plugin-jira__webhook-issue-updated-labels.json",
                issue_id=issue_id,
                ts=failure_ms - 5_000,
            )
        )
    elif body is not None:
        entry["body"] = body
    return entry


async def test_failed_webhooks_are_replayed_through_the_queue_and_the_place_is_remembered(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Jira Cloud listing four failed deliveries, two per page: one issue update, one without a
    # body, one sprint event, one unreadable body
    server, url = jira
    server.failed_webhooks_page_size = 2
    server.failed_webhooks = [
        failed_webhook("1661274651203", 1_700_000_000_000, issue_id=30001),
        failed_webhook("1661274651204", 1_700_000_001_000),
        failed_webhook(
            "1661274651205", 1_700_000_002_000, body=json.dumps(load("pinpoint-jira__sprint_started.json"))
        ),
        failed_webhook("1661274651206", 1_700_000_003_000, body="{not json"),
    ]
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    # WHEN reconcile runs
    summary = await run_reconcile(settings, ReconcileRequest())
    # THEN the update went on the queue as Jira sent it, under Jira's delivery id
    report = summary.failed_webhooks
    assert report is not None and report.available
    assert (report.listed, report.replayed, report.ignored, report.without_body) == (
        4,
        1,
        1,
        ["1661274651204"],
    )
    assert [webhook_id for webhook_id, _ in report.invalid] == ["1661274651206"]
    messages = await drain(aws_settings, queues.queue_url)
    assert len(messages) == 1
    env = Envelope.from_message(messages[0])
    assert env.body == server.failed_webhooks[0]["body"]
    assert (env.event_type, env.issue_id, env.delivery_id, env.event_ts_ms) == (
        "jira:issue_updated",
        "30001",
        "1661274651203",
        1_699_999_995_000,
    )
    # AND it paged by failure time and stored the last one
    assert server.failed_webhook_afters == [None, "1700000001000", "1700000003000"]
    assert (
        await pg.fetchval("SELECT failed_after_ms FROM jiralake_failed_webhook_cursor") == 1_700_000_003_000
    )
    # WHEN reconcile runs again
    await run_reconcile(settings, ReconcileRequest())
    # THEN it asks only for failures after that
    assert server.failed_webhook_afters[-1:] == ["1700000003000"]
    assert await drain(aws_settings, queues.queue_url) == []


async def test_a_failed_webhook_holding_characters_sqs_refuses_is_replayed_with_their_escapes(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
) -> None:
    # GIVEN a failed delivery whose body holds U+FFFF raw (valid JSON, refused in an SQS body)
    server, url = jira
    event = make_event("mattermost-plugin-jira__webhook-issue-updated-labels.json", issue_id=30001, ts=1)
    event["issue"]["fields"]["summary"] = "odd \uffff end"
    body = json.dumps(event, ensure_ascii=False)
    server.failed_webhooks = [failed_webhook("", 1_700_000_000_000, body=body)]
    # WHEN reconcile runs
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    summary = await run_reconcile(settings, ReconcileRequest())
    # THEN it is replayed, the character as its JSON escape: the same event
    assert summary.failed_webhooks is not None and summary.failed_webhooks.replayed == 1
    [message] = await drain(aws_settings, queues.queue_url)
    assert "odd \\uffff end" in message["Body"]
    assert json.loads(message["Body"]) == event
    # AND, Jira listing no id for it, its delivery id is the one the receiver gives those bytes
    assert Envelope.from_message(message).delivery_id == "sha256:" + body_sha256(body.encode())


async def test_a_login_page_for_the_failed_webhook_list_is_not_an_empty_list(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Jira Cloud with a failed delivery, behind an SSO page that catches the failed-webhook list
    server, url = jira
    server.failed_webhooks = [failed_webhook("1661274651203", 1_700_000_000_000, issue_id=30001)]
    server.login_redirect = {"webhook/failed"}
    # WHEN reconcile runs
    summary = await run_reconcile(
        backfill_settings(url, queues, db_settings, aws_settings), ReconcileRequest()
    )
    # THEN the list is reported as not available, with what came back, not as "nothing failed"
    report = summary.failed_webhooks
    assert report is not None and not report.available
    assert report.reason == (
        "HTTP 200: Jira answered HTTP 200 to /rest/api/3/webhook/failed with text/html that is not a "
        "failed-webhook list (starts '<!DOCTYPE html> <html><head><title>Sign in - Example SSO</ti'): "
        "is JIRALAKE_JIRA_URL Jira itself, not a login page or proxy in front of it?"
    )
    assert await pg.fetchval("SELECT count(*) FROM jiralake_failed_webhook_cursor") == 0


def serve_an_unpageable_failed_webhook_list(server: JiraApiServer) -> None:
    """Four failed deliveries for issue 30001, two per page, from a list that answers every request with
    its first page whatever `after` asks."""
    server.failed_webhooks_page_size = 2
    server.failed_webhooks = [failed_webhook(str(n), 1_700_000_000_000 + n, issue_id=30001) for n in range(4)]
    first_page = server.failed_webhooks[:2]

    def ignore_after(request: Any, body: dict[str, Any]) -> None:
        body["values"] = first_page

    server.tamper = {"webhook/failed": ignore_after}


async def test_a_failed_webhook_list_that_ignores_after_ends_with_one_line_not_an_endless_read(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN four failed deliveries, two per page, from a list that answers every request with its first
    # page whatever `after` asks
    server, url = jira
    serve_an_unpageable_failed_webhook_list(server)
    # WHEN reconcile runs, THEN the second request, which brings nothing later, ends that step with its
    # reason, kept in the summary beside what the delete step did (the command prints both, exits 1)
    summary = await run_reconcile(
        backfill_settings(url, queues, db_settings, aws_settings), ReconcileRequest()
    )
    assert summary.failed_webhooks is None
    assert summary.failed_webhooks_error == (
        "Jira's failed-webhook list, asked for failures after 1700000000001, answered a full page of none "
        "later: the list cannot be paged (it would be read forever)"
    )
    assert server.failed_webhook_afters == [None, "1700000000001"]
    assert reconcile_report(summary)[-1] == f"failed webhooks: stopped: {summary.failed_webhooks_error}"


async def test_failed_webhook_entries_that_are_no_object_or_hold_nan_are_reported_invalid(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a failed-webhook list with an entry that is no JSON object and a body holding NaN
    server, url = jira
    nan_body = json.dumps(
        make_event("mattermost-plugin-jira__webhook-issue-updated-labels.json", issue_id=30001)
    )
    server.failed_webhooks = [
        failed_webhook("7", 1_700_000_000_000, body=nan_body.replace('"id"', '"x": NaN, "id"', 1))
    ]

    def add_a_string(request: Any, body: dict[str, Any]) -> None:
        body["values"].append("not an entry")

    server.tamper = {"webhook/failed": add_a_string}
    # WHEN reconcile runs
    summary = await run_reconcile(
        backfill_settings(url, queues, db_settings, aws_settings), ReconcileRequest()
    )
    # THEN both are listed and reported invalid, and nothing was replayed
    report = summary.failed_webhooks
    assert report is not None
    assert (report.listed, report.replayed) == (2, 0)
    assert report.invalid == [
        ("?", "an entry of the list that is not a JSON object"),
        ("7", "NaN is not a JSON value"),
    ]
    assert await drain(aws_settings, queues.queue_url) == []


async def test_an_issue_id_of_non_ascii_digits_from_the_search_is_no_id(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a Data Center search answering "²" (a digit to str.isdigit, not to int) for one id
    server, url = jira
    server.issues = fixture_issues(3)
    await live_rows(pg, [(int(i["id"]), i["key"]) for i in server.issues])

    def superscript(request: Any, body: dict[str, Any]) -> None:
        if body["issues"]:
            body["issues"][0]["id"] = "²"

    server.tamper = {"search": superscript}
    settings = backfill_settings(url, queues, db_settings, aws_settings, deployment="datacenter")
    # WHEN reconcile runs, THEN it is no id of Jira's: the row it stood for is looked up (it exists)
    summary = await run_reconcile(settings, ReconcileRequest())
    assert summary.jira_ids == 2
    assert findings(summary.still_exist) == [(server.issues[0]["id"], server.issues[0]["key"], 200)]
    assert summary.deleted == []


async def test_exactly_max_deletes_404s_are_not_withheld(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN three issues Jira lists and two live rows it answers 404 for
    server, url = jira
    await listed_and_held(server, pg, 3)
    await live_rows(pg, [(40001, "GONE-1"), (40002, "GONE-2")])
    # WHEN reconcile runs with --max-deletes 2 (held back only when there are more)
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    summary = await run_reconcile(settings, ReconcileRequest(max_deletes=2))
    # THEN both deletes are queued
    assert (summary.deletes_withheld, summary.deletes_enqueued) == (False, 2)
    assert len(await drain(aws_settings, queues.queue_url)) == 2


async def test_rows_already_deleted_are_not_looked_up_or_deleted_again(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN three issues Jira lists, and a row the table already holds deleted (is_deleted is generated
    # from deleted_version)
    server, url = jira
    await listed_and_held(server, pg, 3)
    await live_rows(pg, [(40001, "GONE-1")])
    await pg.execute(
        "UPDATE ap_jira_task SET deleted_version = version, deleted_at = now() WHERE issue_id = 40001"
    )
    # WHEN reconcile runs
    summary = await run_reconcile(
        backfill_settings(url, queues, db_settings, aws_settings), ReconcileRequest()
    )
    # THEN the deleted row is neither looked up in Jira nor deleted again: every run would otherwise
    # count it against --max-deletes, and enough of them would hold back every real delete for good
    assert (summary.live_rows, summary.candidates, summary.deletes_enqueued) == (3, 0, 0)
    assert await drain(aws_settings, queues.queue_url) == []


@pytest.mark.timeout(60)
async def test_a_reconcile_postgresql_stops_answering_ends_in_one_line_and_enqueues_nothing(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN live rows Jira's search does not return (one of them deleted in Jira), reconcile reaching
    # PostgreSQL through a proxy (its statement bound lowered to 1.5 s; a minute in the product), and
    # PostgreSQL that stops answering (its packets dropped, nothing closed) while Jira answers the
    # search, before the live rows are read; no signal sent
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1.5)
    server, url = jira
    await jira_with_gaps(server, pg)
    proxy = await postgres_proxy(database_url)
    frozen_at: list[float] = []

    def freeze(_request: Any, _body: dict[str, Any]) -> None:
        if not frozen_at:
            proxy.freeze()
            frozen_at.append(time.monotonic())

    server.tamper["search"] = freeze
    settings = backfill_settings(
        url, queues, DatabaseSettings(url=through(proxy, database_url)), aws_settings
    )
    try:
        # WHEN reconcile runs
        with pytest.raises(CommandError) as failed:
            await asyncio.wait_for(run_reconcile(settings, ReconcileRequest()), timeout=30)
        elapsed = time.monotonic() - frozen_at[0]
    finally:
        await proxy.close()
    # THEN it ends soon after the statement bound, in one line that says what to do: exit 1
    assert elapsed < 1.5 + 8
    assert failed.value.exit_code == 1
    assert str(failed.value) == (
        "PostgreSQL did not answer a statement within 1.5 s (a server or network that stopped answering); "
        "what was enqueued stays enqueued, and a rerun sends only what it still finds missing (a message "
        "sent again changes nothing); check the server, then run the same command again"
    )
    # AND nothing was enqueued: no row was read, so no delete was decided
    assert server.issue_lookups == []
    assert await drain(aws_settings, queues.queue_url) == []


async def test_the_live_rows_are_read_in_windows_deleted_rows_left_out(
    pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN 7 rows, 3 of them deleted (one at each end, one in the middle)
    await live_rows(pg, [(i, f"BF-{i}") for i in range(1, 8)])
    await pg.execute("UPDATE ap_jira_task SET deleted_version = version WHERE issue_id = ANY($1)", [1, 4, 7])
    # WHEN the live rows are read a window of 1, 2, 3, ... rows at a time
    read = []
    for window in (1, 2, 3, 7, 10_000):
        monkeypatch.setattr(reconcile, "LIVE_WINDOW_ROWS", window)
        read.append([(r["issue_id"], r["issue_key"], r["version"]) for r in await reconcile.live_rows(pg)])
    # THEN every read is the 4 live rows, in issue_id order
    expected = [(i, f"BF-{i}", 1700000000000) for i in (2, 3, 5, 6)]
    assert read == [expected] * 5
