"""The receiver's file descriptors: every client connection holds one, and so does every SQS call.

At start the soft ``RLIMIT_NOFILE`` is raised to the hard limit (what Go's runtime does for every
program): container runtimes often start processes with a soft limit of 1024, which a few hundred idle
clients exhaust. When the process runs out anyway, asyncio's accept loop reports it through the event
loop's exception handler at ERROR with a traceback, about once per second per listening socket; the
handler here makes that one WARNING line per 10 s with a count, and leaves every other report
to asyncio's default handler.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

log = structlog.get_logger()

LOG_OUT_OF_DESCRIPTORS = "receiver_cannot_accept_connections"
LOG_INTERVAL_S = 10.0
# Linux's default fs.nr_open: the highest soft limit asked for when the hard one is unlimited.
_UNLIMITED_TARGET = 1_048_576
# The errors asyncio's accept loop reports and retries after (asyncio/selector_events.py).
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit where the kernel allows; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft  # the kernel caps it lower (fs.nr_open): keep what there is
        return target
    return soft


class AcceptErrorsAsWarnings:
    """An event loop exception handler: accept() failing for lack of descriptors or memory becomes one
    WARNING line per :data:`LOG_INTERVAL_S` (with how many failures it stands for); anything else goes
    to the loop's default handler."""

    def __init__(self) -> None:
        self._last_logged: float | None = None
        self._unlogged = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        accepting = str(context.get("message", "")).startswith("socket.accept()")
        if not accepting or not isinstance(exc, OSError) or exc.errno not in _OUT_OF_RESOURCES:
            loop.default_exception_handler(context)
            return
        self._unlogged += 1
        now = time.monotonic()
        if self._last_logged is not None and now - self._last_logged < LOG_INTERVAL_S:
            return
        log.warning(
            LOG_OUT_OF_DESCRIPTORS,
            error=f"{type(exc).__name__}: {exc.strerror}",
            failures=self._unlogged,
            open_files_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            detail="new connections wait in the listen backlog until descriptors free up",
        )
        self._last_logged, self._unlogged = now, 0


@contextmanager
def accept_errors_as_warnings() -> Iterator[None]:
    """Install :class:`AcceptErrorsAsWarnings` on the running loop; the previous handler comes back."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(AcceptErrorsAsWarnings())
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
