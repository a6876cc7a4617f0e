"""The consumer publishes when the last export succeeded, read from the export-run table."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from consumer.export_freshness import publish_last_export
from shared import db
from shared.metrics import EXPORT_LAST_SUCCESS
from shared.settings import DatabaseSettings

INSERT_RUN = """
INSERT INTO jiralake_export_run (mode, format, status, started_at, finished_at)
VALUES ('full', 'csv', $1, $2, $3)
"""


async def test_the_gauge_follows_the_newest_successful_run(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    pool = await db.create_pool(db_settings, min_size=0, max_size=1)
    try:
        # GIVEN no export yet: nothing is claimed
        EXPORT_LAST_SUCCESS.set(0)
        assert await publish_last_export(pool) is None
        assert EXPORT_LAST_SUCCESS._value.get() == 0
        # WHEN one run succeeded and a later one failed
        ok_at = datetime(2026, 11, 20, 3, 0, 12, tzinfo=UTC)
        await pg.execute(INSERT_RUN, "succeeded", ok_at.replace(second=0), ok_at)
        await pg.execute(INSERT_RUN, "failed", datetime(2026, 11, 21, 3, tzinfo=UTC), None)
        # THEN the gauge shows the successful one
        assert await publish_last_export(pool) == ok_at.timestamp()
        assert EXPORT_LAST_SUCCESS._value.get() == ok_at.timestamp()
    finally:
        await pool.close()
