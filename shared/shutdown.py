"""Stopping on SIGTERM/SIGINT, the same way in every service: signal handlers set a stop event, and
the previous handlers come back when the service is done."""

from __future__ import annotations

import asyncio
import contextvars
import signal
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import structlog

log = structlog.get_logger()

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

T = TypeVar("T")


class Stopped(Exception):
    """The stop event was set while the awaited work ran; the work was cancelled."""


class StopRequest:
    """The event services watch, and the signal that set it (None when set by code)."""

    def __init__(self, event: asyncio.Event | None = None) -> None:
        self.event = event or asyncio.Event()
        self.signal: signal.Signals | None = None

    def request(self, sig: signal.Signals) -> None:
        if self.event.is_set():
            log.info("signal_ignored_already_stopping", signal=sig.name)
            return
        log.info("signal_received", signal=sig.name)
        self.signal = sig
        self.event.set()


@contextmanager
def stop_on_signals(event: asyncio.Event | None = None) -> Iterator[StopRequest]:
    """``with stop_on_signals(stop) as request:`` SIGTERM/SIGINT set ``stop`` (or a new event)."""
    loop = asyncio.get_running_loop()
    stop = StopRequest(event)
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.request, sig)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)


def signal_exit_code(sig: signal.Signals | None) -> int:
    """The exit code of a command a stop signal ended early: 128 + the signal's number, as a shell
    reports a process killed by it (143 for SIGTERM, 130 for SIGINT; SIGTERM when none is known)."""
    return 128 + int(sig or signal.SIGTERM)


def stop_name(sig: signal.Signals | None) -> str:
    """How a command's summary names what stopped it: ``SIGTERM``, ``SIGINT``, or a stop request."""
    return sig.name if sig else "a stop request"


async def wait_to_the_end(
    task: asyncio.Future[Any], *, on_first_cancel: Callable[[], None] | None = None
) -> int:
    """Wait until ``task`` is done, however often the caller is cancelled meanwhile (even in the very
    loop turn ``task`` ends); returns how many times it was. ``on_first_cancel`` runs at the first."""
    cancellations = 0
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            if not cancellations and on_first_cancel is not None:
                on_first_cancel()
            cancellations += 1
    return cancellations


async def finish_then_cancel(work: Coroutine[Any, Any, T], *, name: str) -> T:
    """Run ``work`` to its end in a task of its own even if the caller is cancelled meanwhile, however
    often (a send-then-delete pair that a Ctrl-C must not split); then raise the cancellation if there
    was one, else return the result. A failure of ``work`` is raised as is."""
    task = asyncio.create_task(work, name=name)
    cancellations = await wait_to_the_end(task)
    result = task.result()
    if cancellations:
        raise asyncio.CancelledError
    return result


async def run_unless_stopped(
    work: Coroutine[Any, Any, T],
    stop: asyncio.Event | None,
    *,
    name: str,
    context: contextvars.Context | None = None,
    keep_running: Callable[[], bool] = lambda: False,
    unwind_timeout_s: float | None = None,
    abandon: Callable[[], None] | None = None,
) -> T:
    """Await ``work`` as a named task; if ``stop`` is set first, cancel it and wait for it to unwind
    (an asyncpg statement is cancelled on the server, and its transaction rolled back), then raise
    :class:`Stopped`. When ``keep_running()`` says so at the stop, ``work`` is not cancelled: it runs to
    its end, and its result (or failure) is returned (or raised) as usual. No ``stop``: ``work`` is
    awaited as it is.

    With ``unwind_timeout_s``, the cancelled ``work`` has that long to unwind; then ``abandon()`` runs
    (``conn.terminate``: an asyncpg transaction's ROLLBACK waits for the server to confirm the cancelled
    statement, which a server that stopped answering never does; closing the connection from this side
    ends that wait, and the server rolls back a session that is gone) and its end is awaited. Either way
    the stop is what ended it: what it raised while unwinding (its cleanup failing on a connection that
    is gone) is :class:`Stopped` too."""
    if unwind_timeout_s is not None and abandon is None:
        # Without a way to end it, the unwinding would be waited for after the timeout all the same.
        raise ValueError("unwind_timeout_s needs abandon")
    if stop is None:
        return await work
    task = asyncio.create_task(work, name=name, context=context)
    watcher = asyncio.create_task(stop.wait(), name=f"{name}-stop-watch")
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        if keep_running():
            await asyncio.wait({task})
        else:
            task.cancel()
            await asyncio.wait({task}, timeout=unwind_timeout_s)
            if not task.done():
                log.warning("stop_unwind_timed_out", task=name, timeout_s=unwind_timeout_s)
                if abandon is not None:
                    abandon()
                await asyncio.wait({task})
            if unwind_timeout_s is not None and not task.cancelled() and task.exception() is not None:
                raise Stopped(name) from task.exception()
        if task.cancelled():
            raise Stopped(name)
    return task.result()
