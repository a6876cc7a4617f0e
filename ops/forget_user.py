"""``jiralake forget-user (--account-id ID | --username NAME [--pseudonym NAME] [--key KEY ...])
[--dry-run] [--batch-size N]``: erase one person's personal data from ``ap_jira_task`` and
``ap_jira_task_event`` (a GDPR erasure request), in small batches beside the running consumer. Never
automatic. Operators' guide: docs/runbook.md, "Erasing a person"; what is stored where: README.md,
"Personal data".

**Who.** Jira Cloud: ``--account-id``, the person's ``accountId``, matched exactly. Server/Data
Center: ``--username``, matched without regard to case as Jira does, against ``name`` (and ``key``
in user objects without a ``name``), the id consumer/issue_row.py's ``user_id`` reads. A JSON object
is the person's user object when its id fields say so (for ``--username`` it must also carry
``accountId``, ``displayName`` or ``emailAddress``, so a project or status named like the user is
not one); display names are never matched, so a namesake is never touched. The ``key`` of the
person's user objects (Data Center keys such as ``JIRAUSER10100``, which changelog items carry in
``from``/``to``) and, on Cloud, the ``name``/``key`` old payloads carried beside the ``accountId`` are
learned from ``ap_jira_task`` before anything is scrubbed (username mode: a pass that reads and
changes nothing; Cloud: a pass over ``ap_jira_task`` that learned an id is followed by another, for
the rows searched before it) and matched in changelog items of both tables. In username mode, once a
key of the person's is known, a changelog item naming the username is theirs only if the username is
one of their keys: a renamed user keeps their old username as their key, and that username may since
have gone to the person being forgotten.

**What changes.** Each of the person's user objects anywhere in ``raw`` (assignee, reporter,
creator, comment and worklog authors, user-picker custom fields, changelog authors: the JSON is
walked, whatever the field) keeps only ``accountId``, ``accountType`` and ``active``; its
``displayName`` becomes ``"Former user"``, what Jira Cloud itself shows and sends for a deleted
account; ``emailAddress``, ``avatarUrls`` (a Data Center avatar URL holds the username or a Gravatar
hash of the email), ``timeZone``, ``self`` (``...user?username=...``) and anything else go. The
display-name columns (``assignee_display_name``, ``reporter_display_name``, ``actor_display_name``)
become ``"Former user"`` too, not NULL: NULL means unassigned or unknown there, and a dashboard
that shows NULL as "Unassigned" would move the person's issues into it. In changelog items of a
user field whose ``from``/``to`` (or Cloud's ``tmpFromAccountId``/``tmpToAccountId``) name the
person, ``fromString``/``toString`` become ``"Former user"``. Only a numeric id is in doubt: a
status, sprint, version or select option carries a numeric id there too, which a numeric username
or key would match. Such an item is the person's only in a field Cloud marks as a user field, in
Jira's own assignee/reporter/creator, or where its text shows one of the person's display names
(from their user objects, their actor rows, or items already matched); Jira's own status-like
fields never are.

**Ids, so that counts per person still add up.** A Cloud ``accountId`` stays: it is an opaque id,
the one Atlassian's privacy guide has apps key and report personal data by, and Jira keeps sending
it (with "Former user") for the deleted account, so old and new rows agree. A Server/Data Center
username (often the person's name) is replaced wherever it is the id (``name``, ``key``, the id
columns, changelog ``from``/``to``) by a pseudonym: ``--pseudonym``, for example the ``jirauserNNNNN``
Jira's own anonymization gave the person (then old rows and Jira's new events agree), else
``former-user-`` + 16 hex digits of an HMAC-SHA256 of the lower-cased username under a random key
kept in ``jiralake_pseudonym_key`` (migration 0009): the same person always gets the same one, and
nobody without the key can confirm a guessed username from it (a plain hash of a username is
reversed by trying names). The id columns keep their meaning: the person's id, NULL only when
unassigned.

**Not rewritten.** Free text (summary, description, comment and worklog bodies, mentions such as
``[~username]``), multi-user changelog values (``"[alice, bob]"``), and user objects that carry no id
at all. Jira does not rewrite free text either.

**Batches.** Per table, in primary-key order: one unlocked statement finds the next rows whose id
columns or JSON text contain one of the person's ids (a superset), reading at most a window of
``SCAN_WINDOW_ROWS`` rows (so that no statement reads the whole table), then one short transaction locks
those rows (``FOR UPDATE``, in key order, the order the consumer locks in), scrubs them in Python from
what it locked, and writes only the rows that changed. The consumer waits at most for one batch;
``version`` is never touched, so a newer event still applies. ``ap_jira_task.ingested_at`` is set
(the row changed, and ``changes/`` exports pick it up); the history's ``ingested_at`` is not (it
is when the consumer recorded the row, which history prune reads). Running it again finds nothing
more to change: it is idempotent. A stop cancels the batch in progress (rolled back, also while it
waits for a row another session holds) and loses nothing; a server that does not confirm the rollback
within db.CLOSE_TIMEOUT_S gets its connection closed from this side (it rolls back a session that is
gone). Every statement has ``db.STATEMENT_TIMEOUT_S`` to answer, measured here (a frozen server or a
network that drops packets answers nothing, and no server-side timeout ends that); then the command
ends in one line, the batch in progress uncommitted (or, when it was the batch's COMMIT that got no
answer, committed or not: the server may have carried it out; either way it is safe to run again). A
batch failing on a deadlock or a serialization failure (SQLSTATE class 40) is run again,
``BATCH_ATTEMPTS`` times in all, then the command ends in one line.

**The consumer does not undo it** for events it already recorded: a redelivery of the same
delivery is a duplicate (the history row is kept as is) and changes no row (not newer). An event
not yet recorded when this ran (still in the queue or the DLQ, retried by Jira, replayed) is
recorded in the history with the name it carries, and sets the row if it is newer than the row:
the runbook runs this command again once those have drained.

The command (its arguments, their checks, the summary it prints and its exit codes) is
ops/forget_user_command.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import structlog

from ops.user_scrub import Person, pseudonym_for, scrub_event_row, scrub_task_row
from shared import db
from shared.errors import CommandError
from shared.settings import DatabaseSettings
from shared.shutdown import Stopped, run_unless_stopped, stop_on_signals

log = structlog.get_logger()

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 500
# A batch waits this long at most for a row someone else holds (a consumer batch takes milliseconds).
LOCK_TIMEOUT = "10s"
# A search reads at most this many rows (or --batch-size, if more) in key order, whatever the table's
# size: the person may be in a handful of a million rows, and one statement that searched to the next
# match read all of them (about 150 µs a row of 12 KB; minutes on a large table).
SCAN_WINDOW_ROWS = 5_000
# Every statement has db.STATEMENT_TIMEOUT_S (a minute) to answer, as it reads or writes a bounded
# number of rows: a search SCAN_WINDOW_ROWS (a second or two of 12 KB rows; 10,000 with the largest
# --batch-size), a lock or write at most --batch-size rows by key (at most 10,000), a lock waiting
# LOCK_TIMEOUT at most before that. A minute is many times that.
# A batch that fails on a deadlock or a serialization failure (SQLSTATE class 40: another session
# locking the same rows in another order) is rolled back and run again this many times in all, after
# RETRY_BACKOFF_S, doubled each time (0.2 s, 0.4 s, 0.8 s).
BATCH_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.2
PROGRESS_LOG_INTERVAL_S = 10.0
APPLICATION_NAME = "jiralake-forget-user"
TASK_TABLE = "ap_jira_task"
EVENT_TABLE = "ap_jira_task_event"

# Log lines never carry the person's id, username or name: only the mode and counts.
LOG_STARTED = "forget_user_started"
LOG_BATCH = "forget_user_batch"
LOG_PROGRESS = "forget_user_progress"
LOG_NEW_IDS = "forget_user_searching_again_for_new_ids"
LOG_RETRY = "forget_user_batch_retried"
LOG_FINISHED = "forget_user_finished"
LOG_STOPPED = "forget_user_stopped"

# -- task_window --
# The last issue_id of the next $2 rows after issue_id $1, and how many there are (an index-only scan):
# the window a search reads at most.
TASK_WINDOW_SQL = """
SELECT max(issue_id) AS last, count(*) AS rows
FROM (SELECT issue_id FROM ap_jira_task WHERE issue_id > $1 ORDER BY issue_id LIMIT $2) AS window_rows
"""

# -- find_tasks --
# The next rows after issue_id $1, up to $5 (the window's end), that may name the person: an id column
# equal to one of $2 or raw's JSON text containing one of $3 (the ids as JSON writes them), both
# compared lower-cased. A superset: Python decides on each row. Unlocked; the batch locks what it found
# with lock_tasks.
FIND_TASKS_SQL = """
SELECT issue_id, assignee_account_id, assignee_display_name, reporter_account_id,
       reporter_display_name, raw
