"""Progress of one export: counters the pipeline updates, and two ways to show them.

On a terminal, one line rewritten in place (rows, MB, MB/s); otherwise a structured ``export_progress``
log line every ``interval_s``. Listeners get a snapshot on every update and decide themselves how
often to show it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import structlog

log = structlog.get_logger()

MB = 1_000_000


@dataclass(frozen=True)
class ProgressSnapshot:
    rows: int
    # Bytes read from PostgreSQL (CSV text, or Parquet as encoded), before gzip.
    source_bytes: int
    # Bytes stored in S3 so far, in completed parts.
    uploaded_bytes: int
    parts_stored: int
    elapsed_s: float
    done: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.uploaded_bytes / MB / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressListener = Callable[[ProgressSnapshot], None]


class Progress:
    def __init__(
        self, listener: ProgressListener | None = None, *, clock: Callable[[], float] = time.monotonic
    ):
        self._listener = listener
        self._clock = clock
        self._started = clock()
        self.rows = 0
        self.source_bytes = 0
        self.uploaded_bytes = 0
        self.parts_stored = 0

    def read(self, *, rows: int, source_bytes: int) -> None:
        self.rows += rows
        self.source_bytes += source_bytes
        self._notify()

    def part_stored(self, _part_number: int, size_bytes: int) -> None:
        self.parts_stored += 1
        self.uploaded_bytes += size_bytes
        self._notify()

    def finish(self, *, rows: int) -> ProgressSnapshot:
        self.rows = rows
        snapshot = self.snapshot(done=True)
        if self._listener is not None:
            self._listener(snapshot)
        return snapshot

    def snapshot(self, *, done: bool = False) -> ProgressSnapshot:
        return ProgressSnapshot(
            rows=self.rows,
            source_bytes=self.source_bytes,
            uploaded_bytes=self.uploaded_bytes,
            parts_stored=self.parts_stored,
            elapsed_s=self._clock() - self._started,
            done=done,
        )

    def _notify(self) -> None:
        if self._listener is not None:
            self._listener(self.snapshot())


def progress_line(s: ProgressSnapshot) -> str:
    return (
        f"{s.rows:,} rows  {s.source_bytes / MB:,.1f} MB read  {s.uploaded_bytes / MB:,.1f} MB stored  "
        f"{s.mb_per_s:,.1f} MB/s  {s.parts_stored} parts"
    )


class TerminalProgress:
    """Rewrites one line on a terminal, at most every ``interval_s``, and ends it when the run is done."""

    def __init__(
        self, stream: TextIO, *, interval_s: float = 0.2, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._interval_s = interval_s
        self._clock = clock
        self._last = float("-inf")

    def __call__(self, s: ProgressSnapshot) -> None:
        now = self._clock()
        if not s.done and now - self._last < self._interval_s:
            return
        self._last = now
        self._stream.write("\r\x1b[2K" + progress_line(s) + ("\n" if s.done else ""))
        self._stream.flush()


class LogProgress:
    """An ``export_progress`` log line at most every ``interval_s`` (not at the end: the run logs that)."""

    def __init__(self, *, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last = clock()

    def __call__(self, s: ProgressSnapshot) -> None:
        now = self._clock()
        if s.done or now - self._last < self._interval_s:
            return
        self._last = now
        log.info(
            "export_progress",
            rows=s.rows,
            source_bytes=s.source_bytes,
            uploaded_bytes=s.uploaded_bytes,
            parts_stored=s.parts_stored,
            mb_per_s=round(s.mb_per_s, 2),
        )
