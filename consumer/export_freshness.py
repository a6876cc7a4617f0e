"""Publishes ``jiralake_export_last_success_timestamp_seconds{mode}`` from the export-run table, so the
"no full export in 26 h" alert works even when exports run as cron jobs or scheduled tasks that are
never scraped: the consumer, which is always up and always scraped, reads when the last export of
each mode succeeded from Postgres.

One series per mode: ``full`` is what replaced ``latest/``, the file analysts read; ``changes`` the
incremental feed. A single "last success of any export" would let hourly incremental runs that
succeed hide a daily full export that fails, and ``latest/`` would go stale without an alert.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from shared import db
from shared.metrics import EXPORT_LAST_SUCCESS

log = structlog.get_logger()

# -- last_successful_export_by_mode --
LAST_SUCCESSFUL_EXPORT_BY_MODE = """
SELECT mode, extract(epoch FROM max(finished_at))::float8 AS finished
FROM jiralake_export_run
WHERE status = 'succeeded' AND finished_at IS NOT NULL
GROUP BY mode
"""


async def publish_last_export(pool: asyncpg.Pool) -> dict[str, float]:
    """Set the gauge of each mode from Postgres; returns mode -> Unix time for the modes that have
    succeeded at least once. A mode that never has keeps its value (0 from the start)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(LAST_SUCCESSFUL_EXPORT_BY_MODE)
    finished: dict[str, float] = {row["mode"]: row["finished"] for row in rows}
    for mode, at in finished.items():
        EXPORT_LAST_SUCCESS.labels(mode).set(at)
    return finished


async def poll_last_export(pool: asyncpg.Pool, interval_s: float, stop: asyncio.Event) -> None:
    """Refresh the gauges every ``interval_s`` until ``stop``; a Postgres failure keeps the last values.

    Run it as a named task: ``create_task(poll_last_export(...), name="export-freshness-poller")``.
    """
    while not stop.is_set():
        try:
            await publish_last_export(pool)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            if isinstance(exc, asyncpg.InternalClientError) and not db.session_ended(exc):
                raise
            log.warning("export_freshness_unavailable", error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
