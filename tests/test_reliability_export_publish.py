"""docs/exporter.md, "Failures" and "Scheduling, lock, signals": what readers of latest/, history/ and the
manifests see when an export fails or is stopped after its data object is complete, while it publishes
(the copy to latest/, the manifests, the run row).

The exporter talks to moto through tests/s3_pause_proxy.py, which holds a chosen request so the test can
stop the export, make S3 refuse, or break PostgreSQL at that exact point.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from exporter.errors import ExportLockLost
from exporter.lock import EXPORT_LOCK_KEY, _lock_lost, confirm_export_lock
from exporter.run import export_once, open_source
from exporter.settings import ExporterSettings
from exporter.shutdown import run_unless_stopped
from shared import aws, db
from shared.settings import AwsSettings, DatabaseSettings
from tests.s3_pause_proxy import S3PauseProxy, copy_object, upload_part
from tests.tcp_proxy import postgres_proxy, through
from tests.test_consumer_helpers import backend_gone, wait_for
from tests.test_export_support import (
    csv_rows,
    exported_columns,
    get_object,
    insert_awkward_rows,
    list_keys,
    open_multipart_uploads,
    settings_factory,
    table_rows,
)

__all__ = ["settings_factory"]  # a fixture, used by name

MORNING = datetime(2024, 5, 10, 6, 0, tzinfo=UTC)
EVENING = datetime(2024, 5, 10, 18, 0, tzinfo=UTC)
ROOT = "lake/ap_jira_task"
LATEST = f"{ROOT}/latest/ap_jira_task.csv"
LATEST_MANIFEST = f"{ROOT}/latest/_manifest.json"
HISTORY = f"{ROOT}/history/dt=2024-05-10/ap_jira_task.csv"
HISTORY_MANIFEST = f"{ROOT}/history/dt=2024-05-10/_manifest.json"


async def manifest_matches(aws_settings: AwsSettings, bucket: str, manifest_key: str, data_key: str) -> bool:
    """What a careful reader checks: the manifest's sha256, bytes and etag are the object's."""
    document = json.loads(await get_object(aws_settings, bucket, manifest_key))
    data = await get_object(aws_settings, bucket, data_key)
    async with aws.s3_client(aws_settings) as s3:
        head = await s3.head_object(Bucket=bucket, Key=data_key)
    return (document["sha256"], document["bytes"], document["etag"]) == (
        hashlib.sha256(data).hexdigest(),
        len(data),
        head["ETag"],
    )


def manifest_put(suffix: str) -> Callable[[web.Request], bool]:
    return lambda r: r.method == "PUT" and r.path.endswith(suffix) and "x-amz-copy-source" not in r.headers


async def test_a_stop_during_the_copy_to_latest_finishes_publishing_first(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a morning export of 10 rows, then 5 more rows
    columns = await exported_columns(pg, include_raw=False)
    await insert_awkward_rows(pg, 10)
    await export_once(settings_factory(), clock=lambda: MORNING)
    await insert_awkward_rows(pg, 5, first_id=100)
    async with S3PauseProxy(aws_settings.endpoint_url or "") as proxy:
        settings = settings_factory(aws=dataclasses.replace(aws_settings, endpoint_url=proxy.url))
        # AND S3 has copied the new object to latest/, but the exporter has not heard yet
        hold = proxy.hold("copy to latest done", copy_object(), after_s3=True)
        stop = asyncio.Event()
        run = asyncio.create_task(
            run_unless_stopped(export_once(settings, clock=lambda: EVENING), stop, name="export")
        )
        await asyncio.wait_for(hold.reached.wait(), timeout=60)
        # WHEN a stop request (SIGTERM) arrives at that moment
        stop.set()
        for _ in range(10):
            await asyncio.sleep(0)
        proxy.release()
        # THEN the export finishes publishing rather than leave latest/ ahead of its manifest
        result = await asyncio.wait_for(run, timeout=60)
    assert result.rows == 15
    assert csv_rows(await get_object(aws_settings, bucket, LATEST), columns) == await table_rows(pg, columns)
    assert await manifest_matches(aws_settings, bucket, LATEST_MANIFEST, LATEST)
    assert await manifest_matches(aws_settings, bucket, HISTORY_MANIFEST, HISTORY)
    status = await pg.fetchval("SELECT status FROM jiralake_export_run WHERE run_id = $1", result.run_id)
    assert status == "succeeded"
    assert await open_multipart_uploads(aws_settings, bucket) == []


async def test_s3_refusing_the_copy_to_latest_leaves_latest_and_its_manifest_as_they_were(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a morning export of 10 rows, then 5 more rows
    columns = await exported_columns(pg, include_raw=False)
    await insert_awkward_rows(pg, 10)
    await export_once(settings_factory(), clock=lambda: MORNING)
    previous = await get_object(aws_settings, bucket, LATEST)
    await insert_awkward_rows(pg, 5, first_id=100)
    async with S3PauseProxy(aws_settings.endpoint_url or "") as proxy:
        settings = settings_factory(aws=dataclasses.replace(aws_settings, endpoint_url=proxy.url))
        # AND S3 answering every CopyObject with 503, botocore's retries included
        holds = [proxy.hold(f"copy {n}", copy_object()) for n in range(5)]
        proxy.release()
        # WHEN the evening export runs
        with capture_logs() as logs:
            try:
                await export_once(settings, clock=lambda: EVENING)
            except Exception as exc:
                failure: Exception | None = exc
            else:
                failure = None
    # THEN it fails, on one line, after S3 refused the copy
    assert failure is not None and holds[0].reached.is_set()
    run = await pg.fetchrow("SELECT status, error FROM jiralake_export_run ORDER BY run_id DESC LIMIT 1")
    assert run is not None and run["status"] == "failed"
    assert run["error"].startswith("S3 CopyObject failed: 503"), run["error"]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["export_failed"]
    # AND latest/ is the previous object, still described by its manifest
    assert await get_object(aws_settings, bucket, LATEST) == previous
    assert await manifest_matches(aws_settings, bucket, LATEST_MANIFEST, LATEST)
    # AND today's history object is the new one, complete, described by its own manifest (written
    # before the copy), while latest/'s manifest names it as its source: its sha256 says it is not
    assert csv_rows(await get_object(aws_settings, bucket, HISTORY), columns) == await table_rows(pg, columns)
    assert await manifest_matches(aws_settings, bucket, HISTORY_MANIFEST, HISTORY)
    assert json.loads(await get_object(aws_settings, bucket, HISTORY_MANIFEST))["rows"] == 15
    latest_manifest = json.loads(await get_object(aws_settings, bucket, LATEST_MANIFEST))
    assert latest_manifest["copied_from"].endswith(HISTORY) and latest_manifest["rows"] == 10
    # AND nothing is left open
    assert await open_multipart_uploads(aws_settings, bucket) == []
    assert await pg.fetchval("SELECT count(*) FROM jiralake_export_upload") == 0


TERMINATE_BOOKKEEPING = """
SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
  AND NOT EXISTS (
      SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.objid = $1
  )
