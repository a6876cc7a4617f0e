"""docs/exporter.md, "Scheduling, lock, signals", "Failures" and "Memory and back-pressure": a stop
(SIGTERM) that arrives once a run has published, or while a failed upload is being aborted; and the
size of every part of a multipart upload.

S3 and PostgreSQL are real (moto's server, the test server). Faults come from proxies in front of them:
tests/s3_pause_proxy.py holds or refuses chosen S3 requests, and :class:`PostgresCloseHold` below holds
the message a PostgreSQL client sends when it closes its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from botocore.exceptions import ClientError
from structlog.testing import capture_logs
from structlog.types import EventDict, WrappedLogger

from exporter import run_log
from exporter.errors import ExportError
from exporter.multipart import MultipartUpload, copy_object
from exporter.run import ExportResult, export_once
from exporter.settings import MIB, ExporterSettings
from exporter.shutdown import finish_before_stopping, run_unless_stopped
from shared import aws
from shared.settings import AwsSettings, DatabaseSettings
from shared.shutdown import Stopped
from tests.s3_pause_proxy import (
    Hold,
    RequestMatch,
    S3PauseProxy,
    create_upload,
    upload_part,
    upload_part_copy,
)
from tests.test_export_failures import cli_env
from tests.test_export_support import (
    get_object,
    insert_awkward_rows,
    list_keys,
    open_multipart_uploads,
    settings_factory,
)
from tests.test_export_units import upload_in_chunks

__all__ = ["settings_factory"]  # a fixture, used by name

DAY = datetime(2024, 5, 10, 6, 0, tzinfo=UTC)
HISTORY = "lake/ap_jira_task/history/dt=2024-05-10/ap_jira_task.csv"
# botocore's attempts per request: the first and 3 retries (shared/aws.py: max_attempts, which in
# botocore's client config counts the retries only).
S3_ATTEMPTS = 4
# PostgreSQL's Terminate message: what a client sends to close its session.
TERMINATE = b"X\x00\x00\x00\x04"


async def first_of(*waits: Awaitable[Any]) -> None:
    """Wait until the first of ``waits`` is done (60 s at most: a stuck test fails, it does not hang);
    the waits begun here (from coroutines) are then cancelled, the tasks given are left running."""
    futures = [asyncio.ensure_future(w) for w in waits]
    begun = [f for f, w in zip(futures, waits, strict=True) if f is not w]
    try:
        await asyncio.wait(futures, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in begun:
            future.cancel()


@contextlib.contextmanager
def logged(event: str) -> Iterator[asyncio.Event]:
    """Capture the logs; the event yielded is set as soon as ``event`` is logged."""
    seen = asyncio.Event()

    def spot(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        if event_dict.get("event") == event:
            seen.set()
        return event_dict

    with capture_logs(processors=[spot]):
        yield seen


def start_export(settings: ExporterSettings, stop: asyncio.Event) -> asyncio.Task[ExportResult]:
    """One export of DAY as a task, cancelled (its upload aborted) when ``stop`` is set."""
    return asyncio.create_task(
        run_unless_stopped(export_once(settings, clock=lambda: DAY), stop, name="export")
    )


async def assert_nothing_written_or_left_open(
    pg: asyncpg.Connection, aws_settings: AwsSettings, bucket: str
) -> None:
    """No object in the bucket, and no multipart upload open in S3 or in the exporter's records."""
    assert await open_multipart_uploads(aws_settings, bucket) == []
    assert await pg.fetchval("SELECT count(*) FROM jiralake_export_upload") == 0
    assert await list_keys(aws_settings, bucket) == []


def abort_upload() -> Callable[[web.Request], bool]:
    """AbortMultipartUpload."""
    return lambda r: r.method == "DELETE" and "uploadId" in r.query


def refuse_then_hold_the_abort(
    front: S3PauseProxy, behind: S3PauseProxy, what: str, request: RequestMatch
) -> Hold:
    """``front`` answers 503 to each of botocore's attempts at ``request``; ``behind`` holds the abort
    that follows. Returns the abort's hold."""
    for attempt in range(S3_ATTEMPTS):
        front.hold(f"{what}, attempt {attempt + 1}", request)
    front.release()
    return behind.hold("abort", abort_upload())


