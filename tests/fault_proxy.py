"""An HTTP reverse proxy in front of moto's server that makes a share of SQS calls fail, the ways real
SQS and the network fail:

- ``error_before``: answered 500 ``InternalError`` or 503 ``ServiceUnavailable`` (SQS's JSON error
  shape, with the ``x-amzn-query-error`` header) without forwarding: SQS did nothing.
- ``error_after``: forwarded, SQS did the work, and the client still gets a 500/503. A sent message is
  stored, a received one is hidden for its visibility timeout, a deleted one is gone.
- ``reset_before`` / ``reset_after``: the connection is reset instead of answered, before or after
  forwarding.

Each fault is drawn independently for every request with probability ``failure_ratio`` (a seeded
``random.Random``, so a run's fault sequence depends only on its request sequence), and counted per
kind and per operation (the ``X-Amz-Target`` of SQS's JSON protocol). ``failure_ratio = 0`` passes
everything through.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Self

import aiohttp
from aiohttp import web

FAULT_KINDS = ("error_before", "error_after", "reset_before", "reset_after")
_ERRORS = ((500, "InternalError", "Receiver"), (503, "ServiceUnavailable", "Receiver"))
# Hop-by-hop and length headers: aiohttp sets its own.
_SKIP_REQUEST = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
_SKIP_RESPONSE = frozenset(
    {"content-length", "transfer-encoding", "connection", "content-encoding", "date", "server"}
)


class ConnectionResetByProxy(Exception):
    """Raised inside a handler after the proxy aborted the client's connection (nothing to answer)."""


@dataclass
class FaultCounts:
    requests: Counter[str] = field(default_factory=Counter)  # per operation
    faults: Counter[str] = field(default_factory=Counter)  # per fault kind
    faults_by_operation: Counter[str] = field(default_factory=Counter)

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())


class SqsFaultProxy:
    """``async with SqsFaultProxy(target_url, failure_ratio=0.1, seed=1) as proxy: proxy.url``."""

    def __init__(
        self, target_url: str, *, failure_ratio: float = 0.0, seed: int = 0, upstream_timeout_s: float = 60.0
    ) -> None:
        self.target_url = target_url.rstrip("/")
        self.failure_ratio = failure_ratio
        self.counts = FaultCounts()
        self._random = random.Random(seed)
        self._timeout = aiohttp.ClientTimeout(total=upstream_timeout_s)
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._http = aiohttp.ClientSession(timeout=self._timeout, auto_decompress=False)
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp exposes the bound port only here
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    def _draw(self) -> str | None:
        if self.failure_ratio <= 0 or self._random.random() >= self.failure_ratio:
            return None
        return self._random.choice(FAULT_KINDS)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        operation = request.headers.get("X-Amz-Target", "").rpartition(".")[2] or request.method
        self.counts.requests[operation] += 1
        body = await request.read()
        fault = self._draw()
        if fault is not None:
            self.counts.faults[fault] += 1
            self.counts.faults_by_operation[operation] += 1
        if fault == "reset_before":
            return _reset(request)
        if fault == "error_before":
            return self._error()
        upstream = await self._forward(request, body)
        if fault == "reset_after":
            return _reset(request)
        if fault == "error_after":
            return self._error()
        return upstream

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST}
        async with self._http.request(
            request.method, self.target_url + request.path_qs, headers=headers, data=body
        ) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE}
            return web.Response(status=resp.status, body=payload, headers=out)

    def _error(self) -> web.Response:
        status, code, fault = self._random.choice(_ERRORS)
        return web.json_response(
            {"__type": f"com.amazonaws.sqs#{code}", "message": f"{code} injected by the test's fault proxy"},
            status=status,
            content_type="application/x-amz-json-1.0",
            headers={"x-amzn-RequestId": str(uuid.uuid4()), "x-amzn-query-error": f"{code};{fault}"},
        )


def _reset(request: web.Request) -> web.Response:
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp finds the transport gone and writes nothing; the client sees the connection reset.
    return web.Response(status=500)


class RefuseSendingProxy(SqsFaultProxy):
    """Answers 503 to every SendMessageBatch call that carries ``marker`` (without forwarding it)."""

    def __init__(self, target_url: str, marker: str) -> None:
        super().__init__(target_url)
        self.marker = marker.encode()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Amz-Target", "").endswith(".SendMessageBatch"):
            body = await request.read()
            if self.marker in body:
                self.counts.requests["refused"] += 1
                return self._error()
        return await super()._handle(request)


class SilentProxy(SqsFaultProxy):
    """Takes every call of ``operation`` (an SQS action, "DeleteMessageBatch") and answers it only when
    the proxy closes (SQS's 503, without forwarding): an SQS that never answers that call. ``arrived``
    is set by the first one; ``calls`` counts them."""

    def __init__(self, target_url: str, operation: str) -> None:
        super().__init__(target_url)
        self.operation = operation
        self.calls = 0
        self.arrived = asyncio.Event()
        self._closing = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Amz-Target", "").endswith(f".{self.operation}"):
            self.calls += 1
            self.arrived.set()
            await self._closing.wait()
            return self._error()
        return await super()._handle(request)

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        await super().__aexit__(*exc)


class LoseAnswerProxy(SqsFaultProxy):
    """Forwards every call of ``operation`` (an SQS action, "SendMessageBatch") to SQS and resets the
    connection instead of returning SQS's answer: SQS did the work, the client sees the connection
    go; botocore's retries go the same way. ``calls`` counts them."""

    def __init__(self, target_url: str, operation: str) -> None:
        super().__init__(target_url)
        self.operation = operation
        self.calls = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Amz-Target", "").endswith(f".{self.operation}"):
            self.calls += 1
            await self._forward(request, await request.read())
            return _reset(request)
        return await super()._handle(request)
