"""Postgres connections from :class:`DatabaseSettings` (``DATABASE_URL``, else libpq's ``PG*`` variables)."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import Any

import asyncpg

from shared.errors import CommandError, one_line
from shared.settings import ConfigError, DatabaseSettings

# Longest wait to open one connection (asyncpg's ``timeout``); a caller's own ``timeout=`` wins.
CONNECT_TIMEOUT_S = 10.0
# Per-statement bound for pooled connections (asyncpg's ``command_timeout``); the consumer passes its
# JIRALAKE_CONSUMER_STATEMENT_TIMEOUT_S. Single connections (db.connect) stay unbounded unless the
# caller asks: they run the exporter's COPY/cursor streams and migrate's advisory-lock wait, which
# legitimately last longer than any fixed per-statement bound.
POOL_COMMAND_TIMEOUT_S = 60.0
# Longest wait for the server to take a connection's goodbye; then the socket is closed from this side.
CLOSE_TIMEOUT_S = 5.0
# Longest wait for PostgreSQL's answer to any one statement of a one-off command whose every statement
# reads or writes a bounded number of rows (forget-user, history prune, backfill, reconcile: each
# module's docstring says why its statements are bounded, and a minute is many times the largest).
# asyncpg's command_timeout, measured here: it also ends the wait on a server or a network that
# stopped answering, which no server-side timeout does, so that such a command ends (exit 1, one
# line) rather than hang for ever, or pile up under cron. Read at each command's call: tests lower it.
STATEMENT_TIMEOUT_S = 60.0


# asyncpg errors that mean the server ended the session (found by tests/test_fault_injection.py and
# tests/test_reliability_export_publish.py):
# - InterfaceError "connection is closed";
# - InterfaceError "... connection has been released back to the pool": the server ended the session
#   of a pooled connection a caller holds (a restart, pg_terminate_backend) and asyncpg detached it;
# - InternalClientError "cannot switch to state N; another operation (2) is in progress": a query
#   started after the server's FATAL message on an idle connection arrived but before the socket
#   closed (state 2 is the protocol consuming that error).
_SESSION_ENDED = ("closed", "released back to the pool", "another operation (2) is in progress")


def session_ended(exc: BaseException) -> bool:
    """Whether ``exc`` is asyncpg saying the connection's server session is gone."""
    return isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)) and any(
        text in str(exc) for text in _SESSION_ENDED
    )


# PostgreSQL's answers when jiralake's schema is not there or older than the code: a database never
# set up, or an upgrade deployed before `jiralake setup` applied its migrations.
_SCHEMA_ERRORS = (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, asyncpg.UndefinedFunctionError)
SCHEMA_HINT = (
    "the database lacks jiralake's tables or a newer migration: run `jiralake setup --skip-queues` first "
    "(the migrations only; plain `jiralake setup` also creates the queues)"
)


def schema_hint(exc: BaseException) -> str:
    """``"; " + SCHEMA_HINT`` to add to an error that means the schema is missing or older, else ""."""
    return f"; {SCHEMA_HINT}" if isinstance(exc, _SCHEMA_ERRORS) else ""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python objects; asyncpg leaves them as text otherwise.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


# What asyncpg raises, before any network, for connection parameters it cannot use. DATABASE_URL is
# checked beforehand (shared.settings.check_database_url); these come from libpq's variables, which
# asyncpg reads where the URL leaves a parameter out (PGPORT=abc, PGHOST="a,", PGSSLMODE=" ").
_BAD_PARAMETERS = (ValueError, IndexError, UnicodeError, asyncpg.ClientConfigurationError)


def _bad_parameters(exc: BaseException) -> ConfigError:
    return ConfigError(
        "PostgreSQL's connection parameters (DATABASE_URL and the PG* variables it leaves out: PGHOST, "
        f"PGPORT, PGSSLMODE, ...) are not usable: {type(exc).__name__}: {one_line(str(exc))[:200]}"
    )


def _unresolved(db: DatabaseSettings, exc: socket.gaierror) -> socket.gaierror:
    """The resolver's error naming the host names it could not resolve (asyncpg's names none); the
    same class, so whoever retries an unreachable server still does."""
    names = db.host_names()
    where = f"PostgreSQL host {', '.join(map(repr, names))}" if names else "PostgreSQL host (PGHOST)"
    return socket.gaierror(exc.errno, f"{exc.strerror}: {where}")


async def connect(db: DatabaseSettings, **kwargs: Any) -> asyncpg.Connection:
    kwargs.setdefault("timeout", CONNECT_TIMEOUT_S)
    try:
        conn = await asyncpg.connect(dsn=db.url, **kwargs)
    except _BAD_PARAMETERS as exc:
        raise _bad_parameters(exc) from None
    except socket.gaierror as exc:
        raise _unresolved(db, exc) from None
    await _init_connection(conn)
    return conn


