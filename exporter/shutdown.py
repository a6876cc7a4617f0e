"""Running an export that is cancelled, its upload aborted, when the stop event is set (the event
comes from :func:`shared.shutdown.stop_on_signals`), unless it has started to publish: from S3's
CompleteMultipartUpload on, a run finishes (the copy to latest/, the manifests, the run row, closing its
clients and connections) and then the stop is honoured, so a stop never leaves latest/ ahead of its
manifest, a published run recorded as failed, or a published run reported as stopped.

The cleanup of a failure (aborting an upload, recording the failed run) also runs to its end when a stop
arrives meanwhile: cancelled half-way, the caller would close the S3 client under the abort and leave
the upload open."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from shared import shutdown

log = structlog.get_logger()

T = TypeVar("T")

# The longest wait for one call of a failure's cleanup (an S3 abort, a bookkeeping row): against an
# S3 or a PostgreSQL that takes the request and never answers, botocore would try 4 times, 60 s each,
# and an asyncpg statement would wait for ever. What a cleanup cut short leaves, the next export clears.
CLEANUP_CALL_TIMEOUT_S = 10.0


@dataclass
class _Run:
    """What :func:`run_unless_stopped` knows of the work it watches."""

    publishing: bool = False


# The run of the current task (and of the tasks it starts), set by run_unless_stopped.
_current_run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("export_run", default=None)


async def run_unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event, *, name: str) -> T:
    """:func:`shared.shutdown.run_unless_stopped` for an export: if ``stop`` is set first, the run is
    cancelled (its cleanup aborts uploads) and :class:`shared.shutdown.Stopped` raised, unless it has
    started to publish (:func:`finish_before_stopping`): then it runs to its end, and its result (or
    failure) is returned (or raised) as usual."""
    run = _Run()
    context = contextvars.copy_context()
    context.run(_current_run.set, run)

    def publishing() -> bool:
        if run.publishing:
            log.warning("export_stop_deferred", until=f"{name} is done")
        return run.publishing

    return await shutdown.run_unless_stopped(work, stop, name=name, context=context, keep_running=publishing)


async def finish_before_stopping(work: Coroutine[Any, Any, T], *, name: str) -> T:
    """Run ``work`` to its end in a task of its own, even if the caller is cancelled meanwhile (a stop
    request): the caller then waits for it, and returns its result or raises its failure as if it had
    not been cancelled. Only a cancellation of ``work`` itself (the event loop shutting down) cancels it.

    From this call on, the run the caller belongs to is publishing: :func:`run_unless_stopped` no longer
    cancels it when the stop comes, so what follows (closing the S3 client and the connections) is not
    cut short either."""
    if (run := _current_run.get()) is not None:
        run.publishing = True
    task = asyncio.create_task(work, name=name)
    cancellations = await _wait_to_the_end(task, deferred=f"{name} is done")
    if not task.cancelled():
        _withdraw(cancellations)
    return task.result()


async def finish_then_stop(work: Coroutine[Any, Any, T], *, name: str) -> tuple[T, bool]:
    """Run ``work`` to its end in a task of its own, even if the caller is cancelled meanwhile; returns
    its result and whether the caller was (its failure is raised as is). For a call whose result must
    not be lost: S3 creating an upload that a stop must then abort. A caller told it was cancelled
    undoes the work and raises :class:`asyncio.CancelledError`."""
    task = asyncio.create_task(work, name=name)
    cancellations = await _wait_to_the_end(task, deferred=f"{name} is done")
    return task.result(), cancellations > 0


async def finish_cleanup(cleanup: Coroutine[Any, Any, T], *, after: BaseException | None, name: str) -> T:
    """Run ``cleanup`` (aborting an upload, recording a failure) to its end in a task of its own, even if
    the caller is cancelled meanwhile, and return its result.

    ``after`` is the failure the cleanup follows (None: none). A cancellation that arrived meanwhile is
    withdrawn when there is one, because the caller re-raises that failure next: it came first, it is
    what the run failed of (its reason and exit code). After no failure, the cancellation is raised
    once the cleanup has ended."""
    task = asyncio.create_task(cleanup, name=name)
    cancellations = await _wait_to_the_end(task, deferred=f"{name} is done")
    if cancellations and after is None:
        raise asyncio.CancelledError
    if not task.cancelled():
        _withdraw(cancellations)
    return task.result()


async def _wait_to_the_end(task: asyncio.Task[Any], *, deferred: str) -> int:
    """:func:`shared.shutdown.wait_to_the_end`, logging that the stop waits for ``deferred``."""
    return await shutdown.wait_to_the_end(
        task, on_first_cancel=lambda: log.warning("export_stop_deferred", until=deferred)
    )


def _withdraw(cancellations: int) -> None:
    """Take back ``cancellations`` requests to cancel the current task, which it has absorbed."""
    current = asyncio.current_task()
    if current is not None:
        for _ in range(cancellations):
            current.uncancel()
