"""Running ``jiralake`` in the test's own process beside a proxy served from a thread of its own:
``cli.main`` calls ``asyncio.run`` and installs signal handlers, which need the main thread, so the
proxy (an async context manager from tests/fault_proxy.py or tests/s3_pause_proxy.py) cannot share
the test's loop."""

from __future__ import annotations

import asyncio
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
    started = threading.Event()

    def serve() -> None:
        loop.run_until_complete(proxy.__aenter__())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name=f"proxy-{type(proxy).__name__}", daemon=True)
    thread.start()
    assert started.wait(10), "the proxy did not start"
    try:
        yield proxy
    finally:
        asyncio.run_coroutine_threadsafe(proxy.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def run_timed(argv: list[str]) -> tuple[int, float]:
    """``jiralake *argv`` in this process: its exit code and how long it took, in seconds."""
    started = time.monotonic()
    code = cli.main(argv)
    return code, time.monotonic() - started
