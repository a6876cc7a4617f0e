"""Exporting on a schedule: a cron expression (croniter) read in an IANA time zone (zoneinfo), so
"0 3 * * *" in America/Sao_Paulo means 03:00 there, daylight saving time or not.

The loop sleeps until the next time, runs one export, and repeats until the stop event is set. A run
refused by the lock is skipped; a run that fails for a reason a person can act on is logged and the
next time is awaited (the failure is in the metrics); anything else is a bug and ends the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
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


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    if seconds <= 0:
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
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
    succeeded = 0
    while not stop.is_set():
        due = next_run(settings.schedule, settings.tzinfo, clock())
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
