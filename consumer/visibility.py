"""Message visibility: keep a long batch invisible while it runs, and back off a batch to retry.

A message comes back when its visibility timeout ends. A batch still being applied must not come
back (another poller would apply it again, out of order), so ``keep_visible`` renews the timeout at
half-time, and soon again after a renewal that failed. A batch that failed for a transient reason
is made visible again after an exponential backoff on its receive count, so an outage neither spins
nor burns through ``maxReceiveCount``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from consumer import sqs as sqs_calls
from consumer.sqs import Message

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()


def retry_delay_s(receive_count: int, *, base_s: int, max_s: int) -> int:
    """base * 2**(receives - 1), capped: 5, 10, 20, 40, ... seconds with the defaults."""
    exponent = min(max(receive_count, 1) - 1, 30)
    return int(min(max_s, base_s * 2**exponent))


# After a failed renewal, the next try comes this soon (at most half the period): waiting a whole
# period would let the timeout run out, and the batch reappear to another poller, before it.
RETRY_RENEWAL_S = 2.0

StopWait = Callable[[asyncio.Event, float], Awaitable[bool]]


async def stopped_within(stop: asyncio.Event, delay_s: float) -> bool:
    """Wait up to ``delay_s``; True as soon as ``stop`` is set."""
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except TimeoutError:
        return False
    return True


async def keep_visible(
    sqs: SQSClient,
    queue_url: str,
    messages: Sequence[Message],
    *,
    visibility_timeout_s: int,
    stop: asyncio.Event,
    wait: StopWait = stopped_within,
) -> None:
    """Renew the messages' visibility every half timeout until ``stop`` is set (run as a named task);
    a failed renewal is tried again after ``RETRY_RENEWAL_S``. A renewal under way when ``stop`` is set
    is finished first, so a release for retry that follows is the last word on the messages.
    ``messages`` is read each round: the caller may remove those it has acknowledged meanwhile."""
    every_s = max(visibility_timeout_s / 2, 0.5)
    delay_s = every_s
    while not await wait(stop, delay_s):
        delay_s = every_s
        timeouts = [(m, visibility_timeout_s) for m in messages]
        if not timeouts:
            continue
        try:
            failed = await sqs_calls.change_visibility_batch(sqs, queue_url, timeouts)
        except Exception as exc:  # the batch may still finish in time; try again soon
            delay_s = min(RETRY_RENEWAL_S, every_s / 2)
            log.warning("visibility_extend_failed", error=f"{type(exc).__name__}: {exc}", retry_in_s=delay_s)
            continue
        if failed:  # SQS refused some entries (an internal error, a receipt handle no longer valid)
            delay_s = min(RETRY_RENEWAL_S, every_s / 2)
            log.warning("visibility_extend_failed", messages=len(timeouts), failed=failed, retry_in_s=delay_s)
            continue
        log.info("visibility_extended", messages=len(timeouts), timeout_s=visibility_timeout_s)


async def release_for_retry(
    sqs: SQSClient, queue_url: str, messages: Sequence[Message], *, base_s: int, max_s: int
) -> None:
    """Make the messages visible again after their backoff. Best effort: if this call fails too, they
    come back after the visibility timeout they were received with."""
    timeouts = [(m, retry_delay_s(sqs_calls.receive_count(m), base_s=base_s, max_s=max_s)) for m in messages]
    try:
        failed = await sqs_calls.change_visibility_batch(sqs, queue_url, timeouts)
    except Exception as exc:
        log.warning("retry_backoff_failed", error=f"{type(exc).__name__}: {exc}")
        return
    if failed:
        log.warning("retry_backoff_failed", failed=failed)
