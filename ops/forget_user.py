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
columns or JSON text contain one of the person's ids (a superset), then one short transaction locks
those rows (``FOR UPDATE``, in key order, the order the consumer locks in), scrubs them in Python from
what it locked, and writes only the rows that changed. The consumer waits at most for one batch;
``version`` is never touched, so a newer event still applies. ``ap_jira_task.ingested_at`` is set
(the row changed, and ``changes/`` exports pick it up); the history's ``ingested_at`` is not (it
is when the consumer recorded the row, which history prune reads). Running it again finds nothing
more to change: it is idempotent. A stop cancels the batch in progress (rolled back, also while it
waits for a row another session holds) and loses nothing.

**The consumer does not undo it** for events it already recorded: a redelivery of the same
delivery is a duplicate (the history row is kept as is) and changes no row (not newer). An event
not yet recorded when this ran (still in the queue or the DLQ, retried by Jira, replayed) is
recorded in the history with the name it carries, and sets the row if it is newer than the row:
the runbook runs this command again once those have drained.

Exit codes: 0 done (also a dry run, and nothing to change); 2 bad arguments or configuration; 1
PostgreSQL unreachable or refusing, a row locked by someone else for too long, or migration 0009
missing; 130/143 stopped by SIGINT/SIGTERM (run it again to finish); 70 a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from ops.user_scrub import FORMER_USER, Person, pseudonym_for, scrub_event_row, scrub_task_row
from shared import argtypes, db
from shared.errors import CommandError
from shared.settings import DatabaseSettings
from shared.shutdown import Stopped, run_unless_stopped, signal_exit_code, stop_name, stop_on_signals

log = structlog.get_logger()

# Jira Cloud account ids: 24 hex digits, or "557058:<uuid>", "qm:<uuid>:<uuid>", ... at most 128.
ACCOUNT_ID = re.compile(r"[A-Za-z0-9:_-]{1,128}")  # whole value: fullmatch (a "$" lets a final newline by)
MAX_USERNAME_CHARS = 255
DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 10_000
USAGE_EXIT_CODE = 2
# A batch waits this long at most for a row someone else holds (a consumer batch takes milliseconds).
LOCK_TIMEOUT = "10s"
PROGRESS_LOG_INTERVAL_S = 10.0
APPLICATION_NAME = "jiralake-forget-user"
TASK_TABLE = "ap_jira_task"
EVENT_TABLE = "ap_jira_task_event"

# Log lines never carry the person's id, username or name: only the mode and counts.
LOG_STARTED = "forget_user_started"
LOG_BATCH = "forget_user_batch"
LOG_PROGRESS = "forget_user_progress"
LOG_NEW_IDS = "forget_user_searching_again_for_new_ids"
LOG_FINISHED = "forget_user_finished"
LOG_STOPPED = "forget_user_stopped"

EXIT_CODES_HELP = (
    "Exit codes: 0 done (also with --dry-run, and when nothing names the person); 2 bad arguments or "
    "configuration; 1 PostgreSQL unreachable or refusing, or rows locked too long; 130/143 stopped by "
    "SIGINT/SIGTERM, the batch in progress rolled back (what was scrubbed stays scrubbed: run it again to "
    "finish)."
)

# -- find_tasks --
# The next rows after issue_id $1 that may name the person: an id column equal to one of $2 or raw's
# JSON text containing one of $3 (the ids as JSON writes them), both compared lower-cased. A superset:
# Python decides on each row. Unlocked; the batch locks what it found with lock_tasks.
FIND_TASKS_SQL = """
SELECT issue_id, assignee_account_id, assignee_display_name, reporter_account_id,
       reporter_display_name, raw
FROM ap_jira_task
WHERE issue_id > $1
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

# -- find_events --
FIND_EVENTS_SQL = """
SELECT delivery_id, actor_account_id, actor_display_name, changelog
FROM ap_jira_task_event
WHERE delivery_id > $1
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


