"""Backfill and reconcile end to end: Jira REST (tests/jira_api_server.py) -> queue (moto) -> the real
consumer -> ``ap_jira_task`` in Postgres."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from backfill.backfill import BackfillRequest, run_backfill
from backfill.enqueue import send_envelopes
from backfill.reconcile import ReconcileRequest, run_reconcile
from consumer.worker import ConsumerStats
from shared import aws
from shared.envelope import Envelope
from shared.jira_event import Routed, route
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from shared.sqs_batch import send_entries
from tests.conftest import consume_all, drain
from tests.jira_api_server import (
    JiraApiServer,
    backfill_settings,
    fixture_issue,
    fixture_issues,
)
from tests.jira_fixtures import make_event

WEBHOOK_FIXTURE = "mattermost-plugin-jira__webhook-issue-updated-labels.json"


async def consume(
    aws_settings: AwsSettings, queues: QueuePair, db_settings: DatabaseSettings
) -> ConsumerStats:
    stats = await consume_all(aws_settings, queues, db_settings, pollers=2)
    assert stats.dead_lettered == 0
    return stats


async def apply_webhook(
    body: dict[str, Any], queues: QueuePair, db_settings: DatabaseSettings, aws_settings: AwsSettings
) -> None:
    """A webhook as the receiver enqueues it, then consumed."""
    raw = json.dumps(body)
    routed = route(body)
    assert isinstance(routed, Routed) and routed.event_ts_ms is not None
    env = Envelope(
        body=raw,
        event_type=routed.event_type,
        issue_id=routed.issue_id,
        event_ts_ms=routed.event_ts_ms,
        received_at_ms=routed.event_ts_ms,
        delivery_id="webhook-delivery-1",
    )
    async with aws.sqs_client(aws_settings) as sqs:
        results = await send_entries(sqs, queues.queue_url, [env.send_entry("0")])
    assert results[0].ok
    await consume(aws_settings, queues, db_settings)


def ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


async def test_a_backfill_lands_every_issue_in_the_table_with_backfill_history(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Jira with 300 issues and an empty table
    server, url = jira
    server.issues = fixture_issues(300)
    # WHEN the backfill runs while the consumer drains the queue (as in production; it also keeps
    # moto's queue short, and moto slows down as a queue grows)
    backfill = asyncio.create_task(
        run_backfill(
            backfill_settings(url, queues, db_settings, aws_settings), BackfillRequest(), progress_tty=False
        )
    )
    applied = 0
    while True:
        finished = backfill.done()
        applied += (await consume(aws_settings, queues, db_settings)).applied
        if finished:
            break
    summary = await backfill
    # THEN every issue is a live row at its Jira version, and history says where it came from
    assert (summary.sent, applied) == (300, 300)
    rows = await pg.fetch(
        "SELECT issue_id, issue_key, version, is_deleted FROM ap_jira_task ORDER BY issue_id"
    )
    expected = [
        (int(i["id"]), i["key"], ms(datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=n)), False)
        for n, i in enumerate(server.issues)
    ]
    assert [tuple(r) for r in rows] == expected
    history = await pg.fetch("SELECT source, applied, count(*) AS n FROM ap_jira_task_event GROUP BY 1, 2")
    assert [tuple(r) for r in history] == [("backfill", True, 300)]


async def test_an_older_snapshot_changes_nothing_and_a_newer_one_repairs(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a webhook for issue 30000 already applied, at time T, with its own summary
    server, url = jira
    t = datetime(2024, 6, 1, 12, tzinfo=UTC)
    webhook = make_event(WEBHOOK_FIXTURE, issue_id=30000, ts=ms(t))
    webhook["issue"]["fields"]["summary"] = "as the webhook said"
    await apply_webhook(webhook, queues, db_settings, aws_settings)
    assert (
        await pg.fetchval("SELECT summary FROM ap_jira_task WHERE issue_id = 30000") == "as the webhook said"
    )
    # WHEN a backfill brings a snapshot of it last updated an hour before T
    server.issues = [fixture_issue(0, issue_id=30000, key="BF-1", updated=t - timedelta(hours=1))]
    server.issues[0]["fields"]["summary"] = "stale snapshot"
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    await run_backfill(settings, BackfillRequest(), progress_tty=False)
    stats = await consume(aws_settings, queues, db_settings)
    # THEN the row still holds the webhook's version; the snapshot is history only, not applied
    assert stats.skipped_stale == 1
    row = await pg.fetchrow("SELECT summary, version FROM ap_jira_task WHERE issue_id = 30000")
    assert (row["summary"], row["version"]) == ("as the webhook said", ms(t))
    # WHEN Jira has a newer version (a webhook we missed) and another backfill runs
    server.issues = [fixture_issue(0, issue_id=30000, key="BF-1", updated=t + timedelta(hours=1))]
    server.issues[0]["fields"]["summary"] = "repaired by backfill"
    await run_backfill(settings, BackfillRequest(), progress_tty=False)
    stats = await consume(aws_settings, queues, db_settings)
    # THEN the snapshot repairs the row
    assert stats.applied == 1
    row = await pg.fetchrow("SELECT summary, version FROM ap_jira_task WHERE issue_id = 30000")
    assert (row["summary"], row["version"]) == ("repaired by backfill", ms(t + timedelta(hours=1)))
    history = await pg.fetch(
        "SELECT source, applied, event_version FROM ap_jira_task_event "
        "WHERE issue_id = 30000 ORDER BY event_version"
    )
    assert [tuple(r) for r in history] == [
        ("backfill", False, ms(t - timedelta(hours=1))),
        ("webhook", True, ms(t)),
        ("backfill", True, ms(t + timedelta(hours=1))),
    ]


async def test_reconcile_deletes_what_jira_deleted_and_keeps_what_it_cannot_see(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN three issues backfilled into the table
    server, url = jira
    server.issues = fixture_issues(3)
    settings = backfill_settings(url, queues, db_settings, aws_settings)
    await run_backfill(settings, BackfillRequest(), progress_tty=False)
    await consume(aws_settings, queues, db_settings)
    # AND then Jira deleted 30001 (404) and the account lost access to 30002 (403)
    server.issues = server.issues[:1]
    server.issue_status = {"30002": 403}
    # WHEN reconcile runs and the consumer drains the queue
    summary = await run_reconcile(settings, ReconcileRequest(replay_failed_webhooks=False))
    stats = await consume(aws_settings, queues, db_settings)
    # THEN only 30001 is flagged deleted, through a history row from reconcile
    assert (summary.deletes_enqueued, stats.applied) == (1, 1)
    rows = await pg.fetch("SELECT issue_id, is_deleted FROM ap_jira_task ORDER BY issue_id")
    assert [tuple(r) for r in rows] == [(30000, False), (30001, True), (30002, False)]
    history = await pg.fetch(
        "SELECT issue_id, source, applied FROM ap_jira_task_event WHERE source = 'reconcile'"
    )
    assert [tuple(r) for r in history] == [(30001, "reconcile", True)]


async def test_large_snapshots_of_one_page_are_sent_in_calls_sqs_accepts(
    queues: QueuePair, aws_settings: AwsSettings
) -> None:
    # GIVEN four snapshots of 400 KB each: together more than one SendMessageBatch may carry (1 MiB)
    envelopes = []
    for i in range(4):
        body = make_event("pinpoint-jira__jira_issue_created.json", issue_id=50_000 + i, ts=1_000 + i)
        body["issue"]["fields"]["description"] = "x" * 400_000
        raw = json.dumps(body)
        envelopes.append(
            Envelope(raw, "jira:issue_created", str(50_000 + i), 1_000 + i, 1_000 + i, f"snapshot-{i}")
        )
    # WHEN backfill sends them as one page
    async with aws.sqs_client(aws_settings) as sqs:
        outcome = await send_envelopes(sqs, queues.queue_url, envelopes, attempts=1)
    # THEN every one is stored (one call over 1 MiB would have failed as a whole, every time)
    assert (outcome.sent, outcome.refused) == (4, [])
    stored = await drain(aws_settings, queues.queue_url)
    assert sorted(m["MessageAttributes"]["delivery_id"]["StringValue"] for m in stored) == [
        f"snapshot-{i}" for i in range(4)
    ]
