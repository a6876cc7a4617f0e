"""The traffic of bench/soak_services.py: paced, signed webhook requests of every kind a receiver
meets, good and bad (``KINDS``), built from the real fixtures in tests/fixtures/jira-webhooks with
random issue ids, unique delivery ids and rising timestamps.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import REPO
from bench.events import body_for, templates
from receiver.signature import SIGNATURE_HEADER, sign

SECRET = "soak-secret"  # JIRALAKE_WEBHOOK_SECRET of the soaked receiver
DELIVERY_HEADER = "X-Atlassian-Webhook-Identifier"
RETRY_HEADER = "X-Atlassian-Webhook-Retry"
MAX_BODY_BYTES = 1_048_576  # the receiver's default JIRALAKE_MAX_BODY_BYTES
BODY_TIMEOUT_S = 2.0  # the receiver's JIRALAKE_RECEIVER_BODY_TIMEOUT_S here (default 30), for slow_body
FIRST_ISSUE_ID = 8_000_000
FIRST_TS_MS = 1_750_000_000_000

# What each request kind is, its share of the traffic (%), and the answers that are right for it.
KINDS: dict[str, tuple[float, frozenset[str]]] = {
    "event": (80.5, frozenset({"202"})),
    # A valid event on a connection the client closes after the answer (connection churn).
    "connection_close": (4.0, frozenset({"202"})),
    # A valid event whose sender stops waiting 1 ms after sending it: the answer has no one to go to.
    "abandoned": (1.5, frozenset({"202", "timeout"})),
    # Half a body, then a pause longer than the receiver's body timeout: 408.
    "slow_body": (0.5, frozenset({"408", "connection error"})),
    "redelivery": (2.0, frozenset({"202"})),
    "dead_letter": (1.0, frozenset({"202"})),
    "ignored": (3.0, frozenset({"202"})),
    "bad_signature": (2.0, frozenset({"401"})),
    "wrong_content_type": (1.5, frozenset({"415"})),
    "oversized": (0.5, frozenset({"413", "connection error"})),
    "malformed": (2.0, frozenset({"400"})),
    "not_found": (1.5, frozenset({"404", "405"})),
}


@dataclass
class LoadStats:
    sent: int = 0
    answers: dict[str, Counter[str]] = field(default_factory=dict)
    wrong: Counter[str] = field(default_factory=Counter)  # kind -> answers not in its expected set
    paused_s: float = 0.0

    def record(self, kind: str, answer: str) -> None:
        self.answers.setdefault(kind, Counter())[answer] += 1
        if answer not in KINDS[kind][1] and answer != "503":
            self.wrong[f"{kind}:{answer}"] += 1


class Load:
    """Paced webhook traffic at ``rate`` requests/s, ``concurrency`` at a time, paused while the
    queue is deep (``gate`` cleared)."""

    def __init__(self, url: str, rate: float, concurrency: int, issues: int, seed: int) -> None:
        self.url = url
        self.base = url.rsplit("/webhooks/jira", 1)[0]
        self.rate = rate
        self.issues = issues
        self.rng = random.Random(seed)
        self.stats = LoadStats()
        self.gate = asyncio.Event()
        self.gate.set()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._templates = templates("all")
        self._full = templates("full_issue")
        self._ignored = [json.loads(p.read_bytes()) for p in _ignored_fixtures()]
        self._recent: deque[tuple[bytes, str]] = deque(maxlen=500)
        self._ts_ms = FIRST_TS_MS
        self._kinds = list(KINDS)
        self._weights = [share for share, _ in KINDS.values()]
        self._oversized = b'{"webhookEvent": "jira:issue_updated", "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'

    async def run(self, http: aiohttp.ClientSession, until: float) -> None:
        loop = asyncio.get_running_loop()
        interval_s = 1 / self.rate
        next_at = loop.time()
        while loop.time() < until:
            if not self.gate.is_set():
                paused = loop.time()
                await self.gate.wait()
                self.stats.paused_s += loop.time() - paused
                next_at = loop.time()
            await self._slots.acquire()
            kind = self.rng.choices(self._kinds, self._weights)[0]
            task = asyncio.create_task(self._send(http, kind), name=f"soak-{kind}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.stats.sent += 1
            next_at += interval_s
            delay_s = next_at - loop.time()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            elif delay_s < -1:
                next_at = loop.time()  # fell behind: go on at the rate, never in a burst
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def _send(self, http: aiohttp.ClientSession, kind: str) -> None:
        try:
            method, url, body, headers = self._request(kind)
            timeout = aiohttp.ClientTimeout(total=None, sock_read=0.001) if kind == "abandoned" else None
            try:
                async with http.request(method, url, data=body, headers=headers, timeout=timeout) as resp:
                    await resp.read()
                    answer = str(resp.status)
            except TimeoutError:  # aiohttp's read timeouts are TimeoutErrors too
                answer = "timeout"
            except (aiohttp.ClientError, ConnectionError):
                answer = "connection error"
            self.stats.record(kind, answer)
        finally:
            self._slots.release()

    def _next_ts(self) -> int:
        self._ts_ms += 1
        return self._ts_ms

    def _issue_id(self) -> int:
        return FIRST_ISSUE_ID + self.rng.randrange(self.issues)

    def _signed(self, body: bytes, delivery_id: str | None = None) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(SECRET, body),
            DELIVERY_HEADER: delivery_id or f"soak-{uuid.uuid4().hex}",
        }

    def _event(self, template_set: Sequence[Any]) -> dict[str, Any]:
        template = self.rng.choice(template_set)
        return body_for(template, issue_id=self._issue_id(), ts_ms=self._next_ts())

    def _request(self, kind: str) -> tuple[str, str, Any, dict[str, str]]:
        if kind == "redelivery" and self._recent:
            body, delivery_id = self.rng.choice(self._recent)
            return "POST", self.url, body, self._signed(body, delivery_id) | {RETRY_HEADER: "1"}
        if kind in ("event", "redelivery", "connection_close", "abandoned"):
            body = _dumps(self._event(self._templates))
            headers = self._signed(body)
            self._recent.append((body, headers[DELIVERY_HEADER]))
            if kind == "connection_close":
                headers["Connection"] = "close"
            return "POST", self.url, body, headers
        if kind == "slow_body":
            body = _dumps(self._event(self._templates))
            return "POST", self.url, _slowly(body, BODY_TIMEOUT_S + 1), self._signed(body)
        if kind == "dead_letter":
            payload = self._event(self._full)
            payload["issue"]["fields"]["summary"] = f"soak\u0000bad {uuid.uuid4().hex[:8]}"
            body = _dumps(payload)
            return "POST", self.url, body, self._signed(body)
        if kind == "ignored":
            payload = dict(self.rng.choice(self._ignored), timestamp=self._next_ts())
            if self.rng.random() < 0.5:  # an event name never seen before
                payload["webhookEvent"] = f"soak_custom_{uuid.uuid4().hex[:12]}"
            body = _dumps(payload)
            return "POST", self.url, body, self._signed(body)
        if kind == "bad_signature":
            body = _dumps(self._event(self._templates))
            return "POST", self.url, body, self._signed(body) | {SIGNATURE_HEADER: sign("wrong", body)}
        if kind == "wrong_content_type":
            body = _dumps(self._event(self._templates))
            ctype = self.rng.choice(["text/plain", "application/x-www-form-urlencoded", "text/xml"])
            return "POST", self.url, body, self._signed(body) | {"Content-Type": ctype}
        if kind == "oversized":
            headers = self._signed(self._oversized)
            if self.rng.random() < 0.5:  # chunked: no Content-Length, refused while reading
                return "POST", self.url, _chunks(self._oversized), headers
            return "POST", self.url, self._oversized, headers
        if kind == "malformed":
            good = _dumps(self._event(self._templates))
            body = self.rng.choice([good[: len(good) // 2], b"\xff\xfe" + good[2:], b"{not json}"])
            return "POST", self.url, body, self._signed(body)
        if kind == "not_found":
            path = self.rng.choice(["/webhooks/jira/", f"/soak/{uuid.uuid4().hex}", "/webhook"])
            if self.rng.random() < 0.3:
                return "GET", self.url, None, {}
            return "POST", self.base + path, b"{}", {"Content-Type": "application/json"}
        raise ValueError(kind)


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


async def _chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def _slowly(body: bytes, pause_s: float) -> AsyncIterator[bytes]:
    yield body[: len(body) // 2]
    await asyncio.sleep(pause_s)
    yield body[len(body) // 2 :]


def _ignored_fixtures() -> list[Path]:
    folder = REPO / "tests" / "fixtures" / "jira-webhooks"
    return sorted(folder.glob("pinpoint-jira__sprint_*.json")) + sorted(
        folder.glob("pinpoint-jira__board_*.json")
    )
