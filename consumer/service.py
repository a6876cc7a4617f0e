"""The consumer service: its connection pool, the pollers (consumer/worker.py), the admin port and the
queue-depth and export-freshness gauges, from start to a clean stop (on a signal, or once the queue has
been empty for ``exit_when_idle_s``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import structlog

from consumer.deadletter import check_dead_letter_queue
from consumer.export_freshness import poll_last_export
from consumer.settings import ConsumerSettings
from consumer.worker import (
    APPLICATION_NAME,
    LOG_CONNECTIONS_TERMINATED,
    POOL_CLOSE_S,
    Consumer,
    ConsumerStats,
)
from shared import aws, db, queue_depth
from shared.admin_server import admin_app, start_admin_server

log = structlog.get_logger()

# After the pollers stopped: how long the gauge pollers may take to notice the stop before they are
# cancelled.
GAUGE_STOP_S = 2.0


async def open_pool(settings: ConsumerSettings) -> asyncpg.Pool:
    # min_size 0: no connection is opened here, so the consumer starts (and waits) while Postgres is down.
    return await db.create_pool(
        settings.database,
        min_size=0,
        max_size=settings.pollers + 1,
        command_timeout=settings.statement_timeout_s,
        timeout=settings.statement_timeout_s,
        # Names the consumer's sessions in pg_stat_activity.
        server_settings={"application_name": APPLICATION_NAME},
    )


async def run_consumer(settings: ConsumerSettings, stop: asyncio.Event) -> ConsumerStats:
    """The service: pollers, the admin port, the queue-depth and export-freshness gauges, until
    ``stop`` is set or, with ``exit_when_idle_s``, the queue has been empty that long."""
    log.info(
        "consumer_starting",
        pollers=settings.pollers,
        queue_url=settings.queue.queue_url,
        exit_when_idle_s=settings.exit_when_idle_s,
    )
    async with aws.sqs_client(settings.aws, max_pool=settings.pollers * 2 + 4) as sqs:
        await check_dead_letter_queue(sqs, settings.queue.dlq_url)
        pool = await open_pool(settings)
        consumer = Consumer(settings, pool, sqs)
        runner = None
        depth = None
        freshness = None
        depth_stop = asyncio.Event()
        try:
            if settings.admin_port is not None:
                runner = await start_admin_server(
                    admin_app(consumer.readiness), settings.admin_host, settings.admin_port
                )
            if settings.queue_stats_interval_s > 0:
                depth = asyncio.create_task(
                    queue_depth.poll_queue_depths(
                        settings.aws,
                        queue_depth.queue_urls(settings.queue),
                        settings.queue_stats_interval_s,
                        depth_stop,
                    ),
                    name="queue-depth-poller",
                )
                depth.add_done_callback(stop_when_crashed(stop))
            if settings.export_freshness_interval_s > 0:
                freshness = asyncio.create_task(
                    poll_last_export(pool, settings.export_freshness_interval_s, depth_stop),
                    name="export-freshness-poller",
                )
                freshness.add_done_callback(stop_when_crashed(stop))
            await consumer.run(stop)
        finally:
            depth_stop.set()
            await _stop_gauge_pollers([t for t in (depth, freshness) if t is not None])
            if runner is not None:
                await runner.cleanup()
            await _close_pool(pool)
    log.info("consumer_stopped", **_stats_fields(consumer.stats))
    return consumer.stats


async def _stop_gauge_pollers(tasks: list[asyncio.Task[None]]) -> None:
    """The gauge pollers end at their next check of the stop event; one still waiting on SQS or
    PostgreSQL after GAUGE_STOP_S is cancelled (it only publishes gauges). One that had crashed is
    re-raised (see stop_when_crashed)."""
    if not tasks:
        return
    _, waiting = await asyncio.wait(tasks, timeout=GAUGE_STOP_S)
    for task in waiting:
        log.warning("gauge_poller_cancelled", task=task.get_name(), after_s=GAUGE_STOP_S)
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


async def _close_pool(pool: asyncpg.Pool) -> None:
    """Close the connections politely; a server that does not answer within POOL_CLOSE_S (frozen, or
    a network that drops packets) gets its connections closed from this side."""
    try:
        async with asyncio.timeout(POOL_CLOSE_S):
            await pool.close()
    except TimeoutError:
        log.warning(LOG_CONNECTIONS_TERMINATED, after_s=POOL_CLOSE_S)
        pool.terminate()


def stop_when_crashed(stop: asyncio.Event) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback for a gauge poller: the pollers handle SQS and PostgreSQL failures themselves,
    so one that ends with an exception is a bug. It stops the consumer (which drains its batches, then
    re-raises the exception from run_consumer: the process crashes loudly and its supervisor restarts
    it) rather than serve frozen gauges, which would keep an alert firing or silent, unnoticed."""

    def check(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_crashed", task=task.get_name(), exc_info=task.exception())
            stop.set()

    return check


def _stats_fields(stats: ConsumerStats) -> dict[str, int | bool]:
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")}
