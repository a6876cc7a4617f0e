"""A small TCP proxy a test can cut and restore, to make a dependency (Postgres) unreachable mid-run.

While cut, every live connection is aborted (both sides) and new connections are accepted and closed
at once (counted in ``rejected``), which a client sees as the server going away.

``freeze`` stops forwarding in both directions without closing anything (until ``restore``): a server
that stopped answering, or a network that drops its packets. ``freeze_answers`` stops only what the
server sends: what the client sends still arrives and is carried out, its answer is lost.

With ``linger=True`` a connection the server closes stays open towards the client (until ``cut`` or
``close``): the client has read the server's last bytes but not yet seen the socket close, the
moment between PostgreSQL's FATAL message and the end of the TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(
        self, target_host: str, target_port: int, host: str = "127.0.0.1", *, linger: bool = False
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.cut_now = False
        self.rejected = 0
        self.held = 0  # chunks read while frozen, not (yet) forwarded
        self.accepted = 0  # connections forwarded
        self.linger = linger
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._answering = asyncio.Event()  # the server's side: cleared by freeze_answers
        self._answering.set()
        self._links: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        self.cut_now = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    @property
    def open_connections(self) -> int:
        return len(self._links) // 2

    def freeze(self) -> None:
        self._flowing.clear()

    def freeze_answers(self) -> None:
        self._answering.clear()

    def restore(self) -> None:
        self.cut_now = False
        self._flowing.set()
        self._answering.set()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.cut_now:
            self.rejected += 1
            client_writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            client_writer.transport.abort()
            return
        self.accepted += 1
        self._links.update({client_writer, upstream_writer})
        for reader, writer, linger, gate in (
            (client_reader, upstream_writer, False, self._flowing),
            (upstream_reader, client_writer, self.linger, self._answering),
        ):
            pipe = asyncio.create_task(
                self._pipe(reader, writer, linger=linger, gate=gate), name="tcp-proxy-pipe"
            )
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, linger: bool, gate: asyncio.Event
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if not (self._flowing.is_set() and gate.is_set()):
                    self.held += 1
                    while not (self._flowing.is_set() and gate.is_set()):
                        await self._flowing.wait()
                        await gate.wait()
                writer.write(chunk)
                await writer.drain()
            if linger:
                await asyncio.Event().wait()  # until cut or close cancels or aborts it
        except (ConnectionError, OSError):
            pass
        finally:
            self._links.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()


def through(proxy: TcpProxy, url: str) -> str:
    """``url`` (a PostgreSQL URL naming ``proxy``'s target) with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    user, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}{at}{proxy.host}:{proxy.port}"))


async def postgres_proxy(url: str, *, linger: bool = False) -> TcpProxy:
    """A started proxy in front of the PostgreSQL server ``url`` names (libpq's default host and port
    where it names none); :func:`through` gives the URL that reaches the server through it."""
    parts = urlsplit(url)
    return await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432, linger=linger).start()
