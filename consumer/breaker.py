"""Circuit breaker: stop receiving when most recent events are being dead-lettered.

A bad deploy (a parsing bug, a constraint every row breaks) makes every event look invalid; left
alone the consumer would move the whole queue into the DLQ. After ``min_events`` events, when the share
dead-lettered among the last ``window`` exceeds ``max_ratio``, the breaker opens: pollers stop
receiving for ``cooldown_s``, the gauge ``jiralake_consumer_circuit_open`` is 1 and an ERROR line says
why. Then it closes with an empty window and tries again (arroyo's ``DlqLimit``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

import structlog

from shared.metrics import CONSUMER_CIRCUIT_OPEN

log = structlog.get_logger()


class CircuitBreaker:
    def __init__(
        self,
        *,
        window: int,
        min_events: int,
        max_ratio: float,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._recent: deque[bool] = deque(maxlen=window)
        self._min_events = min_events
        self._max_ratio = max_ratio
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._open_until: float | None = None
        CONSUMER_CIRCUIT_OPEN.set(0)

    def record(self, dead_lettered: Iterable[bool]) -> None:
        """Record handled events in order (True = dead-lettered)."""
        self._recent.extend(dead_lettered)
        if self._open_until is not None or len(self._recent) < self._min_events:
            return
        dead = sum(self._recent)
        ratio = dead / len(self._recent)
        if ratio > self._max_ratio:
            self._open_until = self._clock() + self._cooldown_s
            CONSUMER_CIRCUIT_OPEN.set(1)
            log.error(
                "circuit_opened",
                dead_lettered=dead,
                events=len(self._recent),
                max_ratio=self._max_ratio,
                cooldown_s=self._cooldown_s,
                hint="most recent events were dead-lettered; receiving paused. Check the DLQ's error "
                "attributes (jiralake dlq list) and the last deploy.",
            )

    def remaining_s(self) -> float:
        """Seconds until receiving may resume; 0 when closed (closing it when the cooldown is over)."""
        if self._open_until is None:
            return 0.0
        left = self._open_until - self._clock()
        if left > 0:
            return left
        self._open_until = None
        self._recent.clear()
        CONSUMER_CIRCUIT_OPEN.set(0)
        log.warning("circuit_closed", hint="receiving again")
        return 0.0
