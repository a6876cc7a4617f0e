"""``jiralake history prune --older-than DAYS [--dry-run] [--batch-size N]``: delete the history rows
(``ap_jira_task_event``) recorded more than DAYS days ago, in small batches. Opt-in: nothing in
jiralake prunes by itself. Operators' guide: docs/operations.md, "Pruning the history".

**Which time.** ``ingested_at``, when the consumer recorded the row: Postgres's clock, never NULL,
and never earlier than the moment the message was sent to SQS. Not ``received_at``: it is NULL where
the producer gave no receive time (those rows would never go) and comes from the receiver's clock,
while the cutoff comes from Postgres's. Not ``event_at``: it is the event's own time, for a backfill
snapshot the issue's ``updated``, so a row recorded today can be years "old": the prune would delete
rows whose messages SQS can still redeliver, and every backfill re-run would record them again.

**Why at least 14 days.** The consumer recognises a redelivery by its history row (``ON CONFLICT
(delivery_id) DO NOTHING``, consumer/queries.sql). SQS keeps a message at most 14 days after it was
sent, so a row recorded more than 14 days ago cannot come back from the main queue. One that comes
back after its row was pruned changes nothing in ``ap_jira_task`` (the version guard), but is counted
``skipped_stale`` (``history_only`` for comments and the like) instead of ``duplicate`` and is recorded
again, as a new history row with ``applied`` false. A dead-lettered message can come back later (a
FIFO dead-letter queue keeps it 14 days from when it moved there, and ``dlq replay`` sends it again).

**Batches.** Each batch is one statement, its own short transaction: the oldest ``batch_size`` rows
below the cutoff, found through the ``ingested_at`` index (migration 0008) from where the previous
batch ended, deleted by primary key. It locks only rows recorded before the cutoff, which the consumer
never writes: neither waits for the other (except a redelivery of a row in the batch being deleted, for
that batch's milliseconds), so they run at the same time. forget-user does write them: a row it
updates while a batch waits for it is deleted once it commits. SIGINT/SIGTERM stop it at once: the
batch in progress (or waiting for a lock) is rolled back.

**A server that stops answering** (frozen, or a network that drops packets) ends it, exit 1 and one
line, rather than leave it waiting for ever (a cron-run prune would pile up behind it): every
statement has ``db.STATEMENT_TIMEOUT_S`` (a minute) to answer, measured here. That never cuts real
work because every statement reads or writes a bounded number of rows: a batch deletes at most
``--batch-size`` rows (at most MAX_BATCH_SIZE, 100,000; 1,000 by default: milliseconds) by index,
after waiting LOCK_TIMEOUT at most for a lock; the cutoff and the oldest row are one index entry each.
The dry run does not count every row before the cutoff in one statement (on a history of tens of
millions of rows that may rightly take longer than any fixed bound): it counts them in windows of
COUNT_WINDOW_ROWS in ``ingested_at`` order through the same index, each one statement (plus the rows
recorded in the very same microsecond as a window's last, one consumer transaction's). A batch is one
statement: it was deleted whole or not at all.

Exit codes: 0 done (also a dry run); 2 bad arguments or configuration, a retention under 14 days
included; 1 Postgres unreachable, refusing, not answering a statement within a minute, or the table
locked by someone else; 130/143 stopped by SIGINT/SIGTERM (what was deleted stays deleted: run it
again to go on); 70 a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog

from shared import argtypes, db
from shared.errors import CommandError
from shared.settings import DatabaseSettings
from shared.shutdown import Stopped, run_unless_stopped, signal_exit_code, stop_name, stop_on_signals

log = structlog.get_logger()

# SQS keeps a message at most 14 days (MessageRetentionPeriod's maximum): see the module docstring.
MIN_RETENTION_DAYS = 14
MAX_RETENTION_DAYS = 36500  # 100 years: more is a typo
DEFAULT_BATCH_SIZE = 1000
MAX_BATCH_SIZE = 100_000
USAGE_EXIT_CODE = 2
# A DELETE waits this long at most for a lock someone else holds (a migration, VACUUM FULL).
LOCK_TIMEOUT = "10s"
# The dry run counts this many rows a statement at most (see the module docstring): index entries
# only, tens of milliseconds each; a second or two where the heap must be read too (a table not yet
# vacuumed). Every statement has db.STATEMENT_TIMEOUT_S.
COUNT_WINDOW_ROWS = 100_000
PROGRESS_LOG_INTERVAL_S = 10.0
APPLICATION_NAME = "jiralake-history-prune"

LOG_STARTED = "history_prune_started"
LOG_BATCH = "history_prune_batch"
LOG_PROGRESS = "history_prune_progress"
LOG_FINISHED = "history_prune_finished"
LOG_STOPPED = "history_prune_stopped"

RETENTION_HELP = (
    f"at least {MIN_RETENTION_DAYS}: the consumer recognises a redelivered message by its history row, "
    f"and SQS can redeliver a message for up to {MIN_RETENTION_DAYS} days after it was sent"
)
EXIT_CODES_HELP = (
    "Exit codes: 0 done (also with --dry-run); 2 bad arguments or configuration; 1 PostgreSQL "
    f"unreachable, refusing or not answering a statement within {db.STATEMENT_TIMEOUT_S:g} s, or the "
    "table locked too long (each batch is deleted whole or not at all: run it again to go on); 130/143 "
    f"stopped by SIGINT/SIGTERM, within {db.CLOSE_TIMEOUT_S:g} s even when PostgreSQL does not answer, "
    "the batch in progress rolled back (what was deleted stays deleted: run it again to go on)."
)

# -- cutoff --
# Postgres's clock, the one ingested_at comes from. Days of 24 hours: SQS counts its retention in
# seconds, and a calendar day in a session time zone with daylight saving may be 23 hours.
CUTOFF_SQL = "SELECT now() - make_interval(hours => 24 * $1)"

# -- oldest_recorded --
OLDEST_SQL = "SELECT min(ingested_at) FROM ap_jira_task_event"

# -- count_window --
# The rows recorded after $1 (NULL: from the first) up to t, and t: the time of the $3-th row recorded
# after $1 and before the cutoff $2 (or of the last before the cutoff, when there are fewer); NULL t,
# none left. Every row recorded at t itself is counted, so the next window starts after t. Both reads
# go through the ingested_at index: $3 entries, and again those (plus any more recorded at t).
COUNT_WINDOW_SQL = """
WITH window_end AS (
    SELECT max(ingested_at) AS t
    FROM (SELECT ingested_at FROM ap_jira_task_event
          WHERE ingested_at > coalesce($1::timestamptz, '-infinity') AND ingested_at < $2
          ORDER BY ingested_at
          LIMIT $3) AS window_rows
)
SELECT (SELECT count(*) FROM ap_jira_task_event
        WHERE ingested_at > coalesce($1::timestamptz, '-infinity') AND ingested_at <= window_end.t) AS rows,
       window_end.t AS newest