def person_from_arguments(
    account_id: str | None,
    username: str | None,
    pseudonym: str | None = None,
    keys: Sequence[str] = (),
) -> Person:
    """The person named on the command line, or a one-line refusal (exit 2)."""
    if account_id is not None and username is not None:
        raise CommandError(
            "forget-user takes one of --account-id (Jira Cloud) or --username (Server/Data Center), not both",
            USAGE_EXIT_CODE,
        )
    if account_id is None and username is None:
        raise CommandError(
            "forget-user needs --account-id ID (Jira Cloud) or --username NAME (Server/Data Center)",
            USAGE_EXIT_CODE,
        )
    if account_id is not None:
        if pseudonym is not None:
            raise CommandError(
                "--pseudonym goes with --username only: a Cloud account id stays as it is", USAGE_EXIT_CODE
            )
        if keys:
            raise CommandError("--key goes with --username only: a Data Center user key", USAGE_EXIT_CODE)
        if not account_id.strip():
            raise CommandError("--account-id must not be empty", USAGE_EXIT_CODE)
        if not ACCOUNT_ID.fullmatch(account_id):
            # The value itself is not repeated: it may be a person's name pasted by mistake.
            raise CommandError(
                "--account-id must be a Jira Cloud account id (letters, digits, ':', '_', '-'; at most "
                "128), such as 5b10ac8d82e05b22cc7d4ef5; for a Server/Data Center user use --username",
                USAGE_EXIT_CODE,
            )
        return Person(account_id=account_id)
    assert username is not None
    _check_username("--username", username)
    if pseudonym is not None:
        _check_username("--pseudonym", pseudonym)
        if pseudonym.lower() == username.lower():
            raise CommandError("--pseudonym must differ from the username", USAGE_EXIT_CODE)
    for key in keys:
        _check_username("--key", key)
    learned = {key.lower() for key in keys if key.lower() != username.lower()}
    return Person(username=username, pseudonym=pseudonym, learned=learned, keys={key.lower() for key in keys})


def _check_username(option: str, value: str) -> None:
    if not value.strip():
        raise CommandError(f"{option} must not be empty", USAGE_EXIT_CODE)
    if value != value.strip() or len(value) > MAX_USERNAME_CHARS or not value.isprintable():
        raise CommandError(
            f"{option} must be a Jira username: no leading or trailing spaces, no control characters, "
            f"at most {MAX_USERNAME_CHARS} characters",
            USAGE_EXIT_CODE,
        )


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
class _Table:
    name: str
    key: str
    start: Any
    find: Callable[[asyncpg.Connection, Any, Person, int], Awaitable[list[asyncpg.Record]]]
    lock: Callable[[asyncpg.Connection, list[Any]], Awaitable[list[asyncpg.Record]]]
    write: Callable[[asyncpg.Connection, list[tuple[Any, ...]]], Awaitable[None]]
    scrub: Callable[[Mapping[str, Any], Person], tuple[Any, ...] | None]


async def _find_tasks(
    conn: asyncpg.Connection, after: Any, person: Person, limit: int
) -> list[asyncpg.Record]:
    terms = person.search_terms()
    rows: list[asyncpg.Record] = await conn.fetch(FIND_TASKS_SQL, after, terms, _json_texts(terms), limit)
    return rows


