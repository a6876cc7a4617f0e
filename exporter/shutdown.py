"""Running an export that is cancelled, its upload aborted, when the stop event is set (the event
comes from :func:`shared.shutdown.stop_on_signals`), unless it has started to publish: from S3's
CompleteMultipartUpload on, a run finishes (the copy to latest/, the manifests, the run row) and then
the stop is honoured, so a stop never leaves latest/ ahead of its manifest or a published run recorded
as failed."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

log = structlog.get_logger()

T = TypeVar("T")


class Stopped(Exception):
    """The stop event was set while the awaited work ran; the work was cancelled."""


async def run_unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event, *, name: str) -> T:
    """Await ``work`` as a named task; if ``stop`` is set first, cancel it and wait for it to unwind (its
    cleanup aborts uploads). Raises :class:`Stopped` when it was cancelled; a run that was publishing
    when the stop came finishes instead, and its result (or failure) is returned (or raised) as usual."""
    task = asyncio.create_task(work, name=name)
    watcher = asyncio.create_task(stop.wait(), name=f"{name}-stop-watch")
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise Stopped(name)
    return task.result()


async def finish_before_stopping(work: Coroutine[Any, Any, T], *, name: str) -> T:
    """Run ``work`` to its end in a task of its own, even if the caller is cancelled meanwhile (a stop
    request): the caller then waits for it, and returns its result or raises its failure as if it had
    not been cancelled. Only a cancellation of ``work`` itself (the event loop shutting down) cancels it.
    """
    task = asyncio.create_task(work, name=name)
    absorbed = 0
    try:
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    raise
                if not absorbed:
                    log.warning("export_stop_deferred", until=f"{name} is done")
                absorbed += 1
    finally:
        if absorbed and (current := asyncio.current_task()) is not None:
            for _ in range(absorbed):
                current.uncancel()
