"""An HTTP reverse proxy in front of moto's server that can hold one chosen S3 request, so a test can
kill the client at an exact point of its conversation with S3.

A hold matches a request (method, query, headers); the proxy either keeps the request from S3 (S3 never
sees it) or forwards it and keeps the response from the client (S3 did the work, the client never
hears). Either way it sets ``reached`` and waits until the test releases it, typically after killing
the client process. A hold ``then_forward`` instead delays the request: once released it goes to S3 and
the client gets S3's own answer (for changing S3's state at an exact point of the conversation). Every
other request is forwarded as is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from yarl import URL

# Headers that belong to one hop, or that aiohttp sets itself from the body it sends.
_HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Transfer-Encoding",
        "Content-Length",
        "Expect",
        "Host",
        "Upgrade",
        "TE",
        "Trailer",
        "Proxy-Connection",
    )
)

RequestMatch = Callable[[web.Request], bool]


@dataclass
class Hold:
    name: str
    matches: RequestMatch
    # False: hold the request before S3 sees it; True: forward it, hold S3's answer.
    after_s3: bool
    # True (only before S3): on release, forward the request and answer with what S3 says.
    then_forward: bool = False
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    # What S3 answered, when after_s3 (the status of the request S3 completed).
    s3_status: int | None = None


def create_upload() -> RequestMatch:
    """CreateMultipartUpload."""
    return lambda r: r.method == "POST" and "uploads" in r.query


def upload_part(number: int) -> RequestMatch:
    """UploadPart of part ``number`` (not UploadPartCopy)."""
    return lambda r: (
        r.method == "PUT"
        and r.query.get("partNumber") == str(number)
        and "x-amz-copy-source" not in r.headers
    )


def upload_part_copy(number: int) -> RequestMatch:
    return lambda r: (
        r.method == "PUT" and r.query.get("partNumber") == str(number) and "x-amz-copy-source" in r.headers
    )


def complete_upload(key_suffix: str) -> RequestMatch:
    """CompleteMultipartUpload of a key ending with ``key_suffix``."""
    return lambda r: r.method == "POST" and "uploadId" in r.query and r.path.endswith(key_suffix)


def copy_object() -> RequestMatch:
    """CopyObject (a single-request server-side copy)."""
    return lambda r: r.method == "PUT" and "x-amz-copy-source" in r.headers and "partNumber" not in r.query


class S3PauseProxy:
    """``async with S3PauseProxy(moto_url) as proxy:`` point the client at ``proxy.url``."""

    def __init__(self, target_url: str) -> None:
        self.target_url = target_url.rstrip("/")
        self.url = ""
        self.holds: list[Hold] = []
        self.seen: list[str] = []
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def hold(
        self, name: str, matches: RequestMatch, *, after_s3: bool = False, then_forward: bool = False
    ) -> Hold:
        """Hold the first request that ``matches`` (each hold fires once)."""
        assert not (after_s3 and then_forward), "then_forward holds the request before S3"
        hold = Hold(name, matches, after_s3, then_forward)
        self.holds.append(hold)
        return hold

    def release(self) -> None:
        """Let every held request go (answered 503 to a client that is, by then, usually gone; a
        ``then_forward`` one goes on to S3)."""
        self._released.set()

    async def __aenter__(self) -> S3PauseProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        hold = self._claim(request)
        self.seen.append(f"{request.method} {request.raw_path}")
        if hold is not None and not hold.after_s3:
            hold.reached.set()
            await self._released.wait()
            if not hold.then_forward:
                return web.Response(status=503, text="held by the test proxy")
            hold = None
        status, headers, payload = await self._forward(request, body)
        if hold is not None:
            hold.s3_status = status
            hold.reached.set()
            await self._released.wait()
            return web.Response(status=503, text="held by the test proxy")
        return web.Response(status=status, headers=headers, body=payload)

    def _claim(self, request: web.Request) -> Hold | None:
        for hold in self.holds:
            if not hold.reached.is_set() and hold.matches(request):
                # Mark it taken at once: concurrent requests must not both match.
                hold.matches = _never
                return hold
        return None

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        # The path and query exactly as the client encoded (and signed) them.
        target = URL(self.target_url + request.raw_path, encoded=True)
        async with self._session.request(request.method, target, headers=headers, data=body) as response:
            payload = await response.read()
            out = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}
            return response.status, out, payload


def _never(request: web.Request) -> bool:
    return False