async def _lock_tasks(conn: asyncpg.Connection, keys: list[Any]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(LOCK_TASKS_SQL, keys)
    return rows


async def _write_tasks(conn: asyncpg.Connection, changes: list[tuple[Any, ...]]) -> None:
    await conn.executemany(SCRUB_TASK_SQL, changes)


async def _find_events(
    conn: asyncpg.Connection, after: Any, person: Person, limit: int
) -> list[asyncpg.Record]:
    terms = person.search_terms()
    rows: list[asyncpg.Record] = await conn.fetch(FIND_EVENTS_SQL, after, terms, _json_texts(terms), limit)
    return rows


async def _lock_events(conn: asyncpg.Connection, keys: list[Any]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(LOCK_EVENTS_SQL, keys)
    return rows


async def _write_events(conn: asyncpg.Connection, changes: list[tuple[Any, ...]]) -> None:
    await conn.executemany(SCRUB_EVENT_SQL, changes)


def _json_texts(terms: Sequence[str]) -> list[str]:
    """Each id as it appears inside jsonb's text output (quotes, backslashes, controls escaped)."""
    return [json.dumps(term, ensure_ascii=False)[1:-1] for term in terms]


TASKS = _Table(TASK_TABLE, "issue_id", -1, _find_tasks, _lock_tasks, _write_tasks, scrub_task_row)
EVENTS = _Table(EVENT_TABLE, "delivery_id", "", _find_events, _lock_events, _write_events, scrub_event_row)
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
        after = TASKS.start
        while True:
            try:
                found = await run_unless_stopped(
                    _find_tasks(conn, after, person, batch_size), stop, name="forget-user-learn-keys"
                )
            except Stopped:
                summary.stopped = True
                return
            for row in found:
                person.learn_from(row["raw"])
            if len(found) < batch_size:
                break
            after = found[-1]["issue_id"]
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
    after = table.start
    while True:
        if stop is not None and stop.is_set():
            summary.stopped = True
            return
        try:  # a batch waiting up to LOCK_TIMEOUT for a row is rolled back at once on a stop
            found, changes = await run_unless_stopped(
                _batch(conn, table, after, person, batch_size, dry_run),
                stop,
                name=f"forget-user-{table.name}",
            )
        except Stopped:
            summary.stopped = True
            return
        if not found:
            return
        after = found[-1][table.key]
        changed.update(change[0] for change in changes)
        summary.rows[table.name] = len(changed)
        summary.batches += 1
        log.debug(LOG_BATCH, table=table.name, found=len(found), changed=len(changes), dry_run=dry_run)
        if progress.clock() - progress.last_logged >= PROGRESS_LOG_INTERVAL_S:
            progress.last_logged = progress.clock()
            log.info(LOG_PROGRESS, table=table.name, rows=dict(summary.rows), batches=summary.batches)
        if len(found) < batch_size:
            return


async def _batch(
    conn: asyncpg.Connection, table: _Table, after: Any, person: Person, batch_size: int, dry_run: bool
) -> tuple[list[asyncpg.Record], list[tuple[Any, ...]]]:
    """The next rows after ``after`` that may name the person, and the changes made (with
    ``dry_run``: the keys of the rows that would change)."""
    found = await table.find(conn, after, person, batch_size)
    # What needs a change, judged on the unlocked read; only those rows are locked and read again.
    needed = [row[table.key] for row in found if table.scrub(row, person) is not None]
    if dry_run:
        return found, [(key,) for key in needed]
    changes: list[tuple[Any, ...]] = []
    if needed:
        async with conn.transaction():
            locked = await table.lock(conn, needed)
            changes = [c for c in (table.scrub(row, person) for row in locked) if c is not None]
            if changes:
                await table.write(conn, changes)
    return found, changes


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


async def run(database: DatabaseSettings, person: Person, *, batch_size: int, dry_run: bool) -> ForgetSummary:
    """The command: connect, make the pseudonym (username mode, unless given), scrub or count until
    done or SIGINT/SIGTERM."""
    conn = await db.connect(
        database, server_settings={"application_name": APPLICATION_NAME, "lock_timeout": LOCK_TIMEOUT}
    )
    try:
        if person.username is not None and person.pseudonym is None:
            key = await pseudonym_key(conn, create=not dry_run)
            # A dry run writes nothing, not even the key: without one it counts with a throwaway key.
            person.pseudonym = pseudonym_for(person.username, key or secrets.token_hex(32))
        log.info(LOG_STARTED, mode=person.mode, dry_run=dry_run, batch_size=batch_size)
        with stop_on_signals() as stop:
            try:
                summary = await forget(conn, person, batch_size=batch_size, dry_run=dry_run, stop=stop.event)
            except asyncpg.LockNotAvailableError:
                raise CommandError(
                    f"a row stayed locked by another session for {LOCK_TIMEOUT}; that batch was not "
                    "changed, the ones before it were; run the same command again"
                ) from None
            summary.stop_signal = stop.signal
        if dry_run:
            summary.pseudonym = None
    finally:
        await conn.close()
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


def render(summary: ForgetSummary) -> str:
    tasks, events = summary.rows[TASK_TABLE], summary.rows[EVENT_TABLE]
    counts = f"{tasks} row(s) of {TASK_TABLE} and {events} row(s) of {EVENT_TABLE}"
    if summary.dry_run and summary.stopped:
        stopped = f"stopped by {stop_name(summary.stop_signal)} before the end"
        return f"dry run, nothing changed; {stopped}, so far it would scrub {counts}"
    if summary.dry_run:
        return f"dry run, nothing changed: would scrub {counts}"
    text = f"scrubbed {counts} in {summary.batches} batch(es) of up to {summary.batch_size}"
    if summary.stopped:
        return text + f"; stopped by {stop_name(summary.stop_signal)} before the end"
    if not tasks and not events:
        return text + (
            "; nothing left names this person's ids (already forgotten, or check the id; a Data "
            "Center user key: --key)"
        )
    who = f"the username {summary.pseudonym}" if summary.pseudonym else "the same account id"
    return (
        f'{text}\nThe person now appears as "{FORMER_USER}", under {who}.\n'
        "Next: a full export (jiralake export --once, per format you export) so that S3 latest/ no longer "
        "holds the old data; older history/ and changes/ files keep it (docs/runbook.md, Erasing a person)."
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "forget-user",
        help="erase one person's personal data from both tables (GDPR erasure)",
        usage="jiralake forget-user (--account-id ID | --username NAME [--pseudonym NAME] [--key KEY ...]) "
        "[--dry-run] [--batch-size N]",
        description="Scrubs one person from ap_jira_task and ap_jira_task_event: their user objects in "
        'raw and display names become "Former user", their email, avatar and time zone go; a Cloud '
        "account id stays, a Server/Data Center username becomes a stable pseudonym. In batches of "
        "short transactions, safe while the consumer runs; SIGINT/SIGTERM stop it at once. "
        "Never automatic; S3 files already written are not changed (see docs/runbook.md, Erasing a "
        "person). Settings: DATABASE_URL (else libpq's PG* variables).",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--account-id", metavar="ID", help="the person's Jira Cloud accountId")
    parser.add_argument("--username", metavar="NAME", help="the person's Server/Data Center username")
    parser.add_argument(
        "--pseudonym",
        metavar="NAME",
        help="with --username: the id to put in its place, such as the jirauserNNNNN that Jira's "
        "anonymization gave the person, so that old rows and Jira's new events agree (default: "
        "former-user- and a keyed hash of the username)",
    )
    parser.add_argument(
        "--key",
        metavar="KEY",
        action="append",
        default=[],
        help="with --username, repeatable: the person's Data Center user key where it differs from "
        "the username (JIRAUSER10500 for users created on Jira 8+). Changelog items name people by "
        "key; the command learns it from the person's user objects in ap_jira_task, but not for "
        "someone no current issue shows, nor on a rerun after the first erasure replaced it",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count the rows it would change; change nothing"
    )
    parser.add_argument(
        "--batch-size",
        type=argtypes.integer(1, MAX_BATCH_SIZE),
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"rows per batch, each its own transaction (default {DEFAULT_BATCH_SIZE})",
    )
    parser.set_defaults(func=_forget_user_command)


def _forget_user_command(args: argparse.Namespace) -> int:
    person = person_from_arguments(args.account_id, args.username, args.pseudonym, args.key)  # no database
    summary = asyncio.run(
        run(DatabaseSettings.from_env(os.environ), person, batch_size=args.batch_size, dry_run=args.dry_run)
    )
    print(render(summary))
    if summary.stopped:
        done = (
            "nothing was changed and the counts are partial"
            if summary.dry_run
            else "what was scrubbed stays scrubbed; run the same command again to finish"
        )
        raise CommandError(
            f"forget-user stopped by {stop_name(summary.stop_signal)} after {summary.batches} batch(es); "
            f"{done}",
            exit_code=signal_exit_code(summary.stop_signal),
        )
    return 0