async def create_pool(
    db: DatabaseSettings, *, min_size: int = 1, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    kwargs.setdefault("timeout", CONNECT_TIMEOUT_S)
    kwargs.setdefault("command_timeout", POOL_COMMAND_TIMEOUT_S)
    try:
        pool = await asyncpg.create_pool(
            dsn=db.url, min_size=min_size, max_size=max_size, init=_init_connection, **kwargs
        )
    except _BAD_PARAMETERS as exc:
        raise _bad_parameters(exc) from None
    except socket.gaierror as exc:
        raise _unresolved(db, exc) from None
    assert pool is not None
    return pool


class Unanswered(Exception):
    """A statement PostgreSQL did not answer within the connection's ``command_timeout``; the
    connection is closed from this side (the server rolls back a transaction whose session is gone; a
    statement it was running on its own completes whole or not at all). ``at_commit``: the statement
    was a transaction's COMMIT (:func:`commit`), which the server may have carried out: whether the
    transaction was committed is unknown."""

    def __init__(self, timeout_s: float, *, at_commit: bool = False) -> None:
        self.at_commit = at_commit
        statement = "the COMMIT of a transaction" if at_commit else "a statement"
        super().__init__(
            f"PostgreSQL did not answer {statement} within {timeout_s:g} s (a server or network that "
            "stopped answering)"
        )


class CommitUnanswered(TimeoutError):
    """A COMMIT PostgreSQL did not answer in time (:func:`commit`)."""


async def commit(transaction: asyncpg.transaction.Transaction) -> None:
    """``transaction.commit()``, telling a COMMIT not answered in time (:class:`CommitUnanswered`, which
    :func:`unanswered_raised` turns into ``Unanswered(at_commit=True)``) from any other statement's:
    the server may have committed it, and only the lost answer says otherwise."""
    try:
        await transaction.commit()
    except TimeoutError:
        raise CommitUnanswered from None


@asynccontextmanager
async def bounded_transaction(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """``conn.transaction()`` for a connection with a ``command_timeout``: a statement not answered in
    time closes ``conn`` from this side at once (a ROLLBACK would wait as long again; the server rolls
    back a transaction whose session is gone), and the COMMIT goes through :func:`commit`, so a lost
    answer to it is told apart. Use inside :func:`unanswered_raised`."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    except TimeoutError:
        conn.terminate()
        raise
    except BaseException:
        await transaction.rollback()
        raise
    await commit(transaction)


@contextmanager
def unanswered_raised(conn: asyncpg.Connection, timeout_s: float) -> Iterator[None]:
    """Inside: PostgreSQL statements on ``conn``, connected with ``command_timeout=timeout_s``, and
    nothing else that may raise :class:`TimeoutError` (a Jira or SQS call). A statement not answered in
    time closes ``conn`` from this side (a ROLLBACK or a goodbye would wait as long again) and raises
    :class:`Unanswered`; the command says in one line what that left done and undone
    (:func:`unanswered_error`)."""
    try:
        yield
    except TimeoutError as exc:
        conn.terminate()
        raise Unanswered(timeout_s, at_commit=isinstance(exc, CommitUnanswered)) from None


async def connect_bounded(
    db: DatabaseSettings, **kwargs: Any
) -> tuple[asyncpg.Connection, Callable[[], AbstractContextManager[None]]]:
    """A connection whose every statement has STATEMENT_TIMEOUT_S (read now: tests lower it), and the
    :func:`unanswered_raised` to put around its statements, and only those (a Jira or SQS timeout is
    not PostgreSQL's)."""
    timeout_s = STATEMENT_TIMEOUT_S
    conn = await connect(db, command_timeout=timeout_s, **kwargs)
    return conn, functools.partial(unanswered_raised, conn, timeout_s)


def unanswered_error(exc: Unanswered, outcome: str) -> CommandError:
    """The one line (exit 1) a one-off command ends with when PostgreSQL stopped answering:
    ``outcome`` says what was done and what was not."""
    return CommandError(f"{exc}; {outcome}; check the server, then run the same command again")


async def close(conn: asyncpg.Connection) -> None:
    """Close ``conn`` politely, or from this side after CLOSE_TIMEOUT_S: a server that does not answer
    (frozen, or a network that drops packets) would otherwise hold a stopping command for minutes, or
    for ever. Shielded: a stop that arrives meanwhile does not leave the connection half-closed."""
    try:
        await asyncio.shield(conn.close(timeout=CLOSE_TIMEOUT_S))
    except Exception:
        conn.terminate()
