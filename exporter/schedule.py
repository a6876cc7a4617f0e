"""Exporting on a schedule: a cron expression (croniter) read in an IANA time zone (zoneinfo), so
"0 3 * * *" in America/Sao_Paulo means 03:00 there, daylight saving time or not.

The loop sleeps until the next time, runs one export, and repeats until the stop event is set. A run
refused by the lock is skipped; a run that fails for a reason a person can act on is logged and the
next time is awaited (the failure is in the metrics); anything else is a bug and ends the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import structlog
from croniter import croniter

from exporter.errors import ExportLocked, failure_reason
from exporter.progress import ProgressListener
from exporter.run import Clock, export_once, utc_now
from exporter.settings import ExporterSettings
from exporter.shutdown import run_unless_stopped
from shared.shutdown import Stopped

log = structlog.get_logger()

# Waits up to the given seconds; returns True when the stop event was set.
Wait = Callable[[asyncio.Event, float], Awaitable[bool]]

# The longest single wait before the wall clock is read again: asyncio times a wait on the monotonic
# clock, which sees neither the wall clock stepped forward (NTP, a restored VM) nor, on Linux, the
# time a host spent suspended, so a run starts at most this late after either.
MAX_WAIT_S = 60.0
# A schedule that runs more often than this in its first week is not checked for UTC days it leaves
# out (a twice-daily schedule cannot leave one out).
_DAILY_CHECK_MAX_RUNS = 8


def next_run(expression: str, tz: ZoneInfo, after: datetime) -> datetime:
    """The first time strictly after ``after`` that matches ``expression`` in ``tz``, in UTC.

    Daylight saving time as cron treats it: a time in the hour skipped in spring runs when the clocks
    jump; a time repeated in autumn runs once, at its first occurrence, unless the expression's minute
    or hour field is a wildcard (``*``, ``*/N``), which runs in both (as Vixie cron and cronie do).
    """
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    times = croniter(expression, after.astimezone(tz))
    once_in_repeated_hour = not _wildcard_minute_or_hour(expression)
    while True:
        following: datetime = times.get_next(datetime)
        if not (once_in_repeated_hour and _second_occurrence(following, tz)):
            return following.astimezone(UTC)


def _wildcard_minute_or_hour(expression: str) -> bool:
    fields = expression.split()
    if fields[0].startswith("@"):
        return fields[0].lower() == "@hourly"
    return fields[0].startswith("*") or fields[1].startswith("*")


def _second_occurrence(moment: datetime, tz: ZoneInfo) -> bool:
    """True when ``moment`` is the second time its wall-clock time happens (clocks set back)."""
    local = moment.astimezone(tz)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def utc_days_left_out(expression: str, tz: ZoneInfo, start: datetime) -> list[date]:
    """The UTC days of the year after ``start`` on which a daily schedule writes no ``history/dt=``.

    history/ is dated by the UTC day a run starts. A daily time in a zone with daylight saving time
    that is closer to midnight UTC than the shift (00:00 in London, 01:00 in Berlin, 19:30 in New York)
    falls on the next or the previous UTC day when the clocks change: one UTC day gets no run in
    autumn, and in spring one gets two, the second replacing the first. Empty for a schedule that
    stays on its UTC days all year, runs more than daily, or less than daily (weekly: no day is due).
    """
    week_end = start + timedelta(days=7)
    fires: list[datetime] = []
    moment = next_run(expression, tz, start)
    while moment < week_end and len(fires) <= _DAILY_CHECK_MAX_RUNS:
        fires.append(moment)
        moment = next_run(expression, tz, moment)
    if not 6 <= len(fires) <= _DAILY_CHECK_MAX_RUNS:
        return []  # not once a day (a week around a clock change may hold 6 or 8 runs of a daily one)
    days: set[date] = set()
    moment, year_end = fires[0], start + timedelta(days=366)
    while moment < year_end:
        days.add(moment.date())
        moment = next_run(expression, tz, moment)
    first, span = min(days), (max(days) - min(days)).days
    return [day for day in (first + timedelta(days=n) for n in range(span)) if day not in days]


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` (at most :data:`MAX_WAIT_S`: the caller reads the clock again and
    waits on); True when ``stop`` was set."""
    if seconds <= 0:
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), timeout=min(seconds, MAX_WAIT_S))
    except TimeoutError:
        return False
    return True