FROM ap_jira_task
WHERE issue_id > $1 AND issue_id <= $5
  AND (lower(assignee_account_id) IN (SELECT lower(i) FROM unnest($2::text[]) AS i)
       OR lower(reporter_account_id) IN (SELECT lower(i) FROM unnest($2::text[]) AS i)
       OR EXISTS (SELECT 1 FROM unnest($3::text[]) AS n
                  WHERE strpos(lower(raw::text), lower(n)) > 0))
ORDER BY issue_id
LIMIT $4
"""

# -- lock_tasks --
# The rows found, locked in issue_id order (the consumer's upsert locks in that order too) and read
# again: what a concurrent consumer batch committed in between is what gets scrubbed.
LOCK_TASKS_SQL = """
SELECT issue_id, assignee_account_id, assignee_display_name, reporter_account_id,
       reporter_display_name, raw
FROM ap_jira_task
WHERE issue_id = ANY ($1::bigint[])
ORDER BY issue_id
FOR UPDATE
"""

# -- scrub_task --
# version and the other bookkeeping stay: a newer event must still apply over this.
SCRUB_TASK_SQL = """
UPDATE ap_jira_task
SET assignee_account_id = $2, assignee_display_name = $3, reporter_account_id = $4,
    reporter_display_name = $5, raw = $6, ingested_at = clock_timestamp()