FROM window_end
"""

# -- delete_batch --
# $1: where the previous batch ended (its newest ingested_at; rows of that same time may remain), so
# the index scan starts past the entries earlier batches deleted. $2: the cutoff. $3: the batch size.
# Deleted by primary key, not ctid: a row another session updates while the batch waits for it
# (forget-user scrubbing it) gets a new ctid, and PostgreSQL's recheck would skip it.
DELETE_BATCH_SQL = """
WITH deleted AS (
    DELETE FROM ap_jira_task_event
    WHERE delivery_id = ANY (ARRAY(
        SELECT delivery_id FROM ap_jira_task_event
        WHERE ingested_at >= $1 AND ingested_at < $2
        ORDER BY ingested_at
        LIMIT $3
    ))
      AND ingested_at < $2
    RETURNING ingested_at
)
SELECT count(*) AS deleted, max(ingested_at) AS newest FROM deleted
"""


@dataclass(frozen=True)
class PruneOptions:
    older_than_days: int
    batch_size: int = DEFAULT_BATCH_SIZE
    dry_run: bool = False


@dataclass
class PruneSummary:
    cutoff: datetime
    older_than_days: int
    batch_size: int
    dry_run: bool
    # Rows deleted (with --dry-run: rows that would be).
    rows: int = 0
    # Batches run (with --dry-run: batches it would take).
    batches: int = 0
    # The oldest row left, when the prune ran to its end; None when the history is empty.
    oldest_left: datetime | None = None
    # True when a stop request ended it, and the signal that made it, if one did.
    stopped: bool = False
    stop_signal: signal.Signals | None = None
    duration_s: float = 0.0


def check_retention(days: int) -> None:
    """Refuse what cannot be meant, in one line (exit 2): the minimum's reason is in the message."""
    if days < 1:
        raise CommandError(
            f"--older-than must be a number of days, at least {MIN_RETENTION_DAYS}, got {days}",
            USAGE_EXIT_CODE,
        )
    if days < MIN_RETENTION_DAYS:
        raise CommandError(
            f"--older-than {days} is inside SQS's {MIN_RETENTION_DAYS}-day redelivery window: a message "
            "redelivered after its history row was pruned would be recorded again as a new delivery; "
            f"use {MIN_RETENTION_DAYS} days or more",
            USAGE_EXIT_CODE,
        )
    if days > MAX_RETENTION_DAYS:
        raise CommandError(
            f"--older-than must be at most {MAX_RETENTION_DAYS} days (100 years), got {days}",
            USAGE_EXIT_CODE,
        )