async def run_on_schedule(
    settings: ExporterSettings,
    stop: asyncio.Event,
    *,
    changed_since_last: bool = False,
    clock: Clock = utc_now,
    wait: Wait = wait_or_stop,
    on_progress: ProgressListener | None = None,
) -> int:
    """Export at each scheduled time until ``stop`` is set; returns the number of successful runs."""
    if settings.schedule is None:
        raise ValueError("settings.schedule is not set")
    left_out = utc_days_left_out(settings.schedule, settings.tzinfo, clock())
    if left_out:
        log.warning(
            "export_schedule_leaves_out_utc_days",
            schedule=settings.schedule,
            timezone=settings.timezone,
            days=[day.isoformat() for day in left_out],
            detail="history/ is dated by the UTC day a run starts, and this local time moves to another "
            "UTC day when daylight saving time changes (the day before a day left out, or after, gets "
            "two runs, the second replacing the first): schedule at a local time that stays on one UTC "
            "day all year (such as 03:00), or in UTC",
        )
    succeeded = 0
    last_due: datetime | None = None
    while not stop.is_set():
        due = next_due(settings.schedule, settings.tzinfo, clock(), last_due)
        if last_due is not None:
            _log_missed(settings, last_due, due)
        log.info(
            "export_scheduled",
            next_run_at=due.isoformat(),
            next_run_local=due.astimezone(settings.tzinfo).isoformat(),
            schedule=settings.schedule,
            timezone=settings.timezone,
        )
        # Re-check the clock after each wake-up: a wait may end early.
        while (remaining_s := (due - clock()).total_seconds()) > 0:
            if await wait(stop, remaining_s):
                return succeeded
        if stop.is_set():
            break
        last_due = due
        work = export_once(
            settings, changed_since_last=changed_since_last, clock=clock, on_progress=on_progress
        )
        try:
            await run_unless_stopped(work, stop, name="scheduled-export")
        except Stopped:
            log.warning("export_cancelled_by_stop", scheduled_at=due.isoformat())
            break
        except ExportLocked as exc:
            log.warning("export_skipped", reason=str(exc), scheduled_at=due.isoformat())
            continue
        except Exception as exc:
            reason = failure_reason(exc)
            if reason is None:
                raise
            log.warning("export_will_retry_at_next_time", reason=reason, scheduled_at=due.isoformat())
            continue
        succeeded += 1
    return succeeded


def next_due(expression: str, tz: ZoneInfo, now: datetime, last_due: datetime | None) -> datetime:
    """The next time to run: after ``now``, and never again the time last run (``last_due``), even if
    the wall clock was stepped back past it (NTP, a restored VM), which cron does not do either."""
    return next_run(expression, tz, now if last_due is None else max(now, last_due))


def missed_runs(expression: str, tz: ZoneInfo, last_due: datetime, due: datetime) -> list[datetime]:
    """The scheduled times after ``last_due`` and before ``due`` (at most 10,000): those that passed
    while the run of ``last_due`` was still running."""
    missed: list[datetime] = []
    moment = next_run(expression, tz, last_due)
    while moment < due and len(missed) < 10_000:
        missed.append(moment)
        moment = next_run(expression, tz, moment)
    return missed


def _log_missed(settings: ExporterSettings, last_due: datetime, due: datetime) -> None:
    """One line when scheduled times passed while the last run ran (an export longer than the
    interval): they are not run late, the next one is awaited, as cron does."""
    assert settings.schedule is not None
    missed = missed_runs(settings.schedule, settings.tzinfo, last_due, due)
    if missed:
        log.warning(
            "export_runs_missed",
            count=len(missed),
            first=missed[0].isoformat(),
            last=missed[-1].isoformat(),
            running_since=last_due.isoformat(),
            detail="the previous run lasted past these scheduled times; they are not run late",
        )
