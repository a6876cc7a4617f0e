"""Stopping on SIGTERM/SIGINT, the same way in every service: signal handlers set a stop event, and
the previous handlers come back when the service is done."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

log = structlog.get_logger()

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