WHERE issue_id = $1
"""

# -- event_window --
EVENT_WINDOW_SQL = """
SELECT max(delivery_id) AS last, count(*) AS rows
FROM (SELECT delivery_id FROM ap_jira_task_event WHERE delivery_id > $1 ORDER BY delivery_id LIMIT $2)
     AS window_rows
"""

# -- find_events --
FIND_EVENTS_SQL = """
SELECT delivery_id, actor_account_id, actor_display_name, changelog
FROM ap_jira_task_event
WHERE delivery_id > $1 AND delivery_id <= $5
  AND (lower(actor_account_id) IN (SELECT lower(i) FROM unnest($2::text[]) AS i)
       OR EXISTS (SELECT 1 FROM unnest($3::text[]) AS n
                  WHERE strpos(lower(changelog::text), lower(n)) > 0))
ORDER BY delivery_id
LIMIT $4
"""

# -- lock_events --
LOCK_EVENTS_SQL = """
SELECT delivery_id, actor_account_id, actor_display_name, changelog
FROM ap_jira_task_event
WHERE delivery_id = ANY ($1::text[])
ORDER BY delivery_id
FOR UPDATE
"""

# -- scrub_event --
# ingested_at stays: it is when the consumer recorded the delivery (history prune reads it).
SCRUB_EVENT_SQL = """
UPDATE ap_jira_task_event
SET actor_account_id = $2, actor_display_name = $3, changelog = $4
WHERE delivery_id = $1
"""

# -- ensure_pseudonym_key --
ENSURE_KEY_SQL = "INSERT INTO jiralake_pseudonym_key (id, key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING"

# -- pseudonym_key --
KEY_SQL = "SELECT key FROM jiralake_pseudonym_key WHERE id = 1"


# -- batches --


@dataclass
class ForgetSummary:
    mode: str  # "account-id" or "username"
    dry_run: bool
    batch_size: int
    pseudonym: str | None = None
    # Rows scrubbed (with --dry-run: rows that would be), per table.
    rows: dict[str, int] = field(default_factory=lambda: {TASK_TABLE: 0, EVENT_TABLE: 0})
    batches: int = 0
    stopped: bool = False
    stop_signal: signal.Signals | None = None
    duration_s: float = 0.0


@dataclass(frozen=True)
class _Window:
    """The rows a search reads at most: keys after ``after`` up to ``last``; not ``full`` when the table
    ends in it."""

    after: Any
    last: Any
    full: bool


@dataclass(frozen=True)
class _Table:
    name: str
    key: str
    start: Any
    window: Callable[[asyncpg.Connection, Any, int], Awaitable[asyncpg.Record | None]]
    find: Callable[[asyncpg.Connection, _Window, Person, int], Awaitable[list[asyncpg.Record]]]
    lock: Callable[[asyncpg.Connection, list[Any]], Awaitable[list[asyncpg.Record]]]
    write: Callable[[asyncpg.Connection, list[tuple[Any, ...]]], Awaitable[None]]
    scrub: Callable[[Mapping[str, Any], Person], tuple[Any, ...] | None]


async def _window(conn: asyncpg.Connection, table: _Table, after: Any, batch_size: int) -> _Window | None:
    """The next window of ``table`` after ``after``, or None at the table's end."""
    size = max(SCAN_WINDOW_ROWS, batch_size)
    row = await table.window(conn, after, size)
    assert row is not None
    return None if row["last"] is None else _Window(after, row["last"], full=row["rows"] == size)


