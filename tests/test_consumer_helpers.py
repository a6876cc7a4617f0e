"""Helpers shared by the consumer tests (no tests here): envelopes made from real fixture bodies the way
the receiver makes them, table snapshots for convergence checks, queue helpers and polling waits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg

from consumer.settings import ConsumerSettings
from shared import aws
from shared.envelope import Envelope, delivery_id_for
from shared.jira_event import Routed, route
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings, QueueSettings
from shared.sqs_batch import send_entries
from tests import jira_fixtures

RECEIVED_AT_MS = 1_700_000_000_000
CONSUMER_APP = "jiralake-consumer"


def envelope_of(
    body: dict[str, Any] | str | bytes,
    *,
    delivery_id: str | None = None,
    received_at_ms: int = RECEIVED_AT_MS,
) -> Envelope:
    """What the receiver enqueues for a body: routed, event time from the body (else received time)."""
    text = body.decode() if isinstance(body, bytes) else body if isinstance(body, str) else json.dumps(body)
    routed = route(json.loads(text))
    assert isinstance(routed, Routed), routed
    return Envelope(
        body=text,
        event_type=routed.event_type,
        issue_id=routed.issue_id,
        event_ts_ms=routed.event_ts_ms if routed.event_ts_ms is not None else received_at_ms,
        received_at_ms=received_at_ms,
        delivery_id=delivery_id or delivery_id_for(None, text),
    )


def fixture_envelopes() -> list[Envelope]:
    """Every real fixture that concerns an issue, as enqueued by the receiver, in name order."""
    return [envelope_of(jira_fixtures.raw(name)) for name in jira_fixtures.issue_fixtures()]


TASK_COLUMNS_SKIPPED = ("ingested_at",)
# `applied` records what a delivery did when it arrived, so it depends on the delivery order.
EVENT_COLUMNS_SKIPPED = ("ingested_at", "applied")


async def snapshot(conn: asyncpg.Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Both tables' content, ordered, without the columns that record when or in what order."""
    tasks = [
        {k: v for k, v in dict(r).items() if k not in TASK_COLUMNS_SKIPPED}
        for r in await conn.fetch("SELECT * FROM ap_jira_task ORDER BY issue_id")
    ]
    events = [
        {k: v for k, v in dict(r).items() if k not in EVENT_COLUMNS_SKIPPED}
        for r in await conn.fetch("SELECT * FROM ap_jira_task_event ORDER BY delivery_id")
    ]
    return tasks, events


async def clear_tables(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM ap_jira_task; DELETE FROM ap_jira_task_event")


def consumer_settings(
    aws_settings: AwsSettings, queues: QueuePair, db: DatabaseSettings, **overrides: Any
) -> ConsumerSettings:
    """Fast settings for tests: short polls, short backoffs, no admin port, no depth or freshness poller."""
    values: dict[str, Any] = {
        "pollers": 1,
        "wait_time_s": 1,
        "visibility_timeout_s": 10,
        "retry_base_s": 1,
        "retry_max_s": 2,
        "unavailable_backoff_max_s": 0.3,
        "statement_timeout_s": 10.0,
        "shutdown_grace_s": 10.0,
        "admin_port": None,
        "queue_stats_interval_s": 0,
        "export_freshness_interval_s": 0,
    }
    values.update(overrides)
    return ConsumerSettings(
        aws=aws_settings,
        queue=QueueSettings(queue_url=queues.queue_url, dlq_url=queues.dlq_url),
        database=db,
        **values,
    )


async def enqueue(aws_settings: AwsSettings, queue_url: str, envelopes: Sequence[Envelope]) -> None:
    entries = [e.send_entry(str(i)) for i, e in enumerate(envelopes)]
    async with aws.sqs_client(aws_settings) as sqs:
        results = await send_entries(sqs, queue_url, entries)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]


async def enqueue_raw(
    aws_settings: AwsSettings,
    queue_url: str,
    body: str,
    *,
    group_id: str,
    dedup_id: str,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """A message that is not an envelope (no attributes, or only ``attributes``), as a misbehaving
    producer sends it."""
    async with aws.sqs_client(aws_settings) as sqs:
        await sqs.send_message(
            QueueUrl=queue_url,
            MessageBody=body,
            MessageGroupId=group_id,
            MessageDeduplicationId=dedup_id,
            MessageAttributes=dict(attributes or {}),
        )


async def queue_counts(aws_settings: AwsSettings, queue_url: str) -> tuple[int, int]:
    """(visible, in flight)"""
    async with aws.sqs_client(aws_settings) as sqs:
        attrs = (
            await sqs.get_queue_attributes(
                QueueUrl=queue_url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )
        )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


async def wait_for(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 20.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def backend_gone(pg: asyncpg.Connection, pid: int) -> bool:
    """Whether PostgreSQL backend ``pid`` has exited (for :func:`wait_for`)."""
    return not await pg.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)


def holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain condition as something :func:`wait_for` can poll."""

    async def wrapped() -> bool:
        return check()

    return wrapped


async def consumer_waiting_on_lock(conn: asyncpg.Connection) -> bool:
    """True while a consumer connection is blocked on a lock the test holds."""
    return await lock_waiters(conn) > 0


async def lock_waiters(conn: asyncpg.Connection, application_name: str = CONSUMER_APP) -> int:
    """How many connections named ``application_name`` are blocked on a lock."""
    # pg_stat_activity is a snapshot kept for the whole transaction unless cleared.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = $1 AND wait_event_type = 'Lock'",
        application_name,
    )
    return count


async def history_count(conn: asyncpg.Connection) -> int:
    value: int = await conn.fetchval("SELECT count(*) FROM ap_jira_task_event")
    return value
