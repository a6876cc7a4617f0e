"""The ``jiralake_export_run`` table (migration 0003): one row per run, and the incremental watermark."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

# -- abandon_unfinished_runs --
# Called with the export lock held: no other run can be in progress, so a 'running' row is a dead one.
ABANDON_UNFINISHED = """
UPDATE jiralake_export_run SET status = 'abandoned', finished_at = $1, error = 'process ended mid-run'
WHERE status = 'running'
"""

# -- start_run --
START_RUN = """
INSERT INTO jiralake_export_run (mode, format, status, started_at, since_xid8, destination, server_id)
VALUES ($1, $2, 'running', $3, $4, $5, $6)
RETURNING run_id
"""

# -- run_succeeded --
RUN_SUCCEEDED = """
UPDATE jiralake_export_run
SET status = 'succeeded', finished_at = $2, watermark_xid8 = $3, rows_exported = $4, bytes_exported = $5,
    sha256 = $6, data_key = $7, latest_key = $8, manifest_key = $9
WHERE run_id = $1
"""

# -- run_failed --
# Only a run still 'running': a run already recorded 'succeeded' has published (latest/ and the manifests
# name it), whatever fails or stops after that.
RUN_FAILED = """
UPDATE jiralake_export_run SET status = 'failed', finished_at = $2, error = $3
WHERE run_id = $1 AND status = 'running'
"""

# -- last_watermark --
# Per destination (migration 0007): another exporter's runs to another bucket or prefix don't count.
LAST_WATERMARK = """
SELECT watermark_xid8, server_id FROM jiralake_export_run
WHERE mode = 'changes' AND status = 'succeeded' AND destination = $1 AND format = $2
ORDER BY run_id DESC
LIMIT 1
"""

# -- server_id --
# The server's system identifier (migration 0012): another after the database moved to another server.
SERVER_ID = "SELECT system_identifier::text FROM pg_control_system()"


@dataclass(frozen=True)
class Watermark:
    xid8: int
    server_id: str | None  # None: recorded before migration 0012, or by a server that did not say


async def server_id(conn: asyncpg.Connection) -> str | None:
    """This server's system identifier; None where a managed service does not let the role read it."""
    try:
        value: str = await conn.fetchval(SERVER_ID)
    except (asyncpg.InsufficientPrivilegeError, asyncpg.FeatureNotSupportedError):
        return None
    return value


async def abandon_unfinished(conn: asyncpg.Connection, now: datetime) -> int:
    status: str = await conn.execute(ABANDON_UNFINISHED, now)
    return int(status.split()[-1])


async def start_run(
    conn: asyncpg.Connection,
    *,
    mode: str,
    format: str,
    destination: str,
    started_at: datetime,
    since_xid8: int | None,
    server_id: str | None,
) -> int:
    run_id: int = await conn.fetchval(START_RUN, mode, format, started_at, since_xid8, destination, server_id)
    return run_id


async def run_succeeded(
    conn: asyncpg.Connection,
    run_id: int,
    *,
    finished_at: datetime,
    watermark_xid8: int,
    rows: int,
    bytes_exported: int,
    sha256: str,
    data_key: str,
    latest_key: str | None,
    manifest_key: str,
) -> None:
    await conn.execute(
        RUN_SUCCEEDED,
        run_id,
        finished_at,
        watermark_xid8,
        rows,
        bytes_exported,
        sha256,
        data_key,
        latest_key,
        manifest_key,
    )


async def run_failed(conn: asyncpg.Connection, run_id: int, *, finished_at: datetime, error: str) -> None:
    await conn.execute(RUN_FAILED, run_id, finished_at, error[:2000])


async def last_watermark(conn: asyncpg.Connection, *, destination: str, format: str) -> Watermark | None:
    row = await conn.fetchrow(LAST_WATERMARK, destination, format)
    return None if row is None else Watermark(row["watermark_xid8"], row["server_id"])