async def cutoff_for(conn: asyncpg.Connection, older_than_days: int) -> datetime:
    cutoff: datetime = await conn.fetchval(CUTOFF_SQL, older_than_days)
    return cutoff


async def count_prunable(conn: asyncpg.Connection, cutoff: datetime) -> int:
    """The rows recorded before ``cutoff``, counted a window of COUNT_WINDOW_ROWS at a time."""
    window_rows = COUNT_WINDOW_ROWS  # read at the call: tests lower it
    count, after = 0, None
    while True:
        row = await conn.fetchrow(COUNT_WINDOW_SQL, after, cutoff, window_rows)
        assert row is not None
        if row["newest"] is None:
            return count
        count, after = count + row["rows"], row["newest"]


async def delete_batch(
    conn: asyncpg.Connection, *, start: datetime, cutoff: datetime, limit: int
) -> tuple[int, datetime | None]:
    """Delete the oldest ``limit`` rows recorded in [start, cutoff): (rows deleted, newest time deleted)."""
    row = await conn.fetchrow(DELETE_BATCH_SQL, start, cutoff, limit)
    assert row is not None
    return row["deleted"], row["newest"]


async def prune_history(
    conn: asyncpg.Connection,
    cutoff: datetime,
    *,
    older_than_days: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> PruneSummary:
    """Delete every history row recorded before ``cutoff``, ``batch_size`` at a time, until done or
    ``stop`` is set (the batch in progress is then cancelled)."""
    started = clock()
    summary = PruneSummary(cutoff, older_than_days, batch_size, dry_run=False)
    last_logged = started
    try:  # like a batch, the search for the first one ends at once on a stop
        start: datetime | None = await run_unless_stopped(
            conn.fetchval(OLDEST_SQL), stop, name="history-prune-oldest"
        )
    except Stopped:
        start, summary.stopped = None, True
    while start is not None and start < cutoff:
        if stop is not None and stop.is_set():
            summary.stopped = True
            break
        batch = delete_batch(conn, start=start, cutoff=cutoff, limit=batch_size)
        try:  # a batch waiting up to LOCK_TIMEOUT for a lock is rolled back at once on a stop
            deleted, newest = await run_unless_stopped(batch, stop, name="history-prune-batch")
        except Stopped:
            summary.stopped = True
            break
        if deleted == 0:
            break  # nothing is left before the cutoff, and nothing new can be recorded there
        summary.rows += deleted
        summary.batches += 1
        log.debug(LOG_BATCH, deleted=deleted, rows_deleted=summary.rows, batches=summary.batches)
        if clock() - last_logged >= PROGRESS_LOG_INTERVAL_S:
            last_logged = clock()
            log.info(LOG_PROGRESS, rows_deleted=summary.rows, batches=summary.batches, up_to=_iso(newest))
        start = newest
    if not summary.stopped:
        summary.oldest_left = await conn.fetchval(OLDEST_SQL)
    summary.duration_s = clock() - started
    return summary


async def dry_run(
    conn: asyncpg.Connection, cutoff: datetime, *, older_than_days: int, batch_size: int
) -> PruneSummary:
    rows = await count_prunable(conn, cutoff)
    return PruneSummary(
        cutoff, older_than_days, batch_size, dry_run=True, rows=rows, batches=math.ceil(rows / batch_size)
    )


async def run(database: DatabaseSettings, options: PruneOptions) -> PruneSummary:
    """The command: connect, take the cutoff from Postgres's clock, prune (or count) until done or
    SIGINT/SIGTERM."""
    check_retention(options.older_than_days)
    conn, postgres = await db.connect_bounded(
        database, server_settings={"application_name": APPLICATION_NAME, "lock_timeout": LOCK_TIMEOUT}
    )
    try:
        with postgres():
            cutoff = await cutoff_for(conn, options.older_than_days)
            if options.dry_run:
                _log_started(cutoff, options)
                summary = await dry_run(
                    conn, cutoff, older_than_days=options.older_than_days, batch_size=options.batch_size
                )
            else:
                with stop_on_signals() as stop:
                    _log_started(cutoff, options)  # from here a signal stops it
                    summary = await prune_history(
                        conn,
                        cutoff,
                        older_than_days=options.older_than_days,
                        batch_size=options.batch_size,
                        stop=stop.event,
                    )
                    if summary.stopped:
                        summary.stop_signal = stop.signal
    except db.Unanswered as exc:
        raise db.unanswered_error(
            exc,
            "nothing was deleted (a dry run)"
            if options.dry_run
            else "what was deleted stays deleted, the batch in progress was deleted whole or not at all",
        ) from None
    except asyncpg.LockNotAvailableError:
        what = "nothing was counted" if options.dry_run else "the batch was not deleted"
        raise CommandError(
            f"ap_jira_task_event stayed locked by another session for {LOCK_TIMEOUT} (a "
            f"migration, VACUUM FULL?); {what}; run it again later"
        ) from None
    finally:
        await db.close(conn)
    event = LOG_STOPPED if summary.stopped else LOG_FINISHED
    log.info(
        event,
        cutoff=_iso(cutoff),
        dry_run=summary.dry_run,
        rows=summary.rows,
        batches=summary.batches,
        signal=summary.stop_signal.name if summary.stop_signal else None,
        duration_ms=round(summary.duration_s * 1000),
    )
    return summary


def _log_started(cutoff: datetime, options: PruneOptions) -> None:
    log.info(
        LOG_STARTED,
        cutoff=_iso(cutoff),
        older_than_days=options.older_than_days,
        batch_size=options.batch_size,
        dry_run=options.dry_run,
    )


def render(summary: PruneSummary) -> str:
    recorded = (
        f"history rows recorded before {_iso(summary.cutoff)} (more than {summary.older_than_days} days ago)"
    )
    if summary.dry_run:
        return (
            f"dry run, nothing deleted: would delete {summary.rows} {recorded} "
            f"in {summary.batches} batch(es) of up to {summary.batch_size}"
        )
    text = f"deleted {summary.rows} {recorded} in {summary.batches} batch(es) of up to {summary.batch_size}"
    if summary.stopped:
        return text + f"; stopped by {stop_name(summary.stop_signal)} before the end"
    if summary.oldest_left is None:
        return text + "; the history is now empty"
    return text + f"; the oldest row left was recorded at {_iso(summary.oldest_left)}"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "history",
        help="retention of the event history (ap_jira_task_event)",
        description="Retention of the event history table, ap_jira_task_event. See docs/operations.md.",
    )
    actions = parser.add_subparsers(dest="history_action", metavar="ACTION", required=True)
    prune = actions.add_parser(
        "prune",
        help="delete history rows recorded more than DAYS days ago, in small batches",
        description="Deletes the ap_jira_task_event rows the consumer recorded (ingested_at) more than "
        "DAYS days ago, oldest first, in batches that are each their own short transaction; safe while "
        "the consumer runs; SIGINT/SIGTERM stop it at once. Never automatic. The history is "
        "what status-time and cycle-time queries read: they see nothing before the cutoff afterwards, "
        "and only ap_jira_task is exported to S3. Settings: DATABASE_URL (else libpq's PG* variables).",
        epilog=EXIT_CODES_HELP,
    )
    prune.add_argument(
        "--older-than",
        type=argtypes.integer(),
        required=True,
        metavar="DAYS",
        help=f"delete rows recorded more than DAYS days ago; {RETENTION_HELP}",
    )
    argtypes.add_batch_size(prune, default=DEFAULT_BATCH_SIZE, maximum=MAX_BATCH_SIZE)
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    prune.set_defaults(func=_prune_command)


def _prune_command(args: argparse.Namespace) -> int:
    check_retention(args.older_than)  # before reading any setting: a refusal needs no database
    options = PruneOptions(older_than_days=args.older_than, batch_size=args.batch_size, dry_run=args.dry_run)
    summary = asyncio.run(run(DatabaseSettings.from_env(os.environ), options))
    print(render(summary))
    if summary.stopped:
        raise CommandError(
            f"history prune stopped by {stop_name(summary.stop_signal)} after {summary.batches} "
            "batch(es); what was deleted stays deleted; run the same command again to go on",
            exit_code=signal_exit_code(summary.stop_signal),
        )
    return 0
