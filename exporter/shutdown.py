"""Running an export that is cancelled, its upload aborted, when the stop event is set (the event
comes from :func:`shared.shutdown.stop_on_signals`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """The stop event was set while the awaited work ran; the work was cancelled."""


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