"""


async def test_a_run_whose_row_was_not_updated_leaves_the_watermark_so_its_rows_come_again(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a first incremental run, then 5 new rows
    await insert_awkward_rows(pg, 10)
    first = await export_once(settings_factory(), changed_since_last=True, clock=lambda: MORNING)
    await insert_awkward_rows(pg, 5, first_id=100)
    async with S3PauseProxy(aws_settings.endpoint_url or "") as proxy:
        settings = settings_factory(aws=dataclasses.replace(aws_settings, endpoint_url=proxy.url))
        # AND PostgreSQL drops the exporter's bookkeeping connection once its manifest is in S3
        hold = proxy.hold("manifest stored", manifest_put(".manifest.json"), after_s3=True)
        run = asyncio.create_task(export_once(settings, changed_since_last=True, clock=lambda: EVENING))
        await asyncio.wait_for(hold.reached.wait(), timeout=60)
        assert await pg.fetchval(TERMINATE_BOOKKEEPING, EXPORT_LOCK_KEY) is True
        proxy.release()
        # WHEN the run tries to record its success
        with capture_logs() as logs:
            try:
                await asyncio.wait_for(run, timeout=60)
            except Exception as exc:  # the session is gone, however asyncpg tells it (shared.db)
                assert isinstance(exc, asyncpg.PostgresError) or db.session_ended(exc), repr(exc)
    # THEN its object and manifest are in S3 ...
    changes = await list_keys(aws_settings, bucket, f"{ROOT}/changes/")
    assert len(changes) == 4, changes
    # ... but the run row could not say so, and the failure is logged
    assert "export_run_not_recorded" in [e["event"] for e in logs]
    # AND the next incremental run starts from the first run's watermark and exports those 5 rows again
    again = await export_once(settings_factory(), changed_since_last=True, clock=lambda: EVENING)
    assert (again.since_xid8, again.rows) == (first.watermark_xid8, 5)


# -- the export lock lost mid-run --

TERMINATE_LOCK_HOLDER = """
SELECT pg_terminate_backend(pid) FROM pg_locks
WHERE locktype = 'advisory' AND objid = $1 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


