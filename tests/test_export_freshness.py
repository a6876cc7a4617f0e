"""The consumer publishes when the last export of each mode succeeded, read from the export-run table:
``full`` (what replaced latest/) apart from ``changes`` (incremental), so incremental runs that succeed
cannot hide a full export that fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from consumer.export_freshness import poll_last_export, publish_last_export
from consumer.service import run_consumer
from shared import db
from shared.metrics import EXPORT_LAST_SUCCESS, EXPORT_MODES
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from tests.tcp_proxy import postgres_proxy, through
from tests.test_consumer_helpers import backend_gone, consumer_settings, holds, wait_for

INSERT_RUN = """
INSERT INTO jiralake_export_run (mode, format, status, started_at, finished_at, destination)
VALUES ($1, 'csv', $2, $3, $4, 's3://bucket/jiralake')
"""
FULL_OK_AT = datetime(2026, 11, 20, 3, 0, 12, tzinfo=UTC)


def freshness(mode: str) -> float | None:
    return REGISTRY.get_sample_value("jiralake_export_last_success_timestamp_seconds", {"mode": mode})


@pytest.fixture
async def pool(db_settings: DatabaseSettings) -> AsyncIterator[asyncpg.Pool]:
    for mode in EXPORT_MODES:  # whatever earlier tests left
        EXPORT_LAST_SUCCESS.labels(mode).set(0)
    pool = await db.create_pool(db_settings, min_size=0, max_size=1)
    try:
        yield pool
    finally:
        await pool.close()


async def run(pg: asyncpg.Connection, mode: str, status: str, finished_at: datetime | None) -> None:
    started_at = (finished_at or datetime(2026, 11, 22, tzinfo=UTC)).replace(second=0)
    await pg.execute(INSERT_RUN, mode, status, started_at, finished_at)


async def test_a_mode_with_no_successful_run_keeps_its_value(
    pg: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # GIVEN no successful export in the table, and gauges at 0 (as every process starts them:
    # tests/test_deploy.py checks that in a fresh process) and at a value published before
    EXPORT_LAST_SUCCESS.labels("changes").set(FULL_OK_AT.timestamp())
    await run(pg, "full", "failed", FULL_OK_AT)
    # WHEN the gauges are published
    published = await publish_last_export(pool)
    # THEN nothing is claimed, and neither series is reset or removed (the alert fires on "never")
    assert published == {}
    assert {mode: freshness(mode) for mode in EXPORT_MODES} == {"full": 0, "changes": FULL_OK_AT.timestamp()}


async def test_the_gauge_follows_the_newest_successful_run_of_each_mode(
    pg: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # GIVEN one full run that succeeded and a later one that failed
    await run(pg, "full", "succeeded", FULL_OK_AT)
    await run(pg, "full", "failed", datetime(2026, 11, 21, 3, tzinfo=UTC))
    # WHEN the gauges are published
    published = await publish_last_export(pool)
    # THEN full shows the successful run, and changes (none yet) stays at 0
    assert published == {"full": FULL_OK_AT.timestamp()}
    assert freshness("full") == FULL_OK_AT.timestamp()
    assert freshness("changes") == 0


async def test_incremental_successes_do_not_hide_a_failing_full_export(
    pg: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # GIVEN the daily full export succeeded once, then failed two days running (latest/ is stale),
    # while the hourly incremental export kept succeeding, the newest after the last failure
    changes_ok_at = datetime(2026, 11, 22, 14, 0, 3, tzinfo=UTC)
    await run(pg, "full", "succeeded", FULL_OK_AT)
    await run(pg, "changes", "succeeded", datetime(2026, 11, 21, 9, 0, 2, tzinfo=UTC))
    await run(pg, "full", "failed", datetime(2026, 11, 21, 3, 5, tzinfo=UTC))
    await run(pg, "full", "failed", datetime(2026, 11, 22, 3, 5, tzinfo=UTC))
    await run(pg, "changes", "succeeded", changes_ok_at)
    await run(pg, "changes", "running", None)
    # WHEN the gauges are published
    published = await publish_last_export(pool)
    # THEN the full series still shows the old full export; the incremental one its own newest run
    assert published == {"full": FULL_OK_AT.timestamp(), "changes": changes_ok_at.timestamp()}
    assert freshness("full") == FULL_OK_AT.timestamp()
    assert freshness("changes") == changes_ok_at.timestamp()


def failed_polls(logs: list[MutableMapping[str, Any]], n: int) -> Callable[[], Awaitable[bool]]:
    """Whether the poller has logged ``n`` failed polls."""
    return holds(lambda: sum(e["event"] == "export_freshness_unavailable" for e in logs) >= n)


async def test_a_postgres_failure_keeps_the_last_values(pg: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    # GIVEN gauges published from a full run
    await run(pg, "full", "succeeded", FULL_OK_AT)
    await publish_last_export(pool)
    # WHEN the poller runs against a pool that is closed (Postgres gone)
    await pool.close()
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(poll_last_export(pool, 0.01, stop), name="export-freshness-poller")
        await wait_for(failed_polls(logs, 2), what="two failed polls (it goes on after one)")
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    # THEN the gauges keep what they showed
    assert freshness("full") == FULL_OK_AT.timestamp()
    assert freshness("changes") == 0


async def test_a_session_the_server_has_just_ended_keeps_the_last_values(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN gauges published from a full run by a pooled connection, whose session the server ends
    # (a restart, pg_terminate_backend): its FATAL message has reached the client, the close not yet
    await run(pg, "full", "succeeded", FULL_OK_AT)
    assert db_settings.url is not None
    proxy = await postgres_proxy(db_settings.url, linger=True)
    pool = await db.create_pool(DatabaseSettings(url=through(proxy, db_settings.url)), max_size=1)
    try:
        await publish_last_export(pool)
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert await pg.fetchval("SELECT pg_terminate_backend($1)", pid) is True
        await wait_for(lambda: backend_gone(pg, pid), what="the backend to exit")
        await asyncio.sleep(0.5)  # its last bytes, through the proxy
        # WHEN the poller runs
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(poll_last_export(pool, 0.01, stop), name="export-freshness-poller")
            await wait_for(failed_polls(logs, 1), what="the failed poll")
        stop.set()
        # THEN it goes on (it does not end the consumer) and the gauges keep what they showed
        await asyncio.wait_for(task, timeout=5)
        assert freshness("full") == FULL_OK_AT.timestamp()
    finally:
        pool.terminate()
        await proxy.close()


async def test_the_consumer_publishes_it_with_the_queue_gauges_turned_off(
    pg: asyncpg.Connection,
    pool: asyncpg.Pool,
    aws_settings: AwsSettings,
    queues: QueuePair,
    db_settings: DatabaseSettings,
) -> None:
    # GIVEN a full export that succeeded, and a consumer without queue gauges (JIRALAKE_CONSUMER_
    # QUEUE_STATS_S=0, as deploy/iam/README.md allows to drop the DLQ permissions)
    await run(pg, "full", "succeeded", FULL_OK_AT)
    settings = consumer_settings(
        aws_settings, queues, db_settings, queue_stats_interval_s=0, export_freshness_interval_s=0.05
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_consumer(settings, stop), name="test-consumer")
    try:
        # THEN the consumer still publishes when the last full export succeeded
        await wait_for(holds(lambda: freshness("full") == FULL_OK_AT.timestamp()), what="the full gauge")
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)
