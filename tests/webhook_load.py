"""A load generator that delivers webhooks the way Jira does: signed (``X-Hub-Signature``), with a
stable ``X-Atlassian-Webhook-Identifier`` per delivery, several at once, and at least once: a delivery
is retried with backoff (and ``X-Atlassian-Webhook-Retry``) until it gets a 2xx, on any 5xx, on a
refused or reset connection and on a timeout. Any other 4xx is final and recorded as refused.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from receiver.signature import sign
from tests.fault_stream import Delivery

FIRST_RETRY_S = 0.2
MAX_RETRY_S = 2.0


@dataclass
class LoadStats:
    sent: int = 0  # deliveries in the send order (redeliveries included)
    done: int = 0  # of those, answered 2xx
    requests: int = 0  # HTTP attempts
    retries: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # "202", "503", "connection error", ...
    refused: list[tuple[str, int, str]] = field(default_factory=list)  # delivery id, status, body
    # Set whenever ``done`` grows, for whoever waits on progress.
    progressed: asyncio.Event = field(default_factory=asyncio.Event)

    def finished_one(self) -> None:
        self.done += 1
        self.progressed.set()


async def deliver(
    url: str,
    secret: str,
    order: Sequence[Delivery],
    *,
    concurrency: int,
    stats: LoadStats,
    request_timeout_s: float = 15.0,
    seed: int = 0,
    gate: asyncio.Event | None = None,
) -> None:
    """Send every delivery of ``order`` (roughly in that order, ``concurrency`` at a time) until each
    got a 2xx or a final 4xx. With a ``gate``, a new delivery starts only while it is set."""
    rng = random.Random(seed)
    todo: asyncio.Queue[Delivery] = asyncio.Queue()
    for d in order:
        todo.put_nowait(d)
    stats.sent = len(order)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

        async def worker() -> None:
            while not todo.empty():
                if gate is not None:
                    await gate.wait()
                if todo.empty():
                    return
                await _deliver_one(http, url, secret, todo.get_nowait(), stats, rng)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _deliver_one(
    http: aiohttp.ClientSession, url: str, secret: str, d: Delivery, stats: LoadStats, rng: random.Random
) -> None:
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature": sign(secret, d.body),
        "X-Atlassian-Webhook-Identifier": d.delivery_id,
    }
    attempt = 0
    while True:
        if attempt:
            headers["X-Atlassian-Webhook-Retry"] = str(attempt)
            stats.retries += 1
            delay_s = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (attempt - 1))
            await asyncio.sleep(delay_s * rng.uniform(0.5, 1.0))
        attempt += 1
        stats.requests += 1
        try:
            async with http.post(url, data=d.body, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            stats.answers[f"connection error ({type(exc).__name__})"] += 1
            continue
        stats.answers[str(status)] += 1
        if 200 <= status < 300:
            stats.finished_one()
            return
        if status < 500:
            stats.refused.append((d.delivery_id, status, text[:300]))
            stats.finished_one()
            return
