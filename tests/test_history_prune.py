"""``jiralake history prune`` against real Postgres: exactly the rows recorded before the cutoff go, in
batches; --dry-run changes nothing; the 14-day minimum and other nonsense are refused in one line by the
real command line; a redelivery whose history row was pruned leaves ap_jira_task as it was; the prune and
the consumer run at the same time without waiting for each other; SIGTERM stops it between batches."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import date, timedelta
from typing import Any

import asyncpg
import pytest

from consumer.apply import APPLIED, DUPLICATE, HISTORY_ONLY, SKIPPED_STALE, apply_envelopes
from ops import history_prune
from ops.history_prune import PruneOptions, PruneSummary, cutoff_for, delete_batch, prune_history
from shared import db, migrate
from shared.envelope import Envelope
from shared.errors import CommandError
from shared.settings import DatabaseSettings
from tests.jira_fixtures import make_event
from tests.tcp_proxy import postgres_proxy, through
from tests.test_consumer_helpers import envelope_of, holds, wait_for

ASSIGNED = "mattermost-plugin-jira__webhook-issue-updated-assigned.json"
COMMENT = "mattermost-plugin-jira__webhook-cloud-comment-created.json"
INDEX = "ap_jira_task_event_ingested_at_idx"
TS = 1_700_000_000_000
WAITING_ON_LOCK = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"
IS_VALID = f"SELECT indisvalid FROM pg_index WHERE indexrelid = '{INDEX}'::regclass"
# An index build on the history table of this database (other pytest workers' databases build too).
BUILDING = (
    "SELECT count(*) FROM pg_stat_progress_create_index WHERE relid = 'ap_jira_task_event'::regclass "
    "AND datid = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
PRUNE_WAITING_ON_LOCK = (
    "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock' "
    "AND datname = current_database()"
)


async def record(pg: asyncpg.Connection, prefix: str, count: int, *, age_days: float) -> list[str]:
    """``count`` history rows recorded ``age_days`` ago, in one statement (so at one and the same time)."""
    ids = [f"{prefix}-{i:05d}" for i in range(count)]
    await pg.execute(
        """
        INSERT INTO ap_jira_task_event (delivery_id, issue_id, event_type, event_at, event_version,
                                        event_tiebreak, applied, ingested_at)
        SELECT d, 1, 'jira:issue_updated', now(), 0, '', true, now() - $2 * interval '1 day'
        FROM unnest($1::text[]) AS d
        """,
        ids,
        age_days,
    )
    return ids


async def age(pg: asyncpg.Connection, delivery_ids: list[str], *, days: float) -> None:
    """Make rows the consumer recorded look recorded ``days`` ago."""
    await pg.execute(
        "UPDATE ap_jira_task_event SET ingested_at = now() - $2 * interval '1 day' "
        "WHERE delivery_id = ANY($1)",
        delivery_ids,
        days,
    )


async def remaining(pg: asyncpg.Connection) -> list[str]:
    return [r["delivery_id"] for r in await pg.fetch("SELECT delivery_id FROM ap_jira_task_event ORDER BY 1")]


async def prune(pg: asyncpg.Connection, days: int, batch_size: int, **kwargs: Any) -> PruneSummary:
    cutoff = await cutoff_for(pg, days)
    return await prune_history(pg, cutoff, older_than_days=days, batch_size=batch_size, **kwargs)


def updates(prefix: str, count: int, *, first_issue: int) -> list[Envelope]:
    """``count`` field-carrying events, one per issue, as the receiver enqueues them."""
    return [
        envelope_of(make_event(ASSIGNED, issue_id=first_issue + i, ts=TS), delivery_id=f"{prefix}-{i:05d}")
        for i in range(count)
    ]


@pytest.fixture
async def index_restored(pg: asyncpg.Connection) -> AsyncIterator[None]:
    """Migration 0008's index as the migration builds it again after the test, whatever the test left
    (an invalid, unique or expression index refuses or fails later tests' inserts on this database)."""
    yield
    await pg.execute(
        f"DROP INDEX IF EXISTS {INDEX}; CREATE INDEX {INDEX} ON ap_jira_task_event (ingested_at)"
    )


@pytest.fixture
async def other(db_settings: DatabaseSettings) -> AsyncIterator[asyncpg.Connection]:
    """A second connection: the consumer on one, the prune on the other."""
    conn = await db.connect(db_settings)
    try:
        yield conn
    finally:
        await conn.close()


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jiralake", *args], capture_output=True, text=True, env=env, timeout=60
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DATABASE_URL", "JIRALAKE_"))}
    return {**env, **extra}


# -- what goes --


async def test_deletes_exactly_the_rows_recorded_before_the_cutoff_in_batches(pg: asyncpg.Connection) -> None:
    # GIVEN rows recorded 40, 20, 13 days ago and today; each group at one identical time
    d40 = await record(pg, "d40", 7, age_days=40)
    d20 = await record(pg, "d20", 3, age_days=20)
    d13 = await record(pg, "d13", 2, age_days=13)
    today = await record(pg, "today", 4, age_days=0)
    d20_at = await pg.fetchval("SELECT ingested_at FROM ap_jira_task_event WHERE delivery_id = $1", d20[0])
    # WHEN the history older than 30 days is pruned in batches of 3
    first = await prune(pg, 30, batch_size=3)
    # THEN the 7 rows go in 3 batches (3, 3, 1: rows of one same time split across batches), and only they
    assert (first.rows, first.batches, first.stopped) == (7, 3, False)
    assert first.oldest_left == d20_at
    assert await remaining(pg) == sorted(d13 + d20 + today)
    # WHEN it is pruned again at the 14-day minimum, and once more
    second = await prune(pg, 14, batch_size=3)
    third = await prune(pg, 14, batch_size=3)
    # THEN the 20-day-old rows go in one batch, the 13-day-old ones stay, and the third run finds nothing
    assert (second.rows, second.batches) == (3, 1)
    assert (third.rows, third.batches) == (0, 0)
    assert await remaining(pg) == sorted(d13 + today)
    assert not set(d40) & set(await remaining(pg))


async def test_a_row_recorded_exactly_at_the_cutoff_stays(pg: asyncpg.Connection) -> None:
    # GIVEN rows recorded a microsecond before the cutoff, exactly at it, and a microsecond after
    cutoff = await cutoff_for(pg, 30)
    before, at, after = [await record(pg, name, 1, age_days=60) for name in ("before", "at", "after")]
    for ids, offset in ((before, -1), (at, 0), (after, 1)):
        await pg.execute(
            "UPDATE ap_jira_task_event SET ingested_at = $2::timestamptz + $3 * interval '1 microsecond' "
            "WHERE delivery_id = ANY($1)",
            ids,
            cutoff,
            offset,
        )
    # WHEN the rows recorded before that cutoff are counted, then pruned
    counted = await history_prune.dry_run(pg, cutoff, older_than_days=30, batch_size=10)
    pruned = await prune_history(pg, cutoff, older_than_days=30, batch_size=10)
    # THEN only the row strictly older than the cutoff is counted and deleted ("more than DAYS days ago")
    assert (counted.rows, pruned.rows) == (1, 1)
    assert await remaining(pg) == sorted(at + after)


async def test_the_cutoff_is_whole_24_hour_days_back_even_across_a_daylight_saving_change(
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a session time zone whose clocks moved an hour forward a week ago (a made-up POSIX zone,
    # so the change is inside the window whatever today's date): a calendar day there can be 23 hours
    starts, ends = (date.today() - timedelta(days=days) for days in (7, -150))
    days = [day.timetuple().tm_yday - 1 for day in (starts, ends)]  # POSIX "n": 0-based day of the year
    await pg.execute(f"SET TimeZone = 'XST0XDT,{days[0]}/2,{days[1]}/2'")
    async with pg.transaction():  # one now() for the whole test
        assert await pg.fetchval("SELECT now() - interval '14 days' <> now() - interval '336 hours'")
        # WHEN the cutoff for --older-than 14 is taken, THEN it is 336 hours back, as SQS counts
        cutoff = await cutoff_for(pg, 14)
        assert await pg.fetchval("SELECT now() - $1::timestamptz", cutoff) == timedelta(hours=336)


async def test_an_empty_history_is_nothing_to_do(pg: asyncpg.Connection) -> None:
    summary = await prune(pg, 14, batch_size=10)
    assert (summary.rows, summary.batches, summary.oldest_left) == (0, 0, None)
    assert history_prune.render(summary).endswith("in 0 batch(es) of up to 10; the history is now empty")


async def test_dry_run_counts_what_would_go_and_changes_nothing(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN 10 rows older than 14 days and 2 newer
    await record(pg, "old", 10, age_days=15)
    await record(pg, "new", 2, age_days=1)
    before = [dict(r) for r in await pg.fetch("SELECT * FROM ap_jira_task_event ORDER BY delivery_id")]
    # WHEN the command runs with --dry-run and batches of 4
    summary = await history_prune.run(
        db_settings, PruneOptions(older_than_days=14, batch_size=4, dry_run=True)
    )
    # THEN it counts 10 rows in 3 batches and the table is exactly as it was
    assert (summary.dry_run, summary.rows, summary.batches) == (True, 10, 3)
    after = [dict(r) for r in await pg.fetch("SELECT * FROM ap_jira_task_event ORDER BY delivery_id")]
    assert after == before
    text = history_prune.render(summary)
    assert text.startswith("dry run, nothing deleted: would delete 10 history rows recorded before ")
    assert text.endswith("(more than 14 days ago) in 3 batch(es) of up to 4")


# -- the real command line --


@pytest.mark.parametrize(
    ("days", "line"),
    [
        (
            "13",
            "jiralake: --older-than 13 is inside SQS's 14-day redelivery window: a message redelivered "
            "after its history row was pruned would be recorded again as a new delivery; use 14 days or more",
        ),
        ("0", "jiralake: --older-than must be a number of days, at least 14, got 0"),
        ("-3", "jiralake: --older-than must be a number of days, at least 14, got -3"),
        ("36501", "jiralake: --older-than must be at most 36500 days (100 years), got 36501"),
    ],
)
def test_a_retention_under_14_days_or_absurd_is_refused_in_one_line(days: str, line: str) -> None:
    # GIVEN no database configured at all: the refusal needs none
    # WHEN the real command line is asked to prune with that retention
    result = _run_cli("history", "prune", "--older-than", days, env=_env())
    # THEN one line says why, exit 2, nothing on stdout
    assert (result.returncode, result.stderr.strip(), result.stdout) == (2, line, "")


async def test_the_command_prunes_and_prints_a_summary(pg: asyncpg.Connection, database_url: str) -> None:
    # GIVEN 10 rows older than 14 days and 3 newer
    await record(pg, "old", 10, age_days=30)
    new = await record(pg, "new", 3, age_days=2)
    # WHEN `jiralake history prune --older-than 14 --batch-size 4` runs as cron would run it
    child = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "jiralake", "--log-json", "history", "prune", "--older-than", "14"],
        *["--batch-size", "4"],
        env=_env(DATABASE_URL=database_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    # THEN exit 0, one summary line, a JSON log line with the counts, and only the newer rows are left
    assert child.returncode == 0, err.decode()
    summary = out.decode().strip()
    assert summary.startswith("deleted 10 history rows recorded before "), summary
    assert "(more than 14 days ago) in 3 batch(es) of up to 4; the oldest row left was recorded " in summary
    logs = [json.loads(line) for line in err.decode().splitlines()]
    finished = [entry for entry in logs if entry["event"] == "history_prune_finished"]
    assert [(e["rows"], e["batches"], e["dry_run"]) for e in finished] == [(10, 3, False)]
    assert await remaining(pg) == new


async def next_log_line(stream: asyncio.StreamReader, event: str) -> dict[str, Any]:
    """Read a child's JSON log lines (stderr) up to the first one of ``event``."""
    while line := await asyncio.wait_for(stream.readline(), timeout=30):
        entry: dict[str, Any] = json.loads(line)
        if entry["event"] == event:
            return entry
    raise AssertionError(f"the child's stderr ended before a {event!r} line")


@pytest.mark.parametrize(
    ("dry_run", "what"), [(False, "the batch was not deleted"), (True, "nothing was counted")]
)
async def test_a_history_locked_past_the_lock_timeout_fails_in_one_line(
    pg: asyncpg.Connection,
    other: asyncpg.Connection,
    db_settings: DatabaseSettings,
    monkeypatch: pytest.MonkeyPatch,
    dry_run: bool,
    what: str,
) -> None:
    # GIVEN rows to prune and another session holding the whole history locked (a migration, VACUUM FULL)
    await record(pg, "old", 3, age_days=31)
    monkeypatch.setattr(history_prune, "LOCK_TIMEOUT", "1s")  # 10 s in the product
    async with other.transaction():
        await other.execute("LOCK TABLE ap_jira_task_event IN ACCESS EXCLUSIVE MODE")
        # WHEN the command (or its dry run) waits past its lock timeout
        # THEN it fails with one line saying what happened and what to do, not the driver's error
        with pytest.raises(CommandError) as failed:
            await history_prune.run(
                db_settings, PruneOptions(older_than_days=14, batch_size=1000, dry_run=dry_run)
            )
    assert str(failed.value) == (
        "ap_jira_task_event stayed locked by another session for 1s (a migration, VACUUM FULL?); "
        f"{what}; run it again later"
    )
    assert await remaining(pg) == ["old-00000", "old-00001", "old-00002"]


async def test_sigterm_stops_the_command_at_once_even_while_a_batch_waits_for_a_lock(
    pg: asyncpg.Connection, other: asyncpg.Connection, database_url: str
) -> None:
    # GIVEN one row recorded 31 days ago (the first one-row batch) and 5 recorded 30 days ago, which
    # another session holds locked: the prune's second batch waits on them
    await record(pg, "first", 1, age_days=31)
    held = await record(pg, "held", 5, age_days=30)
    child: asyncio.subprocess.Process | None = None
    try:
        async with other.transaction():
            locked = await other.fetch(
                "SELECT delivery_id FROM ap_jira_task_event WHERE delivery_id = ANY($1) FOR UPDATE", held
            )
            assert len(locked) == 5
            child = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "jiralake", "--log-json", "history", "prune", "--older-than", "14"],
                *["--batch-size", "1"],
                env=_env(DATABASE_URL=database_url),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            assert child.stderr is not None
            await next_log_line(child.stderr, "history_prune_started")

            async def second_batch_waits() -> bool:
                return bool(await pg.fetchval(PRUNE_WAITING_ON_LOCK, history_prune.APPLICATION_NAME))

            await wait_for(second_batch_waits, what="the prune's second batch to wait on the locked rows")
            # WHEN SIGTERM comes while that batch waits, and the other session keeps the rows
            child.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    finally:
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()
    # THEN it did not wait out the lock timeout (that ends in exit 1): the waiting batch was rolled
    # back, it says how far it got, exits 143, and what it deleted stays deleted
    assert child.returncode == 128 + signal.SIGTERM, err.decode()
    summary = out.decode().strip()
    assert summary.startswith("deleted 1 history rows recorded before "), summary
    assert summary.endswith("in 1 batch(es) of up to 1; stopped by SIGTERM before the end"), summary
    assert err.decode().strip().splitlines()[-1] == (
        "jiralake: history prune stopped by SIGTERM after 1 batch(es); what was deleted stays "
        "deleted; run the same command again to go on"
    )
    assert await remaining(pg) == held


@pytest.mark.timeout(90)
async def test_sigterm_stops_the_command_within_seconds_when_postgresql_stops_answering(
    pg: asyncpg.Connection, database_url: str
) -> None:
    # GIVEN a prune of many one-row batches reaching PostgreSQL through a proxy
    await record(pg, "old", 200, age_days=31)
    proxy = await postgres_proxy(database_url)
    child: asyncio.subprocess.Process | None = None
    try:
        child = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "jiralake", "--log-json", "history", "prune", "--older-than", "14"],
            *["--batch-size", "1"],
            env=_env(DATABASE_URL=through(proxy, database_url)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert child.stderr is not None
        await next_log_line(child.stderr, "history_prune_started")
        # WHEN PostgreSQL stops answering (its packets dropped, nothing closed) mid-batch, and SIGTERM comes
        proxy.freeze()
        await wait_for(holds(lambda: proxy.held > 0), what="a batch held on its way")
        started = time.monotonic()
        child.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(child.communicate(), timeout=60)
        # THEN it stops within seconds (the connection is closed from this side after db.CLOSE_TIMEOUT_S;
        # asyncpg alone waited for the server to confirm the cancelled batch: a minute, or for ever)
        assert time.monotonic() - started < db.CLOSE_TIMEOUT_S + 10
        assert child.returncode == 128 + signal.SIGTERM, err.decode()
    finally:
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()
        await proxy.close()


async def record_one_by_one(pg: asyncpg.Connection, count: int, *, age_days: float) -> list[str]:
    """``count`` history rows recorded about ``age_days`` ago, each a millisecond after the one before
    (in one statement): the oldest first."""
    ids = [f"old-{i:05d}" for i in range(count)]
    await pg.execute(
        """
        INSERT INTO ap_jira_task_event (delivery_id, issue_id, event_type, event_at, event_version,
                                        event_tiebreak, applied, ingested_at)
        SELECT d, 1, 'jira:issue_updated', now(), 0, '', true,
               now() - $2 * interval '1 day' + n * interval '1 millisecond'
        FROM unnest($1::text[]) WITH ORDINALITY AS u (d, n)
        """,
        ids,
        age_days,
    )
    return ids


@pytest.mark.timeout(60)
async def test_a_prune_postgresql_stops_answering_ends_in_one_line_within_the_statement_bound(
    pg: asyncpg.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN 1500 rows recorded a month ago, one after the other, pruned 3 at a time through a proxy,
    # with the statement bound lowered to 1.5 s (a minute in the product)
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1.5)
    ids = await record_one_by_one(pg, 1500, age_days=31)
    proxy = await postgres_proxy(database_url)
    try:
        command = asyncio.create_task(
            history_prune.run(
                DatabaseSettings(url=through(proxy, database_url)),
                PruneOptions(older_than_days=14, batch_size=3),
            )
        )

        async def pruning() -> bool:
            return bool(await pg.fetchval("SELECT count(*) < 1500 FROM ap_jira_task_event"))

        await wait_for(pruning, what="the first batches")
        # WHEN PostgreSQL stops answering (its packets dropped, nothing closed), no signal sent
        proxy.freeze()
        started = time.monotonic()
        # THEN the command ends soon after the statement bound, in one line that says what to do: exit 1
        with pytest.raises(CommandError) as failed:
            await asyncio.wait_for(command, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        await proxy.close()
    assert elapsed < 1.5 + 8
    assert failed.value.exit_code == 1
    assert str(failed.value) == (
        "PostgreSQL did not answer a statement within 1.5 s (a server or network that stopped answering); "
        "what was deleted stays deleted, the batch in progress was deleted whole or not at all; check the "
        "server, then run the same command again"
    )
    # AND no batch is half-done: whole batches of the oldest rows went, the rest is there
    left = await remaining(pg)
    assert 0 < len(left) < 1500 and len(left) % 3 == 0
    assert left == ids[len(ids) - len(left) :]


@pytest.mark.timeout(60)
async def test_a_dry_run_postgresql_stops_answering_ends_in_one_line_within_the_statement_bound(
    pg: asyncpg.Connection, other: asyncpg.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN rows to count, the history locked by another session so that the dry run's count waits,
    # and the command reaching PostgreSQL through a proxy, its statement bound lowered to 1.5 s
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1.5)
    await record(pg, "old", 3, age_days=31)
    proxy = await postgres_proxy(database_url)
    try:
        async with other.transaction():
            await other.execute("LOCK TABLE ap_jira_task_event IN ACCESS EXCLUSIVE MODE")
            command = asyncio.create_task(
                history_prune.run(
                    DatabaseSettings(url=through(proxy, database_url)),
                    PruneOptions(older_than_days=14, dry_run=True),
                )
            )

            async def counting() -> bool:
                return bool(await pg.fetchval(PRUNE_WAITING_ON_LOCK, history_prune.APPLICATION_NAME))

            await wait_for(counting, what="the dry run's count to wait on the lock")
            # WHEN PostgreSQL stops answering (the lock timeout's error never arrives), no signal sent
            proxy.freeze()
            started = time.monotonic()
            # THEN the dry run ends soon after the statement bound, in one line: exit 1
            with pytest.raises(CommandError) as failed:
                await asyncio.wait_for(command, timeout=30)
            elapsed = time.monotonic() - started
    finally:
        await proxy.close()
    assert elapsed < 1.5 + 8
    assert failed.value.exit_code == 1
    assert str(failed.value) == (
        "PostgreSQL did not answer a statement within 1.5 s (a server or network that stopped answering); "
        "nothing was deleted (a dry run); check the server, then run the same command again"
    )
    assert await remaining(pg) == ["old-00000", "old-00001", "old-00002"]


async def test_the_dry_run_counts_in_windows_exactly_what_one_count_would(
    pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN rows recorded at 3 times before the cutoff (5, 1 and 4 rows at each: ties across any window's
    # end) and 2 after it
    for prefix, count, days in (("a", 5, 40), ("b", 1, 35), ("c", 4, 20), ("new", 2, 1)):
        await record(pg, prefix, count, age_days=days)
    cutoff = await cutoff_for(pg, 14)
    # WHEN they are counted a window of 1, 2, 3, ... rows at a time
    counts = []
    for window in (1, 2, 3, 4, 6, 100_000):
        monkeypatch.setattr(history_prune, "COUNT_WINDOW_ROWS", window)
        counts.append(await history_prune.count_prunable(pg, cutoff))
    # THEN every count is the 10 rows before the cutoff
    assert counts == [10] * 6


# -- redeliveries after a prune --


async def test_a_redelivery_after_its_history_row_was_pruned_changes_no_issue_row(
    pg: asyncpg.Connection,
) -> None:
    # GIVEN an issue update and a comment the consumer applied, and their redeliveries seen as duplicates
    update = envelope_of(make_event(ASSIGNED, issue_id=77, ts=TS), delivery_id="update-1")
    comment = envelope_of(make_event(COMMENT, issue_id=77, ts=TS + 1), delivery_id="comment-1")
    first = await apply_envelopes(pg, [update, comment])
    assert [r.outcome for r in first.results] == [APPLIED, HISTORY_ONLY]
    again = await apply_envelopes(pg, [update, comment])
    assert [r.outcome for r in again.results] == [DUPLICATE, DUPLICATE]
    issue_row = dict(await pg.fetchrow("SELECT * FROM ap_jira_task WHERE issue_id = 77"))
    # WHEN their history rows are pruned (recorded 15 days ago) and the same deliveries come again
    await age(pg, ["update-1", "comment-1"], days=15)
    assert (await prune(pg, 14, batch_size=10)).rows == 2
    late = await apply_envelopes(pg, [update, comment])
    # THEN the issue row is exactly as it was (the version guard: an equal version is not newer) ...
    assert dict(await pg.fetchrow("SELECT * FROM ap_jira_task WHERE issue_id = 77")) == issue_row
    # ... they are no longer recognised as duplicates: the update is stale, the comment history only ...
    assert [r.outcome for r in late.results] == [SKIPPED_STALE, HISTORY_ONLY]
    # ... and each is recorded again, as a new history row that changed nothing
    rows = await pg.fetch("SELECT delivery_id, applied FROM ap_jira_task_event ORDER BY delivery_id")
    assert [tuple(r) for r in rows] == [("comment-1", False), ("update-1", False)]


# -- alongside the consumer --


async def test_prune_runs_while_a_consumer_batch_is_uncommitted(
    pg: asyncpg.Connection, other: asyncpg.Connection
) -> None:
    # GIVEN 6 old history rows, and a consumer batch of 5 new events applied but not committed
    await record(pg, "old", 6, age_days=20)
    batch = updates("new", 5, first_issue=1000)
    async with other.transaction():
        result = await apply_envelopes(other, batch)
        # WHEN the prune runs meanwhile
        summary = await asyncio.wait_for(prune(pg, 14, batch_size=2), timeout=10)
        # THEN it does not wait for the consumer's transaction
        assert (summary.rows, summary.batches) == (6, 3)
    # AND once the consumer commits, exactly its rows are left
    assert [r.outcome for r in result.results] == [APPLIED] * 5
    assert await remaining(pg) == [e.delivery_id for e in batch]


async def test_consumer_applies_while_a_prune_batch_is_uncommitted(
    pg: asyncpg.Connection, other: asyncpg.Connection
) -> None:
    # GIVEN 6 old history rows, and a prune batch deleting 3 of them, not committed
    await record(pg, "old", 6, age_days=20)
    cutoff = await cutoff_for(other, 14)
    start = await other.fetchval(history_prune.OLDEST_SQL)
    batch = updates("new", 5, first_issue=2000)
    async with other.transaction():
        assert (await delete_batch(other, start=start, cutoff=cutoff, limit=3))[0] == 3
        # WHEN the consumer applies a batch meanwhile
        result = await asyncio.wait_for(apply_envelopes(pg, batch), timeout=10)
        # THEN it does not wait for the prune
        assert [r.outcome for r in result.results] == [APPLIED] * 5
    assert len(await remaining(pg)) == 3 + 5


async def test_a_redelivery_of_a_row_being_pruned_waits_for_that_batch_only(
    pg: asyncpg.Connection, other: asyncpg.Connection
) -> None:
    # GIVEN an update the consumer applied 20 days ago, and a prune batch deleting its history row
    update = envelope_of(make_event(ASSIGNED, issue_id=88, ts=TS), delivery_id="update-88")
    await apply_envelopes(pg, [update])
    await age(pg, ["update-88"], days=20)
    issue_row = dict(await pg.fetchrow("SELECT * FROM ap_jira_task WHERE issue_id = 88"))
    consumer_pid = pg.get_server_pid()
    cutoff = await cutoff_for(other, 14)
    start = await other.fetchval(history_prune.OLDEST_SQL)
    async with other.transaction():
        assert (await delete_batch(other, start=start, cutoff=cutoff, limit=10))[0] == 1
        # WHEN the same delivery comes again meanwhile
        redelivery = asyncio.create_task(apply_envelopes(pg, [update]), name="redelivery")

        # THEN it waits for the prune's batch (the row it would conflict with is being deleted) ...
        async def consumer_waits() -> bool:
            await other.execute("SELECT pg_stat_clear_snapshot()")  # else one snapshot per transaction
            return bool(await other.fetchval(WAITING_ON_LOCK, consumer_pid))

        await wait_for(consumer_waits, timeout_s=10, what="the redelivery to wait for the prune's batch")
        assert not redelivery.done()
    # ... and goes on when it commits: no deadlock, the row unchanged, the redelivery recorded as stale
    result = await asyncio.wait_for(redelivery, timeout=10)
    assert [r.outcome for r in result.results] == [SKIPPED_STALE]
    assert dict(await pg.fetchrow("SELECT * FROM ap_jira_task WHERE issue_id = 88")) == issue_row


async def test_prune_and_consumer_run_concurrently_to_exact_counts(
    pg: asyncpg.Connection, other: asyncpg.Connection
) -> None:
    # GIVEN 300 old history rows, and 20 consumer batches of 5 new events
    await record(pg, "old", 300, age_days=20)
    batches = [updates(f"new{b:02d}", 5, first_issue=3000 + 5 * b) for b in range(20)]

    async def consume() -> list[str]:
        outcomes: list[str] = []
        for batch in batches:
            outcomes += [r.outcome for r in (await apply_envelopes(pg, batch)).results]
            await asyncio.sleep(0)
        return outcomes

    # WHEN the consumer applies them while the prune deletes in batches of 7
    outcomes, summary = await asyncio.wait_for(
        asyncio.gather(consume(), prune(other, 14, batch_size=7)), timeout=60
    )
    # THEN neither fails nor waits on the other, and exactly the consumer's rows are left
    assert outcomes == [APPLIED] * 100
    assert (summary.rows, summary.batches) == (300, 43)
    assert await remaining(pg) == sorted(e.delivery_id for batch in batches for e in batch)


@pytest.mark.parametrize("batch_size", [1, 10])
async def test_a_row_forget_user_scrubs_while_a_batch_waits_for_it_is_deleted_too(
    pg: asyncpg.Connection, other: asyncpg.Connection, batch_size: int
) -> None:
    # GIVEN 5 rows recorded 20 days ago, the first of them held by a scrub not yet committed, as
    # forget-user writes it (a new row version)
    ids = await record(pg, "old", 5, age_days=20)
    async with pg.transaction():
        await pg.execute(
            "UPDATE ap_jira_task_event SET actor_display_name = 'Former user' WHERE delivery_id = $1", ids[0]
        )
        # WHEN a prune runs meanwhile: a batch waits for that row, and the scrub then commits
        pruning = asyncio.create_task(prune(other, 14, batch_size=batch_size), name="prune")

        async def prune_waits() -> bool:
            await pg.execute("SELECT pg_stat_clear_snapshot()")
            return bool(await pg.fetchval(WAITING_ON_LOCK, other.get_server_pid()))

        await wait_for(prune_waits, timeout_s=10, what="the prune's batch to wait for the scrubbed row")
    summary = await asyncio.wait_for(pruning, timeout=30)
    # THEN the scrubbed row went too, and the prune went on to the end
    assert summary.rows == 5 and await remaining(pg) == []


# -- the index (migration 0008) --


async def test_batches_find_their_rows_through_the_ingested_at_index(pg: asyncpg.Connection) -> None:
    # GIVEN a history of 20000 rows recorded over 200 days, with fresh statistics
    for day in range(0, 200, 10):
        await record(pg, f"d{day:03d}", 1000, age_days=day)
    await pg.execute("ANALYZE ap_jira_task_event")
    cutoff = await cutoff_for(pg, 90)
    start = await pg.fetchval(history_prune.OLDEST_SQL)
    # WHEN Postgres plans a batch as a prepared statement does after a few runs (a generic plan)
    async with pg.transaction():
        await pg.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        statement = await pg.prepare("EXPLAIN (COSTS OFF) " + history_prune.DELETE_BATCH_SQL)
        plan = "\n".join(r[0] for r in await statement.fetch(start, cutoff, 1000))
    # THEN the batch is found through the index, from where the last one ended, and deleted by key
    assert f"Index Scan using {INDEX} on ap_jira_task_event" in plan, plan
    assert "Index Scan using ap_jira_task_event_pkey on ap_jira_task_event" in plan, plan
    assert "Seq Scan" not in plan, plan


@pytest.mark.usefixtures("index_restored")
async def test_the_migration_replaces_an_index_a_failed_concurrent_build_left(pg: asyncpg.Connection) -> None:
    # GIVEN an operator's CREATE INDEX CONCURRENTLY of that name that failed (an INVALID index)
    (migration,) = [m for m in migrate.available() if m.version == 8]
    await record(pg, "row", 1, age_days=0)
    await pg.execute(f"DROP INDEX {INDEX}")
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await pg.execute(
                f"CREATE INDEX CONCURRENTLY {INDEX} ON ap_jira_task_event "
                "((issue_id / (issue_id - issue_id)))"
            )
        assert await pg.fetchval(IS_VALID) is False
    finally:
        # WHEN the migration runs
        async with pg.transaction():
            await pg.execute(migration.sql)
    # THEN the index is valid and on ingested_at
    assert await pg.fetchval(IS_VALID) is True
    assert await pg.fetchval(f"SELECT pg_get_indexdef('{INDEX}'::regclass)") == (
        f"CREATE INDEX {INDEX} ON public.ap_jira_task_event USING btree (ingested_at)"
    )


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("index_restored")
async def test_the_migration_gives_way_to_a_reader_of_the_history_rather_than_hold_up_the_consumer(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN an INVALID index of that name (a failed concurrent build), and a long query over the history
    (migration,) = [m for m in migrate.available() if m.version == 8]
    await record(pg, "row", 1, age_days=0)
    await pg.execute(f"DROP INDEX {INDEX}")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await pg.execute(
            f"CREATE INDEX CONCURRENTLY {INDEX} ON ap_jira_task_event ((issue_id / (issue_id - issue_id)))"
        )
    reader = await db.connect(db_settings)
    try:
        await reader.execute("BEGIN; LOCK TABLE ap_jira_task_event IN ACCESS SHARE MODE")
        # WHEN the migration runs THEN it waits 5 s at most for the drop's lock (queued, the drop would
        # hold up every consumer insert behind it), and stops saying what to do
        with pytest.raises(
            asyncpg.RaiseError, match="could not be dropped within 5 s: .* DROP INDEX CONCURRENTLY"
        ):
            async with pg.transaction():
                await pg.execute(migration.sql)
    finally:
        await reader.close()
    assert await pg.fetchval(IS_VALID) is False  # nothing changed; the operator's drop comes next


@pytest.mark.usefixtures("index_restored")
async def test_the_migration_keeps_an_index_built_beforehand_concurrently(pg: asyncpg.Connection) -> None:
    # GIVEN the index built beforehand as docs/ and the migration advise (CREATE INDEX CONCURRENTLY)
    (migration,) = [m for m in migrate.available() if m.version == 8]
    await record(pg, "row", 1, age_days=0)
    await pg.execute(f"DROP INDEX {INDEX}")
    await pg.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON ap_jira_task_event (ingested_at)")
    built = await pg.fetchval(f"SELECT '{INDEX}'::regclass::oid")
    # WHEN the migration runs THEN it finds that index and keeps it (no rebuild under a lock)
    async with pg.transaction():
        await pg.execute(migration.sql)
    assert await pg.fetchval(f"SELECT '{INDEX}'::regclass::oid") == built
    assert await pg.fetchval(IS_VALID) is True


@pytest.mark.parametrize(
    ("kind", "definition"),
    [
        ("INDEX", "USING hash (ingested_at)"),
        ("UNIQUE INDEX", "(ingested_at)"),
        ("INDEX", "(ingested_at, issue_id)"),
        ("INDEX", "(ingested_at) WHERE applied"),
        ("INDEX", "((ingested_at AT TIME ZONE 'UTC'))"),
    ],
)
@pytest.mark.usefixtures("index_restored")
async def test_the_migration_refuses_an_index_of_its_name_the_prune_cannot_use_as_built(
    pg: asyncpg.Connection, kind: str, definition: str
) -> None:
    # GIVEN an index of the migration's name on ingested_at but not the plain one it builds (a unique
    # one would refuse two deliveries recorded in one statement)
    (migration,) = [m for m in migrate.available() if m.version == 8]
    await pg.execute(f"DROP INDEX {INDEX}")
    await pg.execute(f"CREATE {kind} {INDEX} ON ap_jira_task_event {definition}")
    # WHEN the migration runs THEN it stops and says what to do: that index is not its to drop
    with pytest.raises(asyncpg.RaiseError, match="exists but is not a plain index on ap_jira_task_event"):
        async with pg.transaction():
            await pg.execute(migration.sql)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", [INDEX, "ap_jira_task_event_other_idx"])
@pytest.mark.usefixtures("index_restored")
async def test_the_migration_stops_rather_than_wait_on_a_concurrent_build_still_running(
    pg: asyncpg.Connection, db_settings: DatabaseSettings, name: str
) -> None:
    # GIVEN an operator's CREATE INDEX CONCURRENTLY on the history table (of this migration's index or
    # another), still waiting for a writer
    (migration,) = [m for m in migrate.available() if m.version == 8]
    if name == INDEX:
        await pg.execute(f"DROP INDEX {INDEX}")
    writer, builder = await db.connect(db_settings), await db.connect(db_settings)
    try:
        await writer.execute("BEGIN")
        await record(writer, "open", 1, age_days=0)
        building = asyncio.create_task(
            builder.execute(f"CREATE INDEX CONCURRENTLY {name} ON ap_jira_task_event (ingested_at)")
        )

        async def in_progress() -> bool:
            await pg.execute("SELECT pg_stat_clear_snapshot()")
            return bool(await pg.fetchval(BUILDING))

        await wait_for(in_progress, what="the concurrent build under way")
        # WHEN the migration runs THEN it stops at once and says to wait for the build: building or
        # dropping its index would queue behind the build (and the consumer behind that), while the
        # build waits for the migration's transaction to end
        with pytest.raises(
            asyncpg.RaiseError,
            match=r"an index on ap_jira_task_event is being built \(CREATE INDEX, PostgreSQL backend pid "
            + f"{builder.get_server_pid()}"
            + r"\); wait for it to finish",
        ):
            async with pg.transaction():
                await pg.execute(migration.sql)
        await writer.execute("COMMIT")
        await asyncio.wait_for(building, timeout=30)
    finally:
        await writer.close()
        await builder.close()
    # AND the operator's build completes, valid, for the next setup to find
    assert await pg.fetchval(f"SELECT indisvalid FROM pg_index WHERE indexrelid = '{name}'::regclass")
    if name != INDEX:
        await pg.execute(f"DROP INDEX {name}")
