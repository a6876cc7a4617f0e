"""Only one export at a time: a PostgreSQL session advisory lock, held by the connection that reads
the table. It goes away with that connection, so a killed exporter never leaves it behind."""

from __future__ import annotations

import asyncpg

from exporter.errors import ExportLocked

# "jlex": distinct from the migrator's "jlmi" (shared/migrate.py).
EXPORT_LOCK_KEY = 0x6A6C_6578

# -- try_export_lock --
TRY_LOCK = "SELECT pg_try_advisory_lock($1)"

# -- export_lock_holder --
# A bigint key below 2^32 shows in pg_locks as classid 0, objid = key, objsubid 1.
LOCK_HOLDER = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND classid = 0 AND objid = $1 AND objsubid = 1 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
LIMIT 1
"""


async def acquire_export_lock(conn: asyncpg.Connection) -> None:
    """Take the lock for this connection's session, or raise :class:`ExportLocked` at once."""
    if await conn.fetchval(TRY_LOCK, EXPORT_LOCK_KEY):
        return
    holder = await conn.fetchval(LOCK_HOLDER, EXPORT_LOCK_KEY)
    by = f" by PostgreSQL backend pid {holder}" if holder else ""
    raise ExportLocked(
        f"another export is running (advisory lock {EXPORT_LOCK_KEY:#x} is held{by}); not starting"
    )
