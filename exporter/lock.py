"""Only one export at a time: a PostgreSQL session advisory lock, held by the connection that reads
the table. It goes away with that connection, so a killed exporter never leaves it behind; and so an
export whose session ended mid-run (a PostgreSQL restart, a dropped connection) no longer holds it,
and another export may have started. Before each step that publishes, the run checks that it still
holds the lock (:func:`confirm_export_lock`), so it does not overwrite the other run's objects.
"""

from __future__ import annotations

import asyncpg

from exporter.errors import ExportLocked, ExportLockLost
from shared import db

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

# -- export_lock_held --
LOCK_HELD = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND classid = 0 AND objid = $1 AND objsubid = 1 AND granted
      AND pid = pg_backend_pid()
)
"""
# A check is one tiny query on an idle connection; a PostgreSQL that does not answer in this long is
# as good as gone for deciding whether to publish.
CONFIRM_TIMEOUT_S = 30.0
# Errors of the server's that say the session is gone: lost, or ended by the server (its FATAL
# answer to the check: pg_terminate_backend, a shutdown). asyncpg's own errors say so by their text
# (shared.db.session_ended); any other InterfaceError is a misuse of the connection, a bug.
_SERVER_ENDED_SESSION = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


async def acquire_export_lock(conn: asyncpg.Connection) -> None:
    """Take the lock for this connection's session, or raise :class:`ExportLocked` at once."""
    if await conn.fetchval(TRY_LOCK, EXPORT_LOCK_KEY):
        return
    holder = await conn.fetchval(LOCK_HOLDER, EXPORT_LOCK_KEY)
    by = f" by PostgreSQL backend pid {holder}" if holder else ""
    raise ExportLocked(
        f"another export is running (advisory lock {EXPORT_LOCK_KEY:#x} is held{by}); not starting"
    )


async def confirm_export_lock(conn: asyncpg.Connection, *, before: str) -> None:
    """Raise :class:`ExportLockLost` unless ``conn``'s session still holds the lock; ``before`` names
    the step it guards, for the message."""
    try:
        held = await conn.fetchval(LOCK_HELD, EXPORT_LOCK_KEY, timeout=CONFIRM_TIMEOUT_S)
    except Exception as exc:
        lost = _lock_lost(exc, before)
        if lost is None:
            raise  # says nothing about the session: a bug
        raise lost from exc
    if not held:
        raise ExportLockLost(
            f"the export lock is no longer held: another export may be running; not {before}"
        )


def _lock_lost(exc: Exception, before: str) -> ExportLockLost | None:
    """What a lock check that failed with ``exc`` means for the run, if it is about the session."""
    # A TimeoutError is an OSError, but the session may live on (and hold the lock).
    broken = isinstance(exc, OSError) and not isinstance(exc, TimeoutError)
    if broken or isinstance(exc, _SERVER_ENDED_SESSION) or db.session_ended(exc):
        return ExportLockLost(
            f"the export lock's PostgreSQL session ended ({type(exc).__name__}): another export may "
            f"be running; not {before}"
        )
    if isinstance(exc, (asyncpg.PostgresError, TimeoutError)):  # unknown is lost, said as unknown
        why = (
            f"no answer within {CONFIRM_TIMEOUT_S:g}s"
            if isinstance(exc, TimeoutError)
            else type(exc).__name__
        )
        return ExportLockLost(
            f"could not confirm that this export still holds its lock ({why}); not {before}"
        )
    return None
