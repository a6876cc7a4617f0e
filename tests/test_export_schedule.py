"""The schedule: next run times in a time zone (DST included), and the loop driven by an injected clock
and wait (no sleeping), running real exports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from structlog.testing import capture_logs

from exporter import schedule
from exporter.lock import EXPORT_LOCK_KEY
from exporter.schedule import (
    missed_runs,
    next_due,
    next_run,
    run_on_schedule,
    utc_days_left_out,
    wait_or_stop,
)
from exporter.settings import ExporterSettings
from shared.settings import AwsSettings
from tests.test_export_support import insert_awkward_rows, list_keys, settings_factory

__all__ = ["settings_factory"]  # a fixture, used by name

SAO_PAULO = ZoneInfo("America/Sao_Paulo")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # 04:00 in São Paulo (UTC-3): today's 03:00 has passed, so tomorrow 03:00 local = 06:00 UTC
        (utc(2024, 5, 10, 7, 0), utc(2024, 5, 11, 6, 0)),
        # 02:59 local: today at 03:00 local
        (utc(2024, 5, 10, 5, 59), utc(2024, 5, 10, 6, 0)),
        # exactly 03:00 local: strictly after, so tomorrow
        (utc(2024, 5, 10, 6, 0), utc(2024, 5, 11, 6, 0)),
        # across the year end
        (utc(2024, 12, 31, 23, 0), utc(2025, 1, 1, 6, 0)),
    ],
)
def test_next_run_is_the_local_time_in_the_schedule_time_zone(now: datetime, expected: datetime) -> None:
    assert next_run("0 3 * * *", SAO_PAULO, now) == expected


def test_next_run_follows_daylight_saving_time() -> None:
    # Berlin switched to summer time on 2024-03-31: 03:00 local was 02:00 UTC before, 01:00 UTC after.
    before = next_run("0 3 * * *", BERLIN, utc(2024, 3, 29, 12, 0))
    after = next_run("0 3 * * *", BERLIN, utc(2024, 4, 1, 12, 0))
    assert (before, after) == (utc(2024, 3, 30, 2, 0), utc(2024, 4, 2, 1, 0))
    assert after.astimezone(BERLIN).hour == 3


def test_a_fixed_time_repeated_when_clocks_go_back_runs_once() -> None:
    # Berlin set its clocks back on 2024-10-27 at 03:00 CEST to 02:00 CET: 02:30 happened twice, at
    # 00:30 and 01:30 UTC. A daily 02:30 export ran at the first; the next is the following day.
    assert next_run("30 2 * * *", BERLIN, utc(2024, 10, 27, 0, 30)) == utc(2024, 10, 28, 1, 30)
    assert next_run("30 2 * * *", BERLIN, utc(2024, 10, 26, 12, 0)) == utc(2024, 10, 27, 0, 30)
    # In spring the skipped 02:30 runs when the clocks jump (03:00 CEST), as cron does.
    assert next_run("30 2 * * *", BERLIN, utc(2024, 3, 30, 12, 0)) == utc(2024, 3, 31, 1, 0)


def test_a_wildcard_hour_runs_in_both_occurrences_of_a_repeated_hour() -> None:
    # Hourly: 02:00 CEST (00:00 UTC), then 02:00 CET (01:00 UTC), as cron runs wildcard jobs.
    assert next_run("0 * * * *", BERLIN, utc(2024, 10, 27, 0, 0)) == utc(2024, 10, 27, 1, 0)
    assert next_run("@hourly", BERLIN, utc(2024, 10, 27, 0, 0)) == utc(2024, 10, 27, 1, 0)


def test_a_range_written_backwards_wraps_around_midnight() -> None:
    # docs/exporter.md: `22-2` is 22, 23, 0, 1, 2 (croniter's reading), not refused and not empty
    runs = [utc(2024, 5, 1, 2, 30)]
    for _ in range(5):
        runs.append(next_run("0 22-2 * * *", ZoneInfo("UTC"), runs[-1]))
    assert [t.hour for t in runs[1:]] == [22, 23, 0, 1, 2]
    assert runs[-1] == utc(2024, 5, 2, 2, 0)


def test_next_run_needs_an_aware_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_run("0 3 * * *", SAO_PAULO, datetime(2024, 5, 10, 7, 0))


class FakeTime:
    """A clock and a wait that only advance the clock; stops the loop after `runs` waits."""

    def __init__(self, start: datetime, stop: asyncio.Event, *, stop_after_waits: int) -> None:
        self.now = start
        self.waits: list[float] = []
        self._stop = stop
        self._stop_after = stop_after_waits

    def clock(self) -> datetime:
        return self.now

    async def wait(self, stop: asyncio.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        if len(self.waits) > self._stop_after:
            self._stop.set()
            return True
        self.now += timedelta(seconds=seconds)
        return False


async def test_schedule_loop_runs_an_export_at_each_local_time_then_stops(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN rows, and a daily 03:00 São Paulo schedule with the clock at 05:00 UTC (02:00 local)
    await insert_awkward_rows(pg, 20)
    settings = settings_factory(schedule="0 3 * * *", timezone="America/Sao_Paulo")
    stop = asyncio.Event()
    fake = FakeTime(utc(2024, 5, 10, 5, 0), stop, stop_after_waits=2)
    # WHEN the loop runs until its third wait
    runs = await run_on_schedule(settings, stop, clock=fake.clock, wait=fake.wait)
    # THEN it waited one hour, ran, waited a day, ran, and stopped while waiting
    assert runs == 2
    assert fake.waits[:2] == [3600.0, 86400.0]
    # AND each run wrote its day's partition (dt is the UTC date of the run)
    keys = await list_keys(aws_settings, bucket, "lake/ap_jira_task/history/")
    assert keys == [
        "lake/ap_jira_task/history/dt=2024-05-10/_manifest.json",
        "lake/ap_jira_task/history/dt=2024-05-10/ap_jira_task.csv",
        "lake/ap_jira_task/history/dt=2024-05-11/_manifest.json",
        "lake/ap_jira_task/history/dt=2024-05-11/ap_jira_task.csv",
    ]
    started = [
        r["started_at"] for r in await pg.fetch("SELECT started_at FROM jiralake_export_run ORDER BY run_id")
    ]
    assert started == [utc(2024, 5, 10, 6, 0), utc(2024, 5, 11, 6, 0)]


async def test_schedule_loop_skips_a_run_while_another_export_holds_the_lock(
    pg: asyncpg.Connection, settings_factory: Callable[..., ExporterSettings]
) -> None:
    # GIVEN another export holding the lock
    await pg.execute("SELECT pg_advisory_lock($1)", EXPORT_LOCK_KEY)
    settings = settings_factory(schedule="0 * * * *")
    stop = asyncio.Event()
    fake = FakeTime(utc(2024, 5, 10, 5, 30), stop, stop_after_waits=2)
    try:
        # WHEN two scheduled times come
        runs = await run_on_schedule(settings, stop, clock=fake.clock, wait=fake.wait)
    finally:
        await pg.execute("SELECT pg_advisory_unlock($1)", EXPORT_LOCK_KEY)
    # THEN both were skipped and the loop went on waiting
    assert runs == 0
    assert fake.waits[:2] == [1800.0, 3600.0]
    assert await pg.fetchval("SELECT count(*) FROM jiralake_export_run") == 0


async def test_wait_or_stop_returns_at_once_when_stopped() -> None:
    stop = asyncio.Event()
    assert await wait_or_stop(stop, 0) is False
    stop.set()
    assert await asyncio.wait_for(wait_or_stop(stop, 3600), timeout=1) is True


LONDON = ZoneInfo("Europe/London")


@pytest.mark.parametrize(
    ("expression", "tz", "left_out"),
    [
        # midnight in London is 23:00 UTC the day before in summer: 27 October gets no run
        ("@daily", LONDON, [date(2024, 10, 27)]),
        ("0 1 * * *", BERLIN, [date(2024, 10, 27)]),
        ("0 0 * * *", ZoneInfo("UTC"), []),
        ("0 3 * * *", LONDON, []),  # 02:00 or 03:00 UTC: the same UTC day all year
        ("0 3 * * 1", LONDON, []),  # weekly: no day is due
        ("0 0,12 * * *", LONDON, []),  # twice a day: every UTC day gets a run
    ],
    ids=["london-midnight", "berlin-1am", "utc-midnight", "london-3am", "weekly", "twice-daily"],
)
def test_a_daily_time_that_moves_to_another_utc_day_with_dst_is_found(
    expression: str, tz: ZoneInfo, left_out: list[date]
) -> None:
    assert utc_days_left_out(expression, tz, utc(2024, 1, 5, 12)) == left_out


async def test_the_loop_warns_at_start_of_a_schedule_that_leaves_out_utc_days(
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a daily export at midnight in London, started in January
    settings = settings_factory(schedule="@daily", timezone="Europe/London")
    stop = asyncio.Event()
    fake = FakeTime(utc(2024, 1, 5, 12), stop, stop_after_waits=0)
    # WHEN the scheduled exporter starts
    with capture_logs() as logs:
        await run_on_schedule(settings, stop, clock=fake.clock, wait=fake.wait)
    # THEN it warns, naming the day history/ will lack and what to do
    [warning] = [line for line in logs if line["event"] == "export_schedule_leaves_out_utc_days"]
    assert (warning["log_level"], warning["days"]) == ("warning", ["2024-10-27"])
    assert "such as 03:00" in warning["detail"]


def test_a_time_just_run_is_not_run_again_when_the_clock_steps_back() -> None:
    # GIVEN the 03:00 run just ran, and the wall clock stepped back 2 minutes (NTP)
    ran, now = utc(2024, 5, 10, 3, 0), utc(2024, 5, 10, 2, 58)
    # WHEN the next time is chosen THEN it is tomorrow's, not 03:00 again
    assert next_due("0 3 * * *", ZoneInfo("UTC"), now, ran) == utc(2024, 5, 11, 3, 0)
    assert next_due("0 3 * * *", ZoneInfo("UTC"), now, None) == utc(2024, 5, 10, 3, 0)


def test_times_that_pass_during_a_long_run_are_named() -> None:
    # GIVEN a run every 5 minutes whose 03:00 export lasted 12 minutes
    ran, due = utc(2024, 5, 10, 3, 0), next_due("*/5 * * * *", ZoneInfo("UTC"), utc(2024, 5, 10, 3, 12), None)
    # THEN 03:05 and 03:10 passed unrun, and 03:15 is next
    assert due == utc(2024, 5, 10, 3, 15)
    assert missed_runs("*/5 * * * *", ZoneInfo("UTC"), ran, due) == [
        utc(2024, 5, 10, 3, 5),
        utc(2024, 5, 10, 3, 10),
    ]


async def test_a_long_wait_reads_the_wall_clock_again_every_minute_at_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN waits capped at 50 ms (the product's: MAX_WAIT_S, a minute)
    monkeypatch.setattr(schedule, "MAX_WAIT_S", 0.05)
    # WHEN a day is waited for THEN the wait ends at the cap, not stopped, for the loop to read the
    # wall clock again (a clock stepped forward, or a host that slept, would otherwise start it late)
    assert await asyncio.wait_for(wait_or_stop(asyncio.Event(), 86_400), timeout=5) is False
