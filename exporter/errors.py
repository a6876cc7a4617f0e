"""Why an export failed, as one line, decided in one place.

An export either succeeds, or fails for a reason a person can act on (the database or S3 is unreachable
or refuses, another export holds the lock, the process was stopped), or hits a bug. The first two are
reported as one line and a non-zero exit (or, on a schedule, logged and retried at the next run); a bug
raises and crashes loudly.
"""

from __future__ import annotations

import asyncio

import asyncpg
from botocore.exceptions import BotoCoreError, ClientError

from shared import db
from shared.errors import one_line


class ExportError(Exception):
    """An export cannot go on; the message is one line saying why."""


class ExportLocked(ExportError):
    """Another export holds the advisory lock."""


class ExportLockLost(ExportError):
    """The session that held the advisory lock ended mid-run: the run must not publish."""


def failure_reason(exc: BaseException) -> str | None:
    """One line for a failure a person can act on; None for anything else (a bug)."""
    if isinstance(exc, ExportError):
        return str(exc)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        operation = getattr(exc, "operation_name", "request")
        message = one_line(str(error.get("Message", "")))
        return f"S3 {operation} failed: {error.get('Code', '?')}: {message}".rstrip(": ")
    if isinstance(exc, BotoCoreError):
        return f"S3 unreachable: {one_line(str(exc))}"
    if isinstance(exc, asyncpg.PostgresError):
        return f"PostgreSQL error: {type(exc).__name__}: {one_line(str(exc))}{db.schema_hint(exc)}"
    if isinstance(exc, asyncpg.InterfaceError) or db.session_ended(exc):
        return f"PostgreSQL connection failed: {type(exc).__name__}: {one_line(str(exc))}"
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return f"{type(exc).__name__}: {one_line(str(exc)) or 'timed out'}"
    return None