async def _task_window(conn: asyncpg.Connection, after: Any, size: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(TASK_WINDOW_SQL, after, size)
    return row


async def _event_window(conn: asyncpg.Connection, after: Any, size: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(EVENT_WINDOW_SQL, after, size)
    return row


async def _find_tasks(
    conn: asyncpg.Connection, window: _Window, person: Person, limit: int
) -> list[asyncpg.Record]:
    terms = person.search_terms()
    rows: list[asyncpg.Record] = await conn.fetch(
        FIND_TASKS_SQL, window.after, terms, _json_texts(terms), limit, window.last
    )
    return rows


async def _lock_tasks(conn: asyncpg.Connection, keys: list[Any]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(LOCK_TASKS_SQL, keys)
    return rows


async def _write_tasks(conn: asyncpg.Connection, changes: list[tuple[Any, ...]]) -> None:
    await conn.executemany(SCRUB_TASK_SQL, changes)


async def _find_events(
    conn: asyncpg.Connection, window: _Window, person: Person, limit: int
) -> list[asyncpg.Record]:
    terms = person.search_terms()
    rows: list[asyncpg.Record] = await conn.fetch(
        FIND_EVENTS_SQL, window.after, terms, _json_texts(terms), limit, window.last
    )
    return rows


async def _lock_events(conn: asyncpg.Connection, keys: list[Any]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(LOCK_EVENTS_SQL, keys)
    return rows


async def _write_events(conn: asyncpg.Connection, changes: list[tuple[Any, ...]]) -> None:
    await conn.executemany(SCRUB_EVENT_SQL, changes)


def _json_texts(terms: Sequence[str]) -> list[str]:
    """Each id as it appears inside jsonb's text output (quotes, backslashes, controls escaped)."""
    return [json.dumps(term, ensure_ascii=False)[1:-1] for term in terms]


TASKS = _Table(
    TASK_TABLE, "issue_id", -1, _task_window, _find_tasks, _lock_tasks, _write_tasks, scrub_task_row
)
EVENTS = _Table(
    EVENT_TABLE,
    "delivery_id",
    "",
    _event_window,
    _find_events,
    _lock_events,
    _write_events,
    scrub_event_row,
)
# ap_jira_task first: it teaches the person's other ids (keys) that the history's changelog items use.
TABLES = (TASKS, EVENTS)


async def forget(
    conn: asyncpg.Connection,
    person: Person,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ForgetSummary:
    """Scrub (or, with ``dry_run``, count) every row naming ``person``, batch by batch, until done or
    ``stop`` is set (the batch in progress is then cancelled). A username needs ``person.pseudonym``
    set."""
    started = clock()
    summary = ForgetSummary(person.mode, dry_run, batch_size, pseudonym=person.pseudonym)
    progress = _Progress(clock, started)
    if person.username is not None:
        await _learn_keys(conn, person, batch_size, stop, summary)
    for table in TABLES:
        if summary.stopped:
            break
        changed: set[Any] = set()  # a row changed in two passes counts once
        while True:
            known = set(person.learned)
            await _pass(conn, table, person, batch_size, dry_run, stop, summary, changed, progress)
            # ap_jira_task teaches the person's other ids (keys) as it goes: the rows before the one
            # that taught a key were searched without it, so the table is searched again with it.
            if summary.stopped or person.learned == known:
                break
            log.debug(LOG_NEW_IDS, table=table.name, ids=len(person.learned) - len(known))
    summary.duration_s = clock() - started
    return summary


async def _learn_keys(
    conn: asyncpg.Connection,
    person: Person,
    batch_size: int,
    stop: asyncio.Event | None,
    summary: ForgetSummary,
) -> None:
    """Username mode: read the person's user objects in ``ap_jira_task`` for their user keys before
    anything is scrubbed (unlocked, nothing written). Whether the username in a changelog item names
    the person depends on whether it is one of their keys (``Person.is_change_id``), so no item may be
    judged before every key is known."""
    while True:
        known = (set(person.learned), set(person.keys))
        after: Any = TASKS.start
        while after is not None:
            try:
                found, after = await _unless_stopped(
                    conn, _search(conn, TASKS, after, person, batch_size), stop, name="forget-user-learn-keys"
                )
            except Stopped:
                summary.stopped = True
                return
            for row in found:
                person.learn_from(row["raw"])
        if (person.learned, person.keys) == known:  # a new key finds more rows: search again with it
            return


@dataclass
class _Progress:
    clock: Callable[[], float]
    last_logged: float


async def _pass(
    conn: asyncpg.Connection,
    table: _Table,
    person: Person,
    batch_size: int,
    dry_run: bool,
    stop: asyncio.Event | None,
    summary: ForgetSummary,
    changed: set[Any],
    progress: _Progress,
) -> None:
    """One pass over ``table`` in key order, batch by batch; the keys of the rows changed (or, with
    ``dry_run``, that would be) go into ``changed``."""
    after: Any = table.start
    while after is not None:
        if stop is not None and stop.is_set():
            summary.stopped = True
            return
        try:  # a batch waiting up to LOCK_TIMEOUT for a row is rolled back at once on a stop
            found, changes, after = await _batch_with_retries(
                conn, table, after, person, batch_size, dry_run, stop
            )
        except Stopped:
            summary.stopped = True
            return
        if not found:
            continue  # a window of rows that do not name the person: not a batch
        changed.update(change[0] for change in changes)
        summary.rows[table.name] = len(changed)
        summary.batches += 1
        log.debug(LOG_BATCH, table=table.name, found=len(found), changed=len(changes), dry_run=dry_run)
        if progress.clock() - progress.last_logged >= PROGRESS_LOG_INTERVAL_S:
            progress.last_logged = progress.clock()
            log.info(LOG_PROGRESS, table=table.name, rows=dict(summary.rows), batches=summary.batches)


async def _unless_stopped(
    conn: asyncpg.Connection, work: Coroutine[Any, Any, T], stop: asyncio.Event | None, *, name: str
) -> T:
    """``work`` until ``stop``: then cancelled, and its transaction rolled back; a ROLLBACK that
    PostgreSQL does not confirm within db.CLOSE_TIMEOUT_S (a server that stopped answering) is given
    up, and the connection closed from this side (the server rolls back a session that is gone)."""
    return await run_unless_stopped(
        work, stop, name=name, unwind_timeout_s=db.CLOSE_TIMEOUT_S, abandon=conn.terminate
    )


async def _batch_with_retries(
    conn: asyncpg.Connection,
    table: _Table,
    after: Any,
    person: Person,
    batch_size: int,
    dry_run: bool,
    stop: asyncio.Event | None,
) -> tuple[list[asyncpg.Record], list[tuple[Any, ...]], Any]:
    """:func:`_batch` until ``stop`` (:class:`Stopped`); a batch that fails on a deadlock or a
    serialization failure was rolled back whole, and runs again, BATCH_ATTEMPTS times in all."""
    name = f"forget-user-{table.name}"
    for attempt in range(1, BATCH_ATTEMPTS + 1):
        try:
            return await _unless_stopped(
                conn, _batch(conn, table, after, person, batch_size, dry_run), stop, name=name
            )
        except asyncpg.TransactionRollbackError as exc:
            what = "a deadlock" if exc.sqlstate == "40P01" else "a serialization failure"
            if attempt == BATCH_ATTEMPTS:
                raise CommandError(
                    f"a batch of {table.name} failed {BATCH_ATTEMPTS} times in a row on {what} with "
                    f"another session writing the same rows (SQLSTATE {exc.sqlstate}); that batch was not "
                    "changed, the ones before it were; run the same command again"
                ) from None
            log.warning(LOG_RETRY, table=table.name, sqlstate=exc.sqlstate, attempt=attempt)
            if await _stopped_within(stop, RETRY_BACKOFF_S * 2 ** (attempt - 1)):
                raise Stopped(name) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _stopped_within(stop: asyncio.Event | None, seconds: float) -> bool:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile: whether it was."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def _search(
    conn: asyncpg.Connection, table: _Table, after: Any, person: Person, batch_size: int
) -> tuple[list[asyncpg.Record], Any]:
    """The next rows after ``after`` that may name the person, at most ``batch_size`` of one window,
    and where the next search starts: after the last of them when there are ``batch_size``, else after
    the window; None at the table's end."""
    window = await _window(conn, table, after, batch_size)
    if window is None:
        return [], None
    found = await table.find(conn, window, person, batch_size)
    if len(found) == batch_size:
        return found, found[-1][table.key]
    return found, window.last if window.full else None


async def _batch(
    conn: asyncpg.Connection, table: _Table, after: Any, person: Person, batch_size: int, dry_run: bool
) -> tuple[list[asyncpg.Record], list[tuple[Any, ...]], Any]:
    """The next rows after ``after`` that may name the person, the changes made (with ``dry_run``: the
    keys of the rows that would change), and where the next batch starts (None: the table is done)."""
    found, after = await _search(conn, table, after, person, batch_size)
    # What needs a change, judged on the unlocked read; only those rows are locked and read again.
    needed = [row[table.key] for row in found if table.scrub(row, person) is not None]
    if dry_run:
        return found, [(key,) for key in needed], after
    changes: list[tuple[Any, ...]] = []
    if needed:
        # A statement not answered in time ends the session, which rolls the batch back; a COMMIT not
        # answered may have been carried out (run() says which).
        async with db.bounded_transaction(conn):
            locked = await table.lock(conn, needed)
            changes = [c for c in (table.scrub(row, person) for row in locked) if c is not None]
            if changes:
                await table.write(conn, changes)
    return found, changes, after


async def pseudonym_key(conn: asyncpg.Connection, *, create: bool) -> str | None:
    """The key pseudonyms are made with; written once, by the first run that needs it."""
    try:
        if create:
            await conn.execute(ENSURE_KEY_SQL, secrets.token_hex(32))
        key: str | None = await conn.fetchval(KEY_SQL)
    except asyncpg.UndefinedTableError:
        raise CommandError(
            "the table jiralake_pseudonym_key is missing: run `jiralake setup --skip-queues` first "
            "(migration 0009)"
        ) from None
    return key


def _unanswered_outcome(exc: db.Unanswered) -> str:
    """What a statement PostgreSQL did not answer left: the batch in progress uncommitted, unless the
    statement was its COMMIT, which the server may have carried out before its answer was lost."""
    if exc.at_commit:
        return (
            "the batch it was committing may have been committed or not (whole or not at all; either way "
            "running the command again is safe), the ones before it were"
        )
    return (
        "the batch in progress was not committed (each batch commits whole or not at all), the ones "
        "before it were"
    )


async def run(database: DatabaseSettings, person: Person, *, batch_size: int, dry_run: bool) -> ForgetSummary:
    """The command: connect, make the pseudonym (username mode, unless given), scrub or count until
    done or SIGINT/SIGTERM."""
    conn, postgres = await db.connect_bounded(
        database, server_settings={"application_name": APPLICATION_NAME, "lock_timeout": LOCK_TIMEOUT}
    )
    try:
        try:
            with postgres():
                if person.username is not None and person.pseudonym is None:
                    key = await pseudonym_key(conn, create=not dry_run)
                    # A dry run writes nothing, not even the key: without one it counts with a throwaway key.
                    person.pseudonym = pseudonym_for(person.username, key or secrets.token_hex(32))
                log.info(LOG_STARTED, mode=person.mode, dry_run=dry_run, batch_size=batch_size)
                with stop_on_signals() as stop:
                    summary = await forget(
                        conn, person, batch_size=batch_size, dry_run=dry_run, stop=stop.event
                    )
                    summary.stop_signal = stop.signal
        except asyncpg.LockNotAvailableError:
            raise CommandError(
                f"a row stayed locked by another session for {LOCK_TIMEOUT}; that batch was not "
                "changed, the ones before it were; run the same command again"
            ) from None
        except db.Unanswered as exc:
            raise db.unanswered_error(exc, _unanswered_outcome(exc)) from None
        if dry_run:
            summary.pseudonym = None
    finally:
        await db.close(conn)
    log.info(
        LOG_STOPPED if summary.stopped else LOG_FINISHED,
        mode=summary.mode,
        dry_run=dry_run,
        rows=dict(summary.rows),
        batches=summary.batches,
        signal=summary.stop_signal.name if summary.stop_signal else None,
        duration_ms=round(summary.duration_s * 1000),
    )
    return summary
