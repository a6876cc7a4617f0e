"""Publishes ``jiralake_export_last_success_timestamp_seconds`` from the export-run table, so the
"no export in 26 h" alert works even when exports run as cron jobs or scheduled tasks that are
never scraped: the consumer, which is always up and always scraped, reads when the last export
succeeded from Postgres."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from shared.metrics import EXPORT_LAST_SUCCESS

log = structlog.get_logger()

# -- last_successful_export --
LAST_SUCCESSFUL_EXPORT = """
SELECT extract(epoch FROM max(finished_at))::float8
FROM jiralake_export_run
WHERE status = 'succeeded'
"""


async def publish_last_export(pool: asyncpg.Pool) -> float | None:
    """Set the gauge from Postgres; returns the Unix time, or None when no export has succeeded yet."""
    async with pool.acquire() as conn:
        finished: float | None = await conn.fetchval(LAST_SUCCESSFUL_EXPORT)
    if finished is not None:
        EXPORT_LAST_SUCCESS.set(finished)
    return finished


async def poll_last_export(pool: asyncpg.Pool, interval_s: float, stop: asyncio.Event) -> None:
    """Refresh the gauge every ``interval_s`` until ``stop``; a Postgres failure keeps the last value.

    Run it as a named task: ``create_task(poll_last_export(...), name="export-freshness-poller")``.
    """
    while not stop.is_set():
        try:
            await publish_last_export(pool)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("export_freshness_unavailable", error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