# -- a stop once the run has published --
async def test_finish_before_stopping_returns_the_result_when_cancelled_as_the_work_ends() -> None:
    # GIVEN publishing work whose caller is cancelled in the very loop turn the work ends
    caller: list[asyncio.Task[str]] = []

    async def publish() -> str:
        caller[0].cancel()
        return "published"

    async def export() -> str:
        return await finish_before_stopping(publish(), name="export-publish")

    caller.append(asyncio.create_task(export(), name="export"))
    # WHEN the caller waits for it
    [outcome] = await asyncio.gather(caller[0], return_exceptions=True)
    # THEN the caller returns the work's result, its cancellation withdrawn
    assert outcome == "published"
    assert caller[0].cancelling() == 0


async def test_a_stop_while_a_published_run_closes_waits_for_it_and_returns_its_result() -> None:
    # GIVEN a run that has published and is closing its clients and connections
    stop, published, closed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def publish() -> str:
        return "published"

    async def export() -> str:
        result = await finish_before_stopping(publish(), name="export-publish")
        published.set()
        await closed.wait()
        return result

    with logged("export_stop_deferred") as deferred:
        run = asyncio.create_task(run_unless_stopped(export(), stop, name="export"))
        await first_of(published.wait(), run)
        assert published.is_set()
        # WHEN the stop request arrives then
        stop.set()
        await first_of(deferred.wait(), run)
        # THEN the run is not cancelled: the stop waits for it (cancelled, it would end as Stopped)
        assert deferred.is_set(), f"the run ended before it closed: {run}"
        closed.set()
        assert await run == "published"


async def test_a_run_recorded_succeeded_is_never_recorded_failed_afterwards(pg: asyncpg.Connection) -> None:
    # GIVEN a run recorded 'succeeded'
    run_id = await run_log.start_run(
        pg,
        mode="full",
        format="csv",
        destination="s3://b/lake",
        started_at=DAY,
        since_xid8=None,
        server_id=None,
    )
    await run_log.run_succeeded(
        pg, run_id, finished_at=DAY, watermark_xid8=7, rows=3, bytes_exported=30, sha256="ab",
        data_key="lake/h.csv", latest_key="lake/l.csv", manifest_key="lake/_h.json",
    )  # fmt: skip
    # WHEN a failure is recorded for it (a stop or an error after its publication)
    await run_log.run_failed(pg, run_id, finished_at=DAY, error="interrupted (stop requested)")
    # THEN it stays as published
    row = await pg.fetchrow(
        "SELECT status, error, watermark_xid8, latest_key FROM jiralake_export_run WHERE run_id = $1", run_id
    )
    assert row is not None
    assert dict(row) == {
        "status": "succeeded",
        "error": None,
        "watermark_xid8": 7,
        "latest_key": "lake/l.csv",
    }


