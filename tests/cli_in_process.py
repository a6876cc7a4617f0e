"""Running ``jiralake`` in the test's own process beside a proxy served from a thread of its own:
``cli.main`` calls ``asyncio.run`` and installs signal handlers, which need the main thread, so the
proxy (an async context manager from tests/fault_proxy.py or tests/s3_pause_proxy.py) cannot share
the test's loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any, TypeVar

from jiralake import cli

P = TypeVar("P", bound=AbstractAsyncContextManager[Any])


@contextmanager
def in_thread(proxy: P) -> Iterator[P]:
    """``proxy`` entered and served by an event loop in a thread of its own until the block ends."""
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[None] = concurrent.futures.Future()

    def serve() -> None:
        try:
            loop.run_until_complete(proxy.__aenter__())
        except BaseException as exc:  # handed to the test's thread: it fails with the real reason
            started.set_exception(exc)
            return
        started.set_result(None)
        loop.run_forever()

    thread = threading.Thread(target=serve, name=f"proxy-{type(proxy).__name__}", daemon=True)
    thread.start()
    try:
        started.result(10)
        yield proxy
    finally:
        try:
            if started.done() and started.exception() is None:
                asyncio.run_coroutine_threadsafe(proxy.__aexit__(None, None, None), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            if not thread.is_alive():
                loop.close()


def run_timed(argv: list[str]) -> tuple[int, float]:
    """``jiralake *argv`` in this process: its exit code and how long it took, in seconds."""
    started = time.monotonic()
    code = cli.main(argv)
    return code, time.monotonic() - started
