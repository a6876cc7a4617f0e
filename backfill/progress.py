"""Progress of a long run: a redrawn bar on a terminal, throttled log lines otherwise.

``[#########-----------] 1200/4000 issues  85.3/s  ETA 33s``. The rate counts only this process's
work (a resumed run starts its rate from zero); the ETA needs a total, which Jira may not give.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import structlog

log = structlog.get_logger()


class Progress:
    def __init__(
        self,
        *,
        total: int | None = None,
        done: int = 0,
        unit: str = "issues",
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_interval_s: float = 10.0,
        redraw_interval_s: float = 0.1,
        width: int = 24,
    ) -> None:
        self.total = total
        self.done = done
        self.unit = unit
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty() if tty is None else tty
        self._clock = clock
        self._started = clock()
        self._done_at_start = done
        self._log_interval_s = log_interval_s
        self._redraw_interval_s = redraw_interval_s
        self._last_output = float("-inf")
        self._done_at_last_output: int | None = None
        self._width = width
        self._drawn = False

    def set_total(self, total: int | None) -> None:
        self.total = total

    def advance(self, count: int) -> None:
        self.done += count
        now = self._clock()
        interval = self._redraw_interval_s if self._tty else self._log_interval_s
        if now - self._last_output >= interval:
            self._output(now)

    def finish(self) -> None:
        if self._tty or self.done != self._done_at_last_output:
            self._output(self._clock())
        if self._tty and self._drawn:
            self._stream.write("\n")
            self._stream.flush()

    @property
    def rate_per_s(self) -> float:
        elapsed = self._clock() - self._started
        return (self.done - self._done_at_start) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rate_per_s
        if self.total is None or rate <= 0:
            return None
        return max(self.total - self.done, 0) / rate

    def line(self) -> str:
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        text = f"{count} {self.unit}  {self.rate_per_s:.1f}/s"
        eta = self.eta_s
        if eta is not None:
            text += f"  ETA {format_duration(eta)}"
        if self.total:
            filled = min(self._width, round(self._width * self.done / self.total))
            text = "[" + "#" * filled + "-" * (self._width - filled) + "] " + text
        return text

    def _output(self, now: float) -> None:
        self._last_output = now
        self._done_at_last_output = self.done
        if self._tty:
            self._stream.write("\r" + self.line() + "\x1b[K")
            self._stream.flush()
            self._drawn = True
            return
        eta = self.eta_s
        log.info(
            "progress",
            unit=self.unit,
            done=self.done,
            total=self.total,
            rate_per_s=round(self.rate_per_s, 1),
            eta_s=None if eta is None else round(eta),
        )


def format_duration(seconds: float) -> str:
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
