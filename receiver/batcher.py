"""The micro-batcher: concurrent webhook requests share ``SendMessageBatch`` calls.

Each request submits one entry and awaits its own future. A background task named ``sqs-batcher``
sends a batch as soon as 10 entries wait (or their bytes fill a batch), or ``max_wait_s`` after the
oldest waiting entry arrived, whichever comes first. At most ``max_inflight`` calls run at once
(a semaphore) and at most ``max_pending`` entries wait (callers get :class:`BatcherFull` beyond),
so memory and SQS concurrency stay bounded under any burst.

Every future is resolved with that entry's own :class:`EntryResult`: a batch in which SQS refused
one entry fails only that entry's request. On :meth:`close` the batcher stops taking entries,
sends everything still waiting at once, and waits (within a grace period) for calls in flight.
:meth:`drain` (called when shutdown begins, while requests are still in flight) keeps taking entries
but stops waiting to fill batches, so no request waits ``max_wait_s`` during a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from shared.metrics import RECEIVER_BATCH_SIZE, SQS_CALLS
from shared.sqs_batch import MAX_BATCH, MAX_CALL_BYTES, EntryResult, entry_bytes, send_entries

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()


class BatcherUnavailable(Exception):
    """The batcher cannot take an entry now; the caller answers 503 and Jira retries."""


class BatcherFull(BatcherUnavailable):
    pass


class BatcherClosed(BatcherUnavailable):
    pass


@dataclass(eq=False)
class _Pending:
    entry: dict[str, Any]
    size_bytes: int
    enqueued_at: float
    future: asyncio.Future[EntryResult]


class SqsBatcher:
    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        *,
        max_wait_s: float,
        max_pending: int,
        max_inflight: int,
        timeout_s: float,
        max_batch_bytes: int = MAX_CALL_BYTES,
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._max_wait_s = max_wait_s
        self._max_pending = max_pending
        self._timeout_s = timeout_s
        self._max_batch_bytes = max_batch_bytes
        self._pending: deque[_Pending] = deque()
        self._pending_bytes = 0
        self._arrived = asyncio.Event()  # an entry waits (or we are closing)
        self._full = asyncio.Event()  # a full batch waits (or we are closing)
        self._slots = asyncio.Semaphore(max_inflight)
        self._inflight: set[asyncio.Task[None]] = set()
        self._draining = False  # send at once, don't wait to fill batches
        self._closing = False  # take no more entries; the loop ends once nothing waits
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sqs-batcher")
        self._task.add_done_callback(_report_crash)

    async def ended(self) -> None:
        """Returns when the batcher's task has ended: after :meth:`close`, or because of a bug."""
        if self._task is None:
            raise RuntimeError("the batcher was never started")
        await asyncio.wait({self._task})

    @property
    def problem(self) -> str | None:
        """Why the batcher cannot send (for /readyz), or None."""
        if self._closing:
            return "shutting down"
        if self._task is None:
            return "not started"
        if self._task.done():
            return "the sqs-batcher task has stopped"
        return None

    def submit(self, entry: dict[str, Any], *, size_bytes: int | None = None) -> asyncio.Future[EntryResult]:
        """Queue one entry (its ``Id`` is replaced when batched); the future resolves with its result.
        ``size_bytes``: its :func:`shared.sqs_batch.entry_bytes`, when the caller has it already."""
        if self._closing or self._task is None or self._task.done():
            raise BatcherClosed("the receiver is shutting down")
        if len(self._pending) >= self._max_pending:
            raise BatcherFull(f"{len(self._pending)} entries already wait for SQS")
        loop = asyncio.get_running_loop()
        size = entry_bytes(entry) if size_bytes is None else size_bytes
        pending = _Pending(entry, size, loop.time(), loop.create_future())
        self._pending.append(pending)
        self._pending_bytes += pending.size_bytes
        self._arrived.set()
        if self._batch_is_full():
            self._full.set()
        return pending.future

    def drain(self) -> None:
        """From now on send every entry at once instead of waiting for a fuller batch."""
        self._draining = True
        self._full.set()

    async def close(self, grace_s: float) -> None:
        """Stop taking entries, send what waits now, and wait up to ``grace_s`` for SQS's answers."""
        self._draining = True
        self._closing = True
        self._arrived.set()
        self._full.set()
        waiting = len(self._pending)
        try:
            async with asyncio.timeout(grace_s):
                if self._task is not None:
                    await asyncio.wait({self._task})  # it sends what waits, then returns
                while self._inflight:
                    await asyncio.wait(set(self._inflight))
        except TimeoutError:
            tasks = [t for t in (self._task, *self._inflight) if t is not None and not t.done()]
            log.warning(
                "sqs_batches_cancelled_at_shutdown",
                unsent_entries=len(self._pending),
                inflight_batches=len(self._inflight),
                grace_s=grace_s,
            )
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_pending("the receiver shut down before SQS confirmed the message")
        log.info("sqs_batcher_closed", flushed_entries=waiting)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            if not self._pending:
                if self._closing:
                    return
                self._arrived.clear()
                continue
            if not self._draining and not self._full.is_set():
                deadline = self._pending[0].enqueued_at + self._max_wait_s
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(max(deadline, loop.time())):
                        await self._full.wait()
            # Wait for a free slot before choosing the entries: whatever arrives meanwhile rides along.
            await self._slots.acquire()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._send(batch), name="sqs-batch-send")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        batch_bytes = 0
        while self._pending and len(batch) < MAX_BATCH:
            head = self._pending[0]
            if not head.future.done():  # done already: its request stopped waiting, don't send it
                if batch and batch_bytes + head.size_bytes > self._max_batch_bytes:
                    break
                batch.append(head)
                batch_bytes += head.size_bytes
            self._pending.popleft()
            self._pending_bytes -= head.size_bytes
        if not self._closing and not self._pending:
            self._arrived.clear()
        if not self._draining and not self._batch_is_full():
            self._full.clear()
        return batch

    def _batch_is_full(self) -> bool:
        return len(self._pending) >= MAX_BATCH or self._pending_bytes >= self._max_batch_bytes

    async def _send(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            entries = [dict(p.entry, Id=str(i)) for i, p in enumerate(batch)]
            RECEIVER_BATCH_SIZE.observe(len(entries))
            try:
                async with asyncio.timeout(self._timeout_s):
                    results = await send_entries(self._sqs, self._queue_url, entries)
            except TimeoutError:
                SQS_CALLS.labels("SendMessageBatch", "error").inc()
                reason = f"SendMessageBatch timed out after {self._timeout_s:g}s"
                results = [
                    EntryResult(e["Id"], False, reason, retryable=True, maybe_stored=True) for e in entries
                ]
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
            log.debug(
                "sqs_batch_sent",
                entries=len(entries),
                failed=sum(not r.ok for r in results),
                duration_ms=round((loop.time() - started) * 1000, 1),
            )
        except asyncio.CancelledError:
            _resolve_unanswered(batch, "the send was cancelled at shutdown")
            raise
        except Exception:
            # A bug, not an SQS failure (send_entries maps those): make it loud, answer 503, go on.
            log.exception("sqs_batch_send_crashed", entries=len(batch))
            _resolve_unanswered(batch, "the send failed unexpectedly")
        finally:
            self._slots.release()

    def _fail_pending(self, reason: str) -> None:
        while self._pending:
            pending = self._pending.popleft()
            if not pending.future.done():
                pending.future.set_result(EntryResult("-", False, reason, retryable=True))
        self._pending_bytes = 0


def _resolve_unanswered(batch: list[_Pending], reason: str) -> None:
    """Nobody may wait forever: every entry not yet answered fails as retryable (503); its send was
    under way, so SQS may have stored it."""
    for pending in batch:
        if not pending.future.done():
            pending.future.set_result(EntryResult("-", False, reason, retryable=True, maybe_stored=True))


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sqs_batcher_crashed", exc_info=task.exception())