@pytest.mark.parametrize(
    ("held_request", "refused_step", "history_published"),
    [
        (upload_part(1), f"completing s3://{{bucket}}/{HISTORY}", False),
        (manifest_put("dt=2024-05-10/_manifest.json"), f"replacing s3://{{bucket}}/{LATEST}", True),
    ],
    ids=["before-completing", "before-replacing-latest"],
)
async def test_an_export_whose_lock_session_ended_publishes_nothing_more(
    held_request: Callable[[web.Request], bool],
    refused_step: str,
    history_published: bool,
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a morning export of 10 rows, then 5 more rows
    await insert_awkward_rows(pg, 10)
    await export_once(settings_factory(), clock=lambda: MORNING)
    previous = await get_object(aws_settings, bucket, LATEST)
    await insert_awkward_rows(pg, 5, first_id=100)
    async with S3PauseProxy(aws_settings.endpoint_url or "") as proxy:
        settings = settings_factory(aws=dataclasses.replace(aws_settings, endpoint_url=proxy.url))
        # AND the evening export's session that holds the export lock ends (a PostgreSQL restart, a
        # dropped connection: another exporter may now take the lock) once every row was read, with
        # the upload's part, or the history manifest, on its way to S3
        hold = proxy.hold("held", held_request, then_forward=True)
        run = asyncio.create_task(export_once(settings, clock=lambda: EVENING))
        await asyncio.wait_for(hold.reached.wait(), timeout=60)
        assert await pg.fetchval(TERMINATE_LOCK_HOLDER, EXPORT_LOCK_KEY) is True
        proxy.release()
        # WHEN the run goes on
        with pytest.raises(ExportLockLost) as lost:
            await asyncio.wait_for(run, timeout=60)
    # THEN it stops before the next step that publishes, and records why
    step = refused_step.format(bucket=bucket)
    assert str(lost.value).startswith("the export lock's PostgreSQL session ended (")
    assert str(lost.value).endswith(f"): another export may be running; not {step}")
    failed = await pg.fetchrow("SELECT status, error FROM jiralake_export_run ORDER BY run_id DESC LIMIT 1")
    assert failed is not None and dict(failed) == {"status": "failed", "error": str(lost.value)}
    # AND latest/ is the morning's; today's history object is the evening's only if it was already
    # complete, and nothing is left open
    assert await get_object(aws_settings, bucket, LATEST) == previous
    history_rows = json.loads(await get_object(aws_settings, bucket, HISTORY_MANIFEST))["rows"]
    assert history_rows == (15 if history_published else 10)
    assert await open_multipart_uploads(aws_settings, bucket) == []


async def test_a_server_idle_session_timeout_ends_neither_of_the_run_s_sessions(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    db_settings: DatabaseSettings,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a role whose sessions end after 1 s idle (PostgreSQL 14's idle_session_timeout, set here
    # through the connection URL as a role or database setting would), and an upload slower than that
    if pg.get_server_version() < (14,):
        pytest.skip("idle_session_timeout is PostgreSQL 14+")
    await insert_awkward_rows(pg, 10)
    assert db_settings.url is not None
    separator = "&" if "?" in db_settings.url else "?"
    strict = DatabaseSettings(url=f"{db_settings.url}{separator}idle_session_timeout=1000")
    async with S3PauseProxy(aws_settings.endpoint_url or "") as proxy:
        settings = settings_factory(
            database=strict, aws=dataclasses.replace(aws_settings, endpoint_url=proxy.url)
        )
        hold = proxy.hold("slow part", upload_part(1), then_forward=True)
        run = asyncio.create_task(export_once(settings, clock=lambda: EVENING))
        await asyncio.wait_for(hold.reached.wait(), timeout=60)
        # WHEN the bookkeeping session sits idle for longer than that while the part is on its way
        await asyncio.sleep(2.5)
        proxy.release()
        result = await asyncio.wait_for(run, timeout=60)
    # THEN the run publishes and records its success (the reading session, idle in its turn through
    # the completion and the copy, kept the lock)
    assert result.rows == 10
    status = await pg.fetchval("SELECT status FROM jiralake_export_run WHERE run_id = $1", result.run_id)
    assert status == "succeeded"
    assert json.loads(await get_object(aws_settings, bucket, HISTORY_MANIFEST))["rows"] == 10


async def test_the_reading_session_outlives_idle_timeouts_and_not_its_host(
    pg: asyncpg.Connection, db_settings: DatabaseSettings, settings_factory: Callable[..., ExporterSettings]
) -> None:
    # GIVEN a role whose sessions end after 1 s idle, also in a transaction (set here through the
    # URL, as a role or database setting would), and the exporter's reading session (the one whose end
    # releases the export lock, and whose Parquet cursor waits in its transaction while parts upload)
    if pg.get_server_version() < (14,):
        pytest.skip("idle_session_timeout is PostgreSQL 14+")
    assert db_settings.url is not None
    separator = "&" if "?" in db_settings.url else "?"
    timeouts = "idle_session_timeout=1000&idle_in_transaction_session_timeout=1000"
    strict = DatabaseSettings(url=f"{db_settings.url}{separator}{timeouts}")
    source = await open_source(settings_factory(database=strict))
    try:
        names = (
            "idle_in_transaction_session_timeout", "idle_session_timeout",
            "tcp_keepalives_count", "tcp_keepalives_idle", "tcp_keepalives_interval",
        )  # fmt: skip
        settings = await source.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[]) ORDER BY name", names
        )
        over_tcp = await source.fetchval("SELECT inet_client_addr()") is not None
    finally:
        await source.close()
    # THEN neither idle timeout applies to it, and (over TCP) the server probes it after a minute
    # idle, every 10 s, and gives up after 6 silences
    got = dict(tuple(r) for r in settings)
    assert (got["idle_in_transaction_session_timeout"], got["idle_session_timeout"]) == ("0", "0")
    if over_tcp:  # a Unix-socket session has no TCP keepalives
        keepalives = (got["tcp_keepalives_count"], got["tcp_keepalives_idle"], got["tcp_keepalives_interval"])
        assert keepalives == ("6", "60", "10")


async def test_the_lock_check_refuses_a_session_that_does_not_hold_the_lock(pg: asyncpg.Connection) -> None:
    # GIVEN a live session that does not hold the export lock; WHEN a run checks it; THEN it is refused
    with pytest.raises(ExportLockLost, match="^the export lock is no longer held: .*; not publishing$"):
        await confirm_export_lock(pg, before="publishing")
    # AND a session that holds it passes
    await pg.execute("SELECT pg_advisory_lock($1)", EXPORT_LOCK_KEY)
    try:
        await confirm_export_lock(pg, before="publishing")
    finally:
        await pg.execute("SELECT pg_advisory_unlock($1)", EXPORT_LOCK_KEY)


async def test_the_lock_check_of_a_session_the_server_has_just_ended_says_it_ended(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN an export's connection that holds the lock, and the server ending its session: the
    # server's FATAL message has reached the client, the socket's close not yet
    assert db_settings.url is not None
    proxy = await postgres_proxy(db_settings.url, linger=True)
    try:
        conn = await db.connect(DatabaseSettings(url=through(proxy, db_settings.url)))
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", EXPORT_LOCK_KEY)
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert await pg.fetchval(TERMINATE_LOCK_HOLDER, EXPORT_LOCK_KEY) is True
            await wait_for(lambda: backend_gone(pg, pid), what="the backend to exit")
            await asyncio.sleep(0.5)  # its last bytes, through the proxy
            # WHEN the run checks the lock; THEN it is told the session ended
            with pytest.raises(ExportLockLost) as lost:
                await confirm_export_lock(conn, before="publishing")
            assert str(lost.value) == (
                "the export lock's PostgreSQL session ended (InternalClientError): another export "
                "may be running; not publishing"
            )
        finally:
            conn.terminate()
    finally:
        await proxy.close()


UNCONFIRMED = "could not confirm that this export still holds its lock"
ENDED = "the export lock's PostgreSQL session ended"


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (TimeoutError(), f"{UNCONFIRMED} (no answer within 30s)"),
        (asyncpg.QueryCanceledError("canceling statement"), f"{UNCONFIRMED} (QueryCanceledError)"),
        (asyncpg.AdminShutdownError("terminating connection"), f"{ENDED} (AdminShutdownError)"),
        (asyncpg.ConnectionDoesNotExistError("closed"), f"{ENDED} (ConnectionDoesNotExistError)"),
        (ConnectionResetError(104, "reset"), f"{ENDED} (ConnectionResetError)"),
        (asyncpg.InterfaceError("connection is closed"), f"{ENDED} (InterfaceError)"),
    ],
)
def test_a_failed_lock_check_says_whether_the_session_ended_or_is_unknown(exc: Exception, said: str) -> None:
    # A timeout is an OSError: it must not read as a broken connection (the session may hold the lock).
    lost = _lock_lost(exc, "publishing")
    why = "" if said.startswith(UNCONFIRMED) else ": another export may be running"
    assert lost is not None and str(lost) == f"{said}{why}; not publishing"


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("x"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        asyncpg.InterfaceError("the server expects 1 argument for this query, 0 were passed"),
    ],
)
def test_a_lock_check_failing_for_another_reason_is_a_bug(exc: Exception) -> None:
    # Not "the session ended": a misuse of the connection is raised as it is
    assert _lock_lost(exc, "publishing") is None
