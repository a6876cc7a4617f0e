"""``/readyz`` for the receiver: the queue answers ``GetQueueAttributes`` and the batcher runs.

The SQS answer is reused for ``cache_s`` so frequent probes (load balancer, Kubernetes, Prometheus)
cost at most one call per period, and concurrent probes share one call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from shared.aws import error_code
from shared.sqs_requests import SQS_ERRORS, counted

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()


class QueueReadiness:
    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        *,
        cache_s: float,
        timeout_s: float,
        problems: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._cache_s = cache_s
        self._timeout_s = timeout_s
        self._problems = problems
        self._clock = clock
        self._checked_at: float | None = None
        self._last: str | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> str | None:
        """None when ready, else a short reason."""
        local = self._problems()
        if local is not None:
            return local
        async with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self._cache_s:
                self._last = await self._ask_sqs()
                self._checked_at = self._clock()
            return self._last

    async def _ask_sqs(self) -> str | None:
        try:
            await counted(
                "GetQueueAttributes",
                self._sqs.get_queue_attributes(QueueUrl=self._queue_url, AttributeNames=["QueueArn"]),
                timeout_s=self._timeout_s,
            )
        except TimeoutError:
            return f"SQS did not answer within {self._timeout_s:g}s"
        except SQS_ERRORS as exc:
            log.warning("readiness_sqs_failed", error=f"{type(exc).__name__}: {exc}")
            # The main port is public: name the failure, keep the details in the log.
            return f"SQS queue not reachable ({error_code(exc) or type(exc).__name__})"
        return None
