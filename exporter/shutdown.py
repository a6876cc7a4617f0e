"""Stopping on SIGTERM/SIGINT: a stop event set by signal handlers (the previous handlers come back
afterwards), and a way to run an export that is cancelled, upload aborted, when the event is set."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The event to watch, and which signal set it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal: signal.Signals | None = None

    def request(self, sig: signal.Signals) -> None:
        if self.signal is None:
            self.signal = sig
        self.event.set()


class Stopped(Exception):
    """The stop event was set while the awaited work ran; the work was cancelled."""


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    loop = asyncio.get_running_loop()
    stop = StopRequest()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.request, sig)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


async def run_unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event, *, name: str) -> T:
    """Await ``work`` as a named task; if ``stop`` is set first, cancel it, wait for it to unwind (its
    cleanup aborts uploads) and raise :class:`Stopped`."""
    task = asyncio.create_task(work, name=name)
    watcher = asyncio.create_task(stop.wait(), name=f"{name}-stop-watch")
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise Stopped(name)
    return task.result()
