"""Backfill's resume cursor and watermark, and reconcile's failed-webhook cursor, in Postgres
(tables from ``shared/migrations/0004_backfill_state.sql``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from shared import db


@dataclass(frozen=True)
class RunKey:
    """What makes two backfill invocations "the same run": a restart with these resumes."""

    jira_url: str
    request_jql: str
    updated_since: str
    expand: str

    @property
    def job_key(self) -> str:
        raw = json.dumps([self.jira_url, self.request_jql, self.updated_since, self.expand])
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RunState:
    effective_jql: str
    # The instant the run's ``updated >=`` bound stands for; None when it asks for all time.
    covers_from: datetime | None
    next_cursor: str | None
    pages_done: int
    issues_sent: int
    started_at: datetime
    # Snapshots of this run not enqueued so far (migration 0006): a resumed run still exits 1 for
    # them (the watermark is stored all the same: see backfill.py's _finish).
    issues_refused: int = 0

    @property
    def fetched_all_pages(self) -> bool:
        """The last page was confirmed (only finishing remained when the process stopped)."""
        return self.pages_done > 0 and self.next_cursor is None


# -- load_run --
_LOAD_RUN = """
SELECT effective_jql, covers_from, next_cursor, pages_done, issues_sent, issues_refused, started_at
FROM jiralake_backfill_run WHERE job_key = $1
"""

# -- start_run --
_START_RUN = """
INSERT INTO jiralake_backfill_run
    (job_key, jira_url, request_jql, updated_since, effective_jql, covers_from, started_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (job_key) DO UPDATE SET
    effective_jql = excluded.effective_jql, covers_from = excluded.covers_from,
    next_cursor = NULL, pages_done = 0, issues_sent = 0, issues_refused = 0, started_at = excluded.started_at,
    updated_at = now()
"""

# -- save_page --
_SAVE_PAGE = """
UPDATE jiralake_backfill_run
SET next_cursor = $2, pages_done = $3, issues_sent = $4, issues_refused = $5, updated_at = now()
WHERE job_key = $1
"""

# -- delete_run --
_DELETE_RUN = "DELETE FROM jiralake_backfill_run WHERE job_key = $1"

# -- load_watermark --
_LOAD_WATERMARK = """
SELECT watermark FROM jiralake_backfill_watermark WHERE jira_url = $1 AND request_jql = $2
"""

# -- store_watermark --
_STORE_WATERMARK = """
INSERT INTO jiralake_backfill_watermark (jira_url, request_jql, watermark, effective_jql, issues_sent)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (jira_url, request_jql) DO UPDATE SET
    watermark = GREATEST(jiralake_backfill_watermark.watermark, excluded.watermark),
    effective_jql = excluded.effective_jql, issues_sent = excluded.issues_sent, finished_at = now()
"""

# -- load_failed_webhook_cursor --
_LOAD_FAILED_CURSOR = "SELECT failed_after_ms FROM jiralake_failed_webhook_cursor WHERE jira_url = $1"

# -- store_failed_webhook_cursor --
_STORE_FAILED_CURSOR = """
INSERT INTO jiralake_failed_webhook_cursor (jira_url, failed_after_ms) VALUES ($1, $2)
ON CONFLICT (jira_url) DO UPDATE SET
    failed_after_ms = GREATEST(jiralake_failed_webhook_cursor.failed_after_ms, excluded.failed_after_ms),
    updated_at = now()
"""


async def load_run(conn: asyncpg.Connection, key: RunKey) -> RunState | None:
    row = await conn.fetchrow(_LOAD_RUN, key.job_key)
    if row is None:
        return None
    return RunState(
        effective_jql=row["effective_jql"],
        covers_from=row["covers_from"],
        next_cursor=row["next_cursor"],
        pages_done=row["pages_done"],
        issues_sent=row["issues_sent"],
        started_at=row["started_at"],
        issues_refused=row["issues_refused"],
    )


async def start_run(
    conn: asyncpg.Connection,
    key: RunKey,
    *,
    effective_jql: str,
    covers_from: datetime | None,
    started_at: datetime,
) -> RunState:
    await conn.execute(
        _START_RUN,
        key.job_key,
        key.jira_url,
        key.request_jql,
        key.updated_since,
        effective_jql,
        covers_from,
        started_at,
    )
    return RunState(effective_jql, covers_from, None, 0, 0, started_at)


async def save_page(
    conn: asyncpg.Connection,
    key: RunKey,
    *,
    next_cursor: str | None,
    pages_done: int,
    issues_sent: int,
    issues_refused: int,
) -> None:
    await conn.execute(_SAVE_PAGE, key.job_key, next_cursor, pages_done, issues_sent, issues_refused)


async def finish_run(
    conn: asyncpg.Connection, key: RunKey, run: RunState, *, issues_sent: int, store_watermark: bool
) -> None:
    """Forget the cursor and, for a run that sent every issue, record when it started."""
    async with db.bounded_transaction(conn):
        await conn.execute(_DELETE_RUN, key.job_key)
        if store_watermark:
            await conn.execute(
                _STORE_WATERMARK,
                key.jira_url,
                key.request_jql,
                run.started_at,
                run.effective_jql,
                issues_sent,
            )


async def load_watermark(conn: asyncpg.Connection, jira_url: str, request_jql: str) -> datetime | None:
    value: datetime | None = await conn.fetchval(_LOAD_WATERMARK, jira_url, request_jql)
    return value


async def load_failed_webhook_cursor(conn: asyncpg.Connection, jira_url: str) -> int | None:
    value: int | None = await conn.fetchval(_LOAD_FAILED_CURSOR, jira_url)
    return value


async def store_failed_webhook_cursor(conn: asyncpg.Connection, jira_url: str, failed_after_ms: int) -> None:
    await conn.execute(_STORE_FAILED_CURSOR, jira_url, failed_after_ms)