class PostgresCloseHold:
    """A TCP proxy in front of PostgreSQL that holds every Terminate message (a client closing its
    session) from the server until released: the client waits in its ``close()`` meanwhile.

    asyncpg sends Terminate alone, as the last bytes it writes on a connection; connect with
    ``sslmode=disable`` so the proxy sees it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.proxy_port = 0
        self.closing = asyncio.Event()
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def url(self, database_url: str) -> str:
        """``database_url`` through the proxy."""
        parts = urlsplit(database_url)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.proxy_port}" if user else f"127.0.0.1:{self.proxy_port}"
        query = "&".join(q for q in (parts.query, "sslmode=disable") if q)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    def release(self) -> None:
        self._released.set()

    async def __aenter__(self) -> PostgresCloseHold:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.proxy_port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(self.host, self.port)
        for reader, writer, holds in (
            (client_reader, server_writer, True),
            (server_reader, client_writer, False),
        ):
            pipe = asyncio.create_task(self._pipe(reader, writer, holds_close=holds), name="pg-close-hold")
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, holds_close: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if holds_close and chunk.endswith(TERMINATE):
                    self.closing.set()
                    await self._released.wait()
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def test_cli_sigterm_while_a_published_export_closes_exits_0_with_its_line(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    db_settings: DatabaseSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN 10 rows, and `jiralake export --once` reaching PostgreSQL through a proxy that holds its
    # connections' closing
    await insert_awkward_rows(pg, 10)
    assert db_settings.url is not None
    server = urlsplit(db_settings.url)
    async with PostgresCloseHold(server.hostname or "127.0.0.1", server.port or 5432) as proxy:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jiralake", "--log-json", "export", "--once",
            env=dict(cli_env(aws_settings, db_settings, bucket), DATABASE_URL=proxy.url(db_settings.url)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        await first_of(proxy.closing.wait(), proc.wait())
        assert proxy.closing.is_set(), f"the exporter never closed a connection (exit {proc.returncode})"
        # AND the export has published: its run is recorded 'succeeded', and it is closing its connections
        run = await pg.fetchrow("SELECT * FROM jiralake_export_run ORDER BY run_id DESC LIMIT 1")
        assert run is not None and run["status"] == "succeeded"
        # WHEN SIGTERM arrives then
        proc.send_signal(signal.SIGTERM)
        # THEN the exporter lets the run end rather than cancel it
        deferred = False
        while not deferred and (line := await asyncio.wait_for(proc.stderr.readline(), timeout=60)):
            deferred = b'"event": "export_stop_deferred"' in line
        assert deferred, "the exporter ended without letting the published run end"
        proxy.release()
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    # AND exits 0 with the line of a successful export, not "stopped ... latest/ is unchanged"
    assert proc.returncode == 0
    assert stdout.decode() == (
        f"exported 10 rows ({run['bytes_exported']:,} bytes, csv) to s3://{bucket}/{run['data_key']}; "
        f"latest: s3://{bucket}/{run['latest_key']}\n"
    )
    # AND the run stays recorded as published, as latest/'s manifest says
    status = await pg.fetchval("SELECT status FROM jiralake_export_run WHERE run_id = $1", run["run_id"])
    assert status == "succeeded"
    manifest = json.loads(await get_object(aws_settings, bucket, "lake/ap_jira_task/latest/_manifest.json"))
    assert (manifest["run_id"], manifest["rows"]) == (run["run_id"], 10)


# -- a stop while a failed upload is being aborted --
async def test_a_stop_while_a_failed_upload_aborts_waits_for_the_abort_and_keeps_the_first_failure(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    await insert_awkward_rows(pg, 10)
    assert aws_settings.endpoint_url is not None
    async with (
        S3PauseProxy(aws_settings.endpoint_url) as behind,
        S3PauseProxy(behind.url) as front,
    ):
        # GIVEN S3 refusing the export's only part (503 to each of botocore's attempts), and holding the
        # abort of its upload that follows
        abort = refuse_then_hold_the_abort(front, behind, "part 1", upload_part(1))
        settings = settings_factory(aws=dataclasses.replace(aws_settings, endpoint_url=front.url))
        stop = asyncio.Event()
        with logged("export_stop_deferred") as deferred:
            run = start_export(settings, stop)
            await first_of(abort.reached.wait(), run)
            assert abort.reached.is_set(), f"the export never aborted its upload: {run}"
            # WHEN a stop request (SIGTERM) arrives while the upload is being aborted
            stop.set()
            await first_of(deferred.wait(), run)
            # THEN the run waits for the abort to end (not closing the S3 client under it) ...
            assert deferred.is_set(), f"the run ended during its abort: {run}"
            behind.release()
            [outcome] = await asyncio.gather(run, return_exceptions=True)
    # ... and fails with the failure that came first, not as stopped
    expected = f"uploading s3://{bucket}/{HISTORY} failed: S3 UploadPart failed: 503: Service Unavailable"
    assert isinstance(outcome, ExportError) and str(outcome) == expected, repr(outcome)
    failed = await pg.fetchrow("SELECT status, error FROM jiralake_export_run ORDER BY run_id DESC LIMIT 1")
    assert failed is not None and dict(failed) == {"status": "failed", "error": expected}
    # AND the upload was aborted: nothing is left open, in S3 or in the exporter's records
    await assert_nothing_written_or_left_open(pg, aws_settings, bucket)


async def test_a_stop_while_s3_creates_the_upload_aborts_the_upload_it_created(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    await insert_awkward_rows(pg, 10)
    assert aws_settings.endpoint_url is not None
    async with S3PauseProxy(aws_settings.endpoint_url) as proxy:
        # GIVEN an export whose CreateMultipartUpload is on its way to S3 (held, then let through)
        create = proxy.hold("create", create_upload(), then_forward=True)
        settings = settings_factory(aws=dataclasses.replace(aws_settings, endpoint_url=proxy.url))
        stop = asyncio.Event()
        with logged("export_stop_deferred") as deferred:
            run = start_export(settings, stop)
            await first_of(create.reached.wait(), run)
            assert create.reached.is_set(), f"the export never created its upload: {run}"
            # WHEN a stop request (SIGTERM) arrives, and S3 creates the upload after that
            stop.set()
            await first_of(deferred.wait(), run)
            assert deferred.is_set(), f"the run did not wait for its create call: {run}"
            proxy.release()
            [outcome] = await asyncio.gather(run, return_exceptions=True)
    # THEN the run is stopped, and the upload S3 created was aborted: nothing is left open, in S3 or
    # in the exporter's records
    assert isinstance(outcome, Stopped), repr(outcome)
    await assert_nothing_written_or_left_open(pg, aws_settings, bucket)


async def test_a_cancelled_part_by_part_copy_aborts_to_the_end_and_raises_its_failure(
    aws_settings: AwsSettings, bucket: str
) -> None:
    # GIVEN an 11 MiB object, to copy part by part (5 MiB parts)
    payload = b"0123456789abcdef" * (11 * MIB // 16)
    async with aws.s3_client(aws_settings) as s3:
        source = await upload_in_chunks(s3, bucket, "t/src.csv", payload, chunk_bytes=len(payload))
    assert aws_settings.endpoint_url is not None
    async with (
        S3PauseProxy(aws_settings.endpoint_url) as behind,
        S3PauseProxy(behind.url) as front,
    ):
        # AND S3 refusing the copy of its second part, then holding the abort of the copy's upload
        abort = refuse_then_hold_the_abort(front, behind, "part 2", upload_part_copy(2))
        async with aws.s3_client(dataclasses.replace(aws_settings, endpoint_url=front.url)) as s3:
            copying = asyncio.create_task(
                copy_object(
                    s3,
                    bucket=bucket,
                    source=source,
                    dest_key="t/dest.csv",
                    part_size_bytes=5 * MIB,
                    single_copy_max_bytes=MIB,
                    content_type="text/csv",
                )  # fmt: skip
            )
            await first_of(abort.reached.wait(), copying)
            assert abort.reached.is_set(), f"the copy never aborted its upload: {copying}"
            with logged("export_stop_deferred") as deferred:
                # WHEN the copy is cancelled while its upload is being aborted
                copying.cancel()
                await first_of(deferred.wait(), copying)
                # THEN the abort runs to its end ...
                assert deferred.is_set(), f"the copy ended during its abort: {copying}"
                behind.release()
                [outcome] = await asyncio.gather(copying, return_exceptions=True)
    # ... and the copy raises S3's refusal, the failure that came first
    assert isinstance(outcome, ClientError), repr(outcome)
    assert (outcome.operation_name, outcome.response["Error"]["Code"]) == ("UploadPartCopy", "503")
    assert await open_multipart_uploads(aws_settings, bucket) == []
    assert await list_keys(aws_settings, bucket) == ["t/src.csv"]


# -- part sizes --
COPY_LIKE_CHUNKS = [65_536 + 1_000] * 190  # unaligned chunks, as COPY hands them over: ~12.6 MB
ONE_BIG_CHUNK = [12 * MIB + 7]  # a Parquet row group larger than two parts


@pytest.mark.parametrize(
    "chunk_sizes", [COPY_LIKE_CHUNKS, ONE_BIG_CHUNK], ids=["copy-chunks", "one-big-chunk"]
)
async def test_every_part_but_the_last_is_exactly_the_part_size(
    aws_settings: AwsSettings, bucket: str, chunk_sizes: list[int]
) -> None:
    # GIVEN data written in chunks that do not line up with 5 MiB parts
    payload = bytes(range(256)) * (sum(chunk_sizes) // 256 + 1)
    payload = payload[: sum(chunk_sizes)]
    async with aws.s3_client(aws_settings) as s3:
        async with MultipartUpload(
            s3, bucket=bucket, key="t/parts.bin", part_size_bytes=5 * MIB, parts_in_flight=2,
            content_type="application/octet-stream",
        ) as upload:  # fmt: skip
            # WHEN it is written and every part is stored
            start = 0
            for size in chunk_sizes:
                await upload.write(payload[start : start + size])
                start += size
            await upload.send_remaining()
            assert upload.upload_id is not None
            listed = await s3.list_parts(Bucket=bucket, Key="t/parts.bin", UploadId=upload.upload_id)
            stored = await upload.complete()
    # THEN S3 holds parts of exactly 5 MiB, and a last one with the rest
    sizes = [part["Size"] for part in listed["Parts"]]
    assert sizes == [5 * MIB, 5 * MIB, len(payload) - 10 * MIB]
    # AND the object is the data, whole
    assert (stored.parts, stored.size_bytes) == (3, len(payload))
    assert stored.sha256 == hashlib.sha256(payload).hexdigest()
    assert await get_object(aws_settings, bucket, "t/parts.bin") == payload
