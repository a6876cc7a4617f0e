"""Pollers: receive a batch, apply it in one transaction, then acknowledge it; their shutdown; readiness.
consumer/service.py runs them with the pool, the admin port and the gauges.

Each poller loops: check Postgres (a pooled connection and its schema's version; while Postgres is down it
does not receive, so an outage does not burn receive counts into the DLQ) -> ``ReceiveMessage`` (long
polling, up to 10) -> apply (consumer/apply.py) while ``visibility-extender`` keeps the batch hidden
-> after the commit, dead-letter the invalid messages (send, then delete) and delete the rest in one
``DeleteMessageBatch``, shielded so shutdown cannot split them. A transient failure that leaves the
connection usable (a lock wait past the statement timeout, a deadlock) may concern one issue only, so a
batch of several FIFO groups then applies each group once on its own and acknowledges those that
commit; what still fails is retried in place for a while (it stays received and hidden). Otherwise, or
after that, the rest is released with backoff. Anything unexpected stops the consumer and is raised
(consumer/outcomes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from consumer import apply, visibility
from consumer import sqs as sqs_calls
from consumer.breaker import CircuitBreaker
from consumer.deadletter import Rejected, dead_letter
from consumer.outcomes import Outcome, ServerReadOnly, classify, describe
from consumer.settings import MAX_RECEIVE_MESSAGES, ConsumerSettings
from consumer.sqs import Message
from shared import migrate
from shared.envelope import Envelope, InvalidEnvelope
from shared.metrics import CONSUMER_BATCH_SECONDS, CONSUMER_EVENTS, SQS_CALLS, sqs_label_sets, start_at_zero
from shared.sqs_requests import counted

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()

APPLICATION_NAME = "jiralake-consumer"
DEAD_LETTERED = "dead_lettered"
RETRIED = "retried"
# Every outcome jiralake_consumer_events_total counts.
EVENT_OUTCOMES = (
    apply.APPLIED,
    apply.SKIPPED_STALE,
    apply.DUPLICATE,
    apply.HISTORY_ONLY,
    DEAD_LETTERED,
    RETRIED,
)
# After an empty short poll (wait_time_s 0), pause this long before the next one.
_EMPTY_POLL_PAUSE_S = 0.2
_FIRST_BACKOFF_S = 0.5
# After the pollers stopped (shutdown_grace_s): how long PostgreSQL may take to confirm cancelled
# statements, and to answer the pool's goodbyes (consumer/service.py), before each is cut short.
POOL_CLOSE_S = 5.0
LOG_CONNECTIONS_TERMINATED = "database_connections_terminated"
LOG_QUEUE_IDLE = "consumer_queue_idle"
LOG_ACK_CANCELLED = "acknowledgement_cancelled"
LOG_ACK_FAILED = "acknowledgement_failed"
# What _finish gets for acknowledgements that follow no apply (rejections alone, or nothing left).
_NOTHING_APPLIED = apply.ApplyResult(results=[], duration_s=0.0)


@dataclass
class ConsumerStats:
    """What one run handled, per outcome (a message can count as retried more than once)."""

    received: int = 0
    batches: int = 0
    applied: int = 0
    skipped_stale: int = 0
    duplicate: int = 0
    history_only: int = 0
    dead_lettered: int = 0
    retried: int = 0
    # True when the run ended because the queue stayed empty (exit_when_idle_s), not on a stop.
    went_idle: bool = False

    def count(self, outcome: str, n: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + n)
        CONSUMER_EVENTS.labels(outcome).inc(n)


@dataclass
class _Activity:
    """For exit_when_idle_s: when pollers last had work, and when they last found none."""

    in_flight: int = 0
    last_busy: float = field(default_factory=time.monotonic)
    last_empty: float | None = None


class Consumer:
    def __init__(self, settings: ConsumerSettings, pool: asyncpg.Pool, sqs: SQSClient) -> None:
        self.settings = settings
        self.pool = pool
        self.sqs = sqs
        self.stats = ConsumerStats()
        self.breaker = CircuitBreaker(
            window=settings.breaker_window_events,
            min_events=settings.breaker_min_events,
            max_ratio=settings.breaker_max_dead_letter_ratio,
            cooldown_s=settings.breaker_cooldown_s,
        )
        self.activity = _Activity()
        self._acks: set[asyncio.Task[None]] = set()
        start_at_zero(CONSUMER_EVENTS, [(outcome,) for outcome in EVENT_OUTCOMES])
        start_at_zero(
            SQS_CALLS,
            sqs_label_sets(
                "ReceiveMessage",
                "DeleteMessageBatch",
                "ChangeMessageVisibilityBatch",
                "SendMessageBatch",
                "GetQueueAttributes",
            ),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Run the pollers until ``stop`` is set (or, with ``exit_when_idle_s``, until receives have found
        the queue empty that long; messages waiting out a retry backoff are invisible, so they do not
        count).

        Then pollers stop receiving and finish their batch, for up to ``shutdown_grace_s``; any still
        running are cancelled and named in the log. A poller that crashed is re-raised here."""
        halt = asyncio.Event()
        pollers = [
            asyncio.create_task(self._poll(halt), name=f"consumer-poller-{i}")
            for i in range(self.settings.pollers)
        ]
        watchers: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait(), name="consumer-stop-watcher")]
        idle_s = self.settings.exit_when_idle_s
        idle = None
        if idle_s is not None:
            idle = asyncio.create_task(self._wait_idle(idle_s), name="consumer-idle-watcher")
            watchers.append(idle)
        try:
            await asyncio.wait([*pollers, *watchers], return_when=asyncio.FIRST_COMPLETED)
            self.stats.went_idle = idle is not None and idle.done() and not stop.is_set()
            if self.stats.went_idle:
                log.info(LOG_QUEUE_IDLE, idle_s=idle_s)
        finally:
            halt.set()
            for watcher in watchers:
                watcher.cancel()
            _, pending = await asyncio.wait(pollers, timeout=self.settings.shutdown_grace_s)
            for task in pending:
                log.warning("poller_cancelled", task=task.get_name(), grace_s=self.settings.shutdown_grace_s)
                task.cancel()
            acks = list(self._acks)  # only a cancelled poller's can still run: a poller waits for its own
            if pending:
                # A query cancelled on a server that does not answer holds its poller while asyncpg
                # waits, up to the statement timeout, for the server to confirm the cancellation. An
                # acknowledgement waiting on an SQS that does not answer would wait out botocore's
                # timeouts and retries (minutes).
                _, stuck = await asyncio.wait([*pending, *acks], timeout=POOL_CLOSE_S)
                if stuck & pending:
                    log.warning(LOG_CONNECTIONS_TERMINATED, after_s=POOL_CLOSE_S)
                    self.pool.terminate()
                for task in stuck - pending:
                    # Its messages stay on the queue and come back after their visibility timeout: a
                    # duplicate then, or (its dead-letter copy sent, the delete not) dead-lettered twice.
                    log.warning(LOG_ACK_CANCELLED, task=task.get_name(), after_s=POOL_CLOSE_S)
                    task.cancel()
            await asyncio.gather(*pending, *watchers, *acks, return_exceptions=True)
            if pending:
                _read_release_errors()
            for task in acks:  # their pollers, which would have handled the errors, are gone
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    log.warning(
                        LOG_ACK_FAILED, task=task.get_name(), error=f"{type(error).__name__}: {error}"
                    )
        # Every poller's error is read (and logged), not just the first: one never read would end the
        # process with asyncio's "Task exception was never retrieved" and its traceback.
        errors: list[BaseException] = []
        for task in pollers:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                log.error("consumer_crashed", task=task.get_name(), error=f"{type(error).__name__}: {error}")
                errors.append(error)
        if errors:
            raise errors[0]

    async def readiness(self) -> str | None:
        try:
            async with self.pool.acquire(timeout=5) as conn:
                await check_database(conn, timeout_s=5)
        except Exception as exc:
            return f"postgres: {type(exc).__name__}: {exc}"
        try:
            await counted(
                "GetQueueAttributes",
                self.sqs.get_queue_attributes(
                    QueueUrl=self.settings.queue.queue_url, AttributeNames=["QueueArn"]
                ),
                timeout_s=5,
            )
        except Exception as exc:
            return f"sqs: {type(exc).__name__}: {exc}"
        return None

    # -- one poller --

    async def _poll(self, halt: asyncio.Event) -> None:
        first_backoff_s = min(_FIRST_BACKOFF_S, self.settings.unavailable_backoff_max_s)
        backoff_s = first_backoff_s
        while not halt.is_set():
            pause_s = self.breaker.remaining_s()
            if pause_s > 0:
                await _wait(halt, pause_s)
                continue
            try:
                async with self.pool.acquire() as conn:
                    # Before any receive: a crash on a missing table at the first message would count a
                    # receive at each restart, and SQS would move the message to the DLQ after
                    # maxReceiveCount of them; so would a batch retried against a read-only server.
                    await check_database(conn)
                    if halt.is_set():
                        return
                    messages = await self._receive()
                    if messages:
                        await self._handle(conn, messages, halt)
                backoff_s = first_backoff_s
            except Exception as exc:
                if classify(exc) is not Outcome.RETRY:
                    raise
                self.activity.last_busy = time.monotonic()
                error_class, message = describe(exc)
                log.warning(
                    "dependency_unavailable", error_class=error_class, error=message, retry_in_s=backoff_s
                )
                await _wait(halt, backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.unavailable_backoff_max_s)
                continue
            if not messages and self.settings.wait_time_s == 0:
                await _wait(halt, _EMPTY_POLL_PAUSE_S)

    async def _receive(self) -> list[Message]:
        """One long poll. Never abandoned, even when stopping: SQS would still pick messages for an
        abandoned poll and hide them for a visibility timeout. A stop waits at most ``wait_time_s``."""
        messages = await sqs_calls.receive(
            self.sqs,
            self.settings.queue.queue_url,
            max_messages=MAX_RECEIVE_MESSAGES,
            wait_time_s=self.settings.wait_time_s,
            visibility_timeout_s=self.settings.visibility_timeout_s,
        )
        now = time.monotonic()
        if messages:
            self.activity.last_busy = now
        else:
            self.activity.last_empty = now
        return messages

    async def _handle(self, conn: asyncpg.Connection, messages: list[Message], halt: asyncio.Event) -> None:
        self.stats.batches += 1
        task = asyncio.current_task()
        with structlog.contextvars.bound_contextvars(
            poller=task.get_name() if task else None, batch=self.stats.batches
        ):
            await self._handle_batch(conn, messages, halt)

    async def _handle_batch(
        self, conn: asyncpg.Connection, messages: list[Message], halt: asyncio.Event
    ) -> None:
        started = time.perf_counter()
        self.activity.in_flight += 1
        self.stats.received += len(messages)
        # Not yet acknowledged: kept invisible while the batch runs, released if it must be retried.
        # Groups applied apart are acknowledged early and leave it (the extender reads it each round).
        outstanding = list(messages)
        extending = asyncio.Event()  # set: renew no more
        extender = asyncio.create_task(
            visibility.keep_visible(
                self.sqs,
                self.settings.queue.queue_url,
                outstanding,
                visibility_timeout_s=self.settings.visibility_timeout_s,
                stop=extending,
            ),
            name="visibility-extender",
        )
        releasing = False
        try:
            parsed: list[tuple[Message, Envelope]] = []
            rejected: list[Rejected] = []
            for message in messages:
                try:
                    parsed.append((message, Envelope.from_message(message)))
                except InvalidEnvelope as exc:
                    rejected.append(Rejected(message, *describe(exc)))
            try:
                parsed, rejected, result = await self._apply_batch(conn, parsed, rejected, outstanding, halt)
            except Exception as exc:
                if classify(exc) is Outcome.RETRY:
                    # The extender first ends a renewal under way: landing after the release, it would
                    # undo the backoff (hidden for a whole timeout again, or visible too early).
                    extending.set()
                    releasing = True
                    await self._shielded(self._release(outstanding, exc, after=extender))
                raise
            await self._finish(parsed, result, rejected, outstanding)
        finally:
            extending.set()
            if not releasing:  # else the release owns the extender, a stop included: it waits for it
                extender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await extender
            self.activity.in_flight -= 1
            self.activity.last_busy = time.monotonic()
            CONSUMER_BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _apply_batch(
        self,
        conn: asyncpg.Connection,
        parsed: list[tuple[Message, Envelope]],
        rejected: list[Rejected],
        outstanding: list[Message],
        halt: asyncio.Event,
    ) -> tuple[list[tuple[Message, Envelope]], list[Rejected], apply.ApplyResult]:
        """The batch in one transaction, retried in place (:meth:`_apply`). When that fails transiently
        and the batch holds several FIFO groups, each group is first applied once on its own
        (:meth:`_apply_groups_apart`, which acknowledges what commits), and only the groups that failed
        again are retried. Returns what is left to acknowledge: messages, their result, rejections."""
        groups = _by_group(parsed)
        if len(groups) < 2:
            return parsed, rejected, await self._apply(conn, _envelopes(parsed), halt)
        try:
            return parsed, rejected, await apply.apply_envelopes(conn, _envelopes(parsed))
        except Exception as exc:
            if not _connection_survives(exc, conn) or halt.is_set():
                raise
            failed = exc
        await self._finish([], _NOTHING_APPLIED, rejected, outstanding)
        again = await self._apply_groups_apart(conn, groups, failed, outstanding, halt)
        if not again:
            return [], [], _NOTHING_APPLIED
        return again, [], await self._apply(conn, _envelopes(again), halt, failed=failed)

    async def _apply_groups_apart(
        self,
        conn: asyncpg.Connection,
        groups: list[list[tuple[Message, Envelope]]],
        failed: BaseException,
        outstanding: list[Message],
        halt: asyncio.Event,
    ) -> list[tuple[Message, Envelope]]:
        """After the whole batch failed transiently (``failed``), apply each FIFO group once on its own
        and acknowledge it when it commits, so a lock on one issue holds back that issue only. Returns
        the messages of the groups that failed again (transiently), in batch order."""
        error_class, message = describe(failed)
        log.warning("batch_split_by_group", groups=len(groups), error_class=error_class, error=message)
        again: list[tuple[Message, Envelope]] = []
        for group in groups:
            if halt.is_set():  # stopping: the rest is released, not tried
                again += group
                continue
            try:
                result = await apply.apply_envelopes(conn, _envelopes(group))
            except Exception as exc:
                if not _connection_survives(exc, conn):
                    raise
                again += group
                continue
            await self._finish(group, result, [], outstanding)
        return again

    async def _finish(
        self,
        parsed: list[tuple[Message, Envelope]],
        result: apply.ApplyResult,
        rejected: list[Rejected],
        outstanding: list[Message],
    ) -> None:
        """Log and count what was applied (``result`` holds one outcome per ``parsed``), then
        acknowledge it: dead-letter the invalid messages and ``rejected``, delete the rest."""
        rejected = list(rejected)
        done: list[Message] = []
        for (message, envelope), outcome in zip(parsed, result.results, strict=True):
            if outcome.outcome == apply.INVALID:
                rejected.append(Rejected(message, outcome.error_class or "", outcome.error_message or ""))
                continue
            done.append(message)
            self.stats.count(outcome.outcome)
            log.info(
                "message_handled",
                issue_id=envelope.issue_id,
                event_type=envelope.event_type,
                delivery_id=envelope.delivery_id,
                outcome=outcome.outcome,
                duration_ms=round(result.duration_s * 1000, 1),
            )
        if done or rejected:
            await self._shielded(self._acknowledge(done, rejected))
        acknowledged = {id(m) for m in done} | {id(r.message) for r in rejected}
        outstanding[:] = [m for m in outstanding if id(m) not in acknowledged]

    async def _apply(
        self,
        conn: asyncpg.Connection,
        envelopes: list[Envelope],
        halt: asyncio.Event,
        *,
        failed: BaseException | None = None,
    ) -> apply.ApplyResult:
        """``apply_envelopes``, retried in place while a transient failure leaves the connection usable
        (a lock held past the statement timeout, a deadlock, disk full): Postgres answers the check
        before each receive then, so releasing the batch would only spend its receive counts toward the
        DLQ. The batch stays received and hidden (the visibility extender runs) for up to
        ``retry_in_place_s``; after that, on a stop, or on any other failure, this raises and the caller
        releases or crashes. ``failed``: the failure of an attempt already made, which counts as the
        first."""
        give_up_at = time.monotonic() + self.settings.retry_in_place_s
        delay_s = min(_FIRST_BACKOFF_S, self.settings.unavailable_backoff_max_s)
        while True:
            if failed is None:
                try:
                    return await apply.apply_envelopes(conn, envelopes)
                except Exception as exc:
                    failed = exc
            out_of_time = time.monotonic() + delay_s > give_up_at
            if out_of_time or halt.is_set() or not _connection_survives(failed, conn):
                raise failed
            error_class, message = describe(failed)
            log.warning(
                "batch_retrying_in_place",
                messages=len(envelopes),
                error_class=error_class,
                error=message,
                retry_in_s=delay_s,
            )
            await _wait(halt, delay_s)
            if halt.is_set():
                raise failed
            delay_s = min(delay_s * 2, self.settings.unavailable_backoff_max_s)
            failed = None

    async def _acknowledge(self, done: list[Message], rejected: list[Rejected]) -> None:
        """After the commit: dead-letter (send, then delete) the invalid messages, delete the others."""
        stored = await dead_letter(self.sqs, self.settings.queue.dlq_url, rejected)
        stored_ids = {id(m) for m in stored}
        for r in rejected:
            if id(r.message) in stored_ids:
                self.stats.count(DEAD_LETTERED)
                log.warning(
                    "message_dead_lettered",
                    message_id=r.message.get("MessageId"),
                    group_id=sqs_calls.group_id(r.message),
                    error_class=r.error_class,
                    error_message=r.error_message,
                )
        failed = await sqs_calls.delete_batch(self.sqs, self.settings.queue.queue_url, [*done, *stored])
        if failed:
            # They come back after their visibility timeout and then change nothing (duplicates).
            log.warning("delete_failed", failed=failed)
        self.breaker.record([False] * len(done) + [True] * len(stored))

    async def _release(
        self, messages: Sequence[Message], exc: BaseException, *, after: asyncio.Task[None]
    ) -> None:
        await asyncio.wait({after})  # ended, however: it logs its own failures
        error_class, message = describe(exc)
        self.stats.count(RETRIED, len(messages))
        log.warning("batch_retried", messages=len(messages), error_class=error_class, error=message)
        await visibility.release_for_retry(
            self.sqs,
            self.settings.queue.queue_url,
            messages,
            base_s=self.settings.retry_base_s,
            max_s=self.settings.retry_max_s,
        )

    async def _shielded(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a send-then-delete step to completion even if the poller is cancelled meanwhile; run()
        waits for it before returning."""
        task = asyncio.create_task(work, name="consumer-acknowledge")
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)
        await asyncio.shield(task)

    async def _wait_idle(self, idle_s: float) -> None:
        while True:
            a = self.activity
            if a.in_flight == 0 and a.last_empty is not None and a.last_empty - a.last_busy >= idle_s:
                return
            await asyncio.sleep(0.05)


def _envelopes(parsed: list[tuple[Message, Envelope]]) -> list[Envelope]:
    return [envelope for _, envelope in parsed]


def _by_group(parsed: list[tuple[Message, Envelope]]) -> list[list[tuple[Message, Envelope]]]:
    """The batch's messages by FIFO group (the issue), each group in queue order."""
    groups: dict[str, list[tuple[Message, Envelope]]] = {}
    for item in parsed:
        groups.setdefault(sqs_calls.group_id(item[0]), []).append(item)
    return list(groups.values())


async def check_database(conn: asyncpg.Connection, *, timeout_s: float | None = None) -> None:
    """The check before each receive (and /readyz), one round trip: the schema is this version's (else
    CommandError: a crash, exit 1) and the server takes writes (else :class:`ServerReadOnly`, a retry)."""
    if await migrate.check_schema(conn, timeout_s=timeout_s):
        raise ServerReadOnly("PostgreSQL is read-only (a standby, or a failover in progress); not receiving")


def _connection_survives(exc: BaseException, conn: asyncpg.Connection) -> bool:
    """A transient failure of the statement, not of the connection: Postgres refused or timed out
    this write (classes 40, 53, 55P03, 57014, or the client-side statement timeout) and the
    connection is still open. Not a read-only server: trying again on the same connection cannot
    succeed, so the batch is released and the next receive waits for a writable server."""
    transient = classify(exc) is Outcome.RETRY
    statement_level = isinstance(exc, asyncpg.PostgresError | TimeoutError)
    read_only = isinstance(exc, asyncpg.ReadOnlySQLTransactionError)
    return transient and statement_level and not read_only and not conn.is_closed()


async def _wait(halt: asyncio.Event, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(halt.wait(), timeout=delay_s)


# asyncpg's coroutine returning a connection to its pool (Pool.release runs it under asyncio.shield).
_POOL_RELEASE = "PoolConnectionHolder.release"


def _read_release_errors() -> None:
    """Have the errors of the connection returns cancelled pollers left behind read when they end.

    asyncpg returns a connection to its pool in a task of its own, under ``asyncio.shield``, which
    goes on after the poller that held the connection is cancelled, and nothing awaits it. On a
    server that does not answer it fails once the pool is terminated (ConnectionDoesNotExistError),
    and an error never read is logged by asyncio at ERROR with a traceback ("Task exception was
    never retrieved"): for connections closed on purpose, logged as ``database_connections_terminated``."""
    for task in asyncio.all_tasks():
        if getattr(task.get_coro(), "__qualname__", "") == _POOL_RELEASE:
            task.add_done_callback(_read_error)  # at once when it is done already


def _read_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
