"""Numbered schema migrations (``shared/migrations/NNNN_name.sql``), applied once each, in order.

Idempotent: applied versions are recorded in ``jiralake_schema_migrations``; an advisory lock keeps two
``setup`` runs from applying the same file at once.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

import asyncpg
import structlog

from shared.errors import CommandError

log = structlog.get_logger()

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
LOCK_KEY = 0x6A6C_6D69  # "jlmi": serialises concurrent migrators

# -- create_migrations_table --
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS jiralake_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


# -- migration_lock_holder --
# The backend holding the migrators' advisory lock (a 32-bit key: classid 0, objid the key). Advisory
# locks are per database, and pg_locks lists every database's.
_LOCK_HOLDER = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND classid = 0 AND objid = $1 AND objsubid = 1 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
LIMIT 1
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    found = []
    for entry in resources.files("shared.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return found


@cache
def latest_version() -> int:
    """The last migration this version of jiralake knows (read once: the consumer asks before every
    receive)."""
    return available()[-1].version


# -- schema_version --
# And whether the session takes no writes (a standby, a demoted primary): the same round trip.
_SCHEMA_VERSION = (
    "SELECT max(version), current_setting('transaction_read_only') = 'on' FROM jiralake_schema_migrations"
)


async def check_schema(conn: asyncpg.Connection, *, timeout_s: float | None = None) -> bool:
    """Refuse (a one-line :class:`CommandError`, exit 1) a schema older than this code: code that needs
    a table or column `setup` has not created yet would fail at its first statement, halfway through
    its work. A newer schema is fine: migrations only add, so a rolled-back version runs on it.
    Returns whether the session is read-only (read in the same statement, for the consumer's check
    before each receive)."""
    try:
        row = await conn.fetchrow(_SCHEMA_VERSION, timeout=timeout_s)
        assert row is not None
        version: int | None = row[0]
        read_only = bool(row[1])
    except asyncpg.UndefinedTableError:
        version, read_only = None, False  # never set up: refused below whatever the session takes
    latest = latest_version()
    if version is None or version < latest:
        found = "no migration" if version is None else f"migrations up to {version:04d}"
        raise CommandError(
            f"the database's schema has {found}; this version of jiralake needs {latest:04d}: run "
            "`jiralake setup --skip-queues` first (the migrations only)",
            exit_code=1,
        )
    return read_only


async def apply(conn: asyncpg.Connection) -> list[Migration]:
    """Apply every migration not yet recorded; returns the ones applied by this call."""
    applied_now: list[Migration] = []
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        # Another setup is migrating: say so (a long migration prints nothing until it is done), then wait.
        holder = await conn.fetchval(_LOCK_HOLDER, LOCK_KEY)
        log.info("waiting_for_migration_lock", holder_pid=holder)
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM jiralake_schema_migrations")}
        for migration in available():
            if migration.version in done:
                continue
            log.info("migration_started", version=migration.version, name=migration.name)
            await _apply_one(conn, migration)
            log.info("migration_applied", version=migration.version, name=migration.name)
            applied_now.append(migration)
    except BaseException:
        # The failure says what went wrong: an unlock that fails too must not replace it.
        await _quietly(conn, lambda: conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY))
        raise
    await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return applied_now


async def _apply_one(conn: asyncpg.Connection, migration: Migration) -> None:
    """One migration and its record, in one transaction. ``BEGIN``/``ROLLBACK`` by hand, not asyncpg's
    ``async with conn.transaction()``: on a connection the server ended (a failover, an operator's
    pg_terminate_backend), its exit raised "the underlying connection is closed" over the server's
    own reason."""
    await conn.execute("BEGIN")
    try:
        await _execute_logging_warnings(conn, migration)
        await conn.execute(
            "INSERT INTO jiralake_schema_migrations (version, name) VALUES ($1, $2)",
            migration.version,
            migration.name,
        )
    except BaseException:
        await _quietly(conn, lambda: conn.execute("ROLLBACK"))
        raise
    await conn.execute("COMMIT")


async def _quietly(conn: asyncpg.Connection, statement: Callable[[], Awaitable[object]]) -> None:
    """Run ``statement`` after a failure that is already on its way up: on a closed or broken
    connection it cannot run, and what ends the session ends its transaction and its lock too."""
    if conn.is_closed():
        return
    try:
        await statement()
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        pass


async def _execute_logging_warnings(conn: asyncpg.Connection, migration: Migration) -> None:
    """Run one migration; a WARNING it raises (an optional step it skipped) is logged, not dropped."""

    def forward(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
        if message.severity_en == "WARNING":  # severity itself follows the server's lc_messages
            log.warning("migration_warning", version=migration.version, message=message.message)

    conn.add_log_listener(forward)
    try:
        await conn.execute(migration.sql)
    finally:
        conn.remove_log_listener(forward)
