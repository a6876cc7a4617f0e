"""Failures mid-export: PostgreSQL dropping the COPY, S3 losing the upload, a stop request (SIGTERM),
a second exporter. Each leaves latest/ as it was and no incomplete multipart upload behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import aiohttp
import asyncpg
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from exporter.errors import ExportError, ExportLocked
from exporter.lock import EXPORT_LOCK_KEY
from exporter.progress import ProgressSnapshot
from exporter.run import export_once
from exporter.settings import ExporterSettings
from exporter.shutdown import CLEANUP_CALL_TIMEOUT_S, run_unless_stopped
from ops.local_aws import free_port
from shared import aws
from shared.settings import AwsSettings, DatabaseSettings
from shared.shutdown import Stopped
from tests.conftest import empty_database
from tests.s3_pause_proxy import RequestMatch, S3PauseProxy, upload_part
from tests.test_export_support import (
    get_object,
    insert_awkward_rows,
    list_keys,
    open_multipart_uploads,
    settings_factory,
)

__all__ = ["settings_factory"]  # a fixture, used by name

DAY_ONE = datetime(2024, 5, 10, 6, 0, tzinfo=UTC)
LATEST = "lake/ap_jira_task/latest/ap_jira_task.csv"
HISTORY = "lake/ap_jira_task/history/dt=2024-05-10/ap_jira_task.csv"
# Big enough (~45 MB of CSV, 5 MiB parts, 2 in flight) that the COPY is still running after part 1.
BIG_ROWS, BIG_PAD = 30_000, 1_500


async def previous_export(pg: asyncpg.Connection, settings: ExporterSettings) -> None:
    await insert_awkward_rows(pg, 50)
    await export_once(settings, clock=lambda: DAY_ONE)
    await insert_awkward_rows(pg, BIG_ROWS, pad=BIG_PAD, first_id=1_000)


async def assert_nothing_changed(
    pg: asyncpg.Connection, aws_settings: AwsSettings, bucket: str, before: dict[str, bytes]
) -> None:
    assert await open_multipart_uploads(aws_settings, bucket) == []
    assert {key: await get_object(aws_settings, bucket, key) for key in before} == before
    assert await list_keys(aws_settings, bucket) == sorted(before)


async def snapshot_objects(aws_settings: AwsSettings, bucket: str) -> dict[str, bytes]:
    return {key: await get_object(aws_settings, bucket, key) for key in await list_keys(aws_settings, bucket)}


async def test_postgres_dropping_the_copy_mid_upload_aborts_and_keeps_latest(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a successful export earlier the same day, and now a much bigger table
    settings = settings_factory()
    await previous_export(pg, settings)
    before = await snapshot_objects(aws_settings, bucket)
    assert LATEST in before and HISTORY in before
    # AND the COPY's backend is terminated from another connection once a part is in S3
    killer: list[asyncio.Task[str]] = []

    def kill_after_first_part(p: ProgressSnapshot) -> None:
        if p.parts_stored >= 1 and not killer:
            killer.append(
                asyncio.get_running_loop().create_task(
                    pg.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND backend_type = 'client backend' "
                        "AND query LIKE 'COPY (SELECT%'"
                    ),
                    name="terminate-copy",
                )
            )

    failures_before = REGISTRY.get_sample_value("jiralake_export_failures_total") or 0.0
    # WHEN the export runs
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await export_once(settings, clock=lambda: DAY_ONE, on_progress=kill_after_first_part)
    # THEN it fails on the terminated connection
    assert killer and (await killer[0]) == "SELECT 1"
    # AND latest/, the day's history object and the manifests are untouched, with no upload left open
    await assert_nothing_changed(pg, aws_settings, bucket, before)
    # AND the run is recorded as failed with a one-line reason
    run = await pg.fetchrow("SELECT status, error FROM jiralake_export_run ORDER BY run_id DESC LIMIT 1")
    assert run is not None and run["status"] == "failed"
    # (with ": terminating connection due to administrator command" when the FATAL message arrived first)
    assert run["error"].startswith(
        "PostgreSQL error: ConnectionDoesNotExistError: connection was closed in the middle of operation"
    )
    assert "\n" not in run["error"]
    assert REGISTRY.get_sample_value("jiralake_export_failures_total") == failures_before + 1


async def test_an_upload_whose_id_cannot_be_recorded_is_aborted_before_the_error(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a table to export, and an upload ledger that refuses to record an upload's id (PostgreSQL
    # failing between CreateMultipartUpload and the first part)
    await insert_awkward_rows(pg, 20)
    await pg.execute(
        """
        CREATE FUNCTION test_refuse_upload_id() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the ledger refuses upload ids'; END $$;
        CREATE TRIGGER refuse_upload_id BEFORE UPDATE OF upload_id ON jiralake_export_upload
            FOR EACH ROW EXECUTE FUNCTION test_refuse_upload_id();
        """
    )
    try:
        # WHEN an export runs THEN it fails with the ledger's error
        with pytest.raises(asyncpg.RaiseError, match="the ledger refuses upload ids"):
            await export_once(settings_factory(), clock=lambda: DAY_ONE)
    finally:
        await pg.execute(
            "DROP TRIGGER refuse_upload_id ON jiralake_export_upload; DROP FUNCTION test_refuse_upload_id()"
        )
    # AND the upload S3 created is aborted (nothing records it, so nothing else would), nothing written
    assert await open_multipart_uploads(aws_settings, bucket) == []
    assert await list_keys(aws_settings, bucket) == []
    assert await pg.fetchval("SELECT count(*) FROM jiralake_export_upload") == 0


async def test_s3_losing_the_upload_mid_way_fails_cleanly_and_keeps_latest(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a previous export and a bigger table
    settings = settings_factory()
    await previous_export(pg, settings)
    before = await snapshot_objects(aws_settings, bucket)
    assert aws_settings.endpoint_url is not None
    async with S3PauseProxy(aws_settings.endpoint_url) as proxy:
        # AND S3 loses the multipart upload (aborted behind the exporter's back) while its second part
        # is on the way: the proxy holds that part until the upload is gone, then lets S3 answer it
        second_part = proxy.hold("part 2", upload_part(2), then_forward=True)
        via_proxy = replace(settings, aws=AwsSettings(aws_settings.region, proxy.url))
        exporting = asyncio.create_task(export_once(via_proxy, clock=lambda: DAY_ONE), name="export")
        reached = asyncio.create_task(second_part.reached.wait(), name="part-2-held")
        await asyncio.wait({exporting, reached}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        reached.cancel()
        assert second_part.reached.is_set(), f"the export never sent its second part: {exporting}"
        async with aws.s3_client(aws_settings) as s3:
            [upload] = (await s3.list_multipart_uploads(Bucket=bucket))["Uploads"]
            assert upload["Key"] == HISTORY
            await s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        proxy.release()
        # WHEN the export goes on
        with pytest.raises(ExportError) as failure:
            await asyncio.wait_for(exporting, timeout=60)
    # THEN the failure names the object and S3's answer to that part, on one line (S3 says
    # NoSuchUpload; moto, 500)
    message = str(failure.value)
    assert message.startswith(f"uploading s3://{bucket}/{HISTORY} failed: S3 UploadPart failed: "), message
    assert "\n" not in message
    # AND nothing the readers see changed
    await assert_nothing_changed(pg, aws_settings, bucket, before)


async def test_a_stop_request_mid_upload_cancels_and_aborts(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a previous export and a bigger table
    settings = settings_factory()
    await previous_export(pg, settings)
    before = await snapshot_objects(aws_settings, bucket)
    # AND a stop request (what SIGTERM sets) arriving once a part is in S3
    stop = asyncio.Event()

    def stop_after_first_part(p: ProgressSnapshot) -> None:
        if p.parts_stored >= 1:
            stop.set()

    # WHEN the export runs until stopped
    with pytest.raises(Stopped):
        await run_unless_stopped(
            export_once(settings, clock=lambda: DAY_ONE, on_progress=stop_after_first_part),
            stop,
            name="export",
        )
    # THEN the upload was aborted and latest/ is unchanged
    await assert_nothing_changed(pg, aws_settings, bucket, before)
    run = await pg.fetchrow("SELECT status, error FROM jiralake_export_run ORDER BY run_id DESC LIMIT 1")
    assert run is not None
    assert (run["status"], run["error"]) == ("failed", "interrupted (stop requested)")
    # AND the lock was released with the connection: the next export runs
    assert (await export_once(settings, clock=lambda: DAY_ONE)).rows == 50 + BIG_ROWS


async def test_a_second_export_is_refused_while_one_holds_the_lock(
    pg: asyncpg.Connection, bucket: str, settings_factory: Callable[..., ExporterSettings]
) -> None:
    # GIVEN another session holding the export lock
    await pg.execute("SELECT pg_advisory_lock($1)", EXPORT_LOCK_KEY)
    holder = await pg.fetchval("SELECT pg_backend_pid()")
    failures_before = failures()
    try:
        # WHEN an export starts
        with pytest.raises(ExportLocked) as refused:
            await export_once(settings_factory())
    finally:
        await pg.execute("SELECT pg_advisory_unlock($1)", EXPORT_LOCK_KEY)
    # THEN it refuses at once, naming the holder, and records no run: a skipped run, not a failure
    assert str(refused.value) == (
        f"another export is running (advisory lock {EXPORT_LOCK_KEY:#x} is held by PostgreSQL backend pid "
        f"{holder}); not starting"
    )
    assert await pg.fetchval("SELECT count(*) FROM jiralake_export_run") == 0
    assert failures() == failures_before


def failures() -> float:
    return REGISTRY.get_sample_value("jiralake_export_failures_total") or 0.0


async def test_a_failure_before_the_run_is_recorded_still_counts(
    pg_server_dsn: str, settings_factory: Callable[..., ExporterSettings]
) -> None:
    # GIVEN a database without jiralake's tables (setup not run, or the wrong DATABASE_URL)
    async with empty_database(pg_server_dsn, "noschema") as url:
        settings = settings_factory(database=DatabaseSettings(url=url))
        before = failures()
        # WHEN an export runs (a scheduled one logs it and waits for its next time)
        with capture_logs() as logs, pytest.raises(asyncpg.UndefinedTableError):
            await export_once(settings)
    # THEN it counts as a failure, though no run row could record it: the failure alert sees it
    assert failures() == before + 1
    # AND it logs the export_failed line the runbook sends on-call to, saying no run row holds it
    [failed] = [line for line in logs if line["event"] == "export_failed"]
    assert (failed["log_level"], failed["run_recorded"], failed["interrupted"]) == ("error", False, False)
    assert failed["reason"].startswith("PostgreSQL error: UndefinedTableError: relation ")


def cli_env(aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str) -> dict[str, str]:
    assert aws_settings.endpoint_url and db_settings.url
    return dict(
        os.environ,
        DATABASE_URL=db_settings.url,
        AWS_ENDPOINT_URL=aws_settings.endpoint_url,
        JIRALAKE_BUCKET=bucket,
        JIRALAKE_EXPORT_PREFIX="lake",
        JIRALAKE_EXPORT_PART_SIZE_MIB="5",
        JIRALAKE_EXPORT_PARTS_IN_FLIGHT="1",
        JIRALAKE_LOG_LEVEL="INFO",
    )


async def test_cli_refuses_a_second_export_with_exit_75_and_one_line(
    pg: asyncpg.Connection, aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str
) -> None:
    # GIVEN the lock held elsewhere
    await pg.execute("SELECT pg_advisory_lock($1)", EXPORT_LOCK_KEY)
    try:
        # WHEN `jiralake export --once` runs
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jiralake", "export", "--once",
            env=cli_env(aws_settings, db_settings, bucket),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        await pg.execute("SELECT pg_advisory_unlock($1)", EXPORT_LOCK_KEY)
    # THEN it exits 75 with one line saying why
    assert proc.returncode == 75
    assert stdout == b""
    lines = stderr.decode().strip().splitlines()
    assert lines[-1].startswith("jiralake: another export is running (advisory lock 0x6a6c6578 is held by")
    assert not any("Traceback" in line for line in lines)


async def test_cli_sigterm_mid_upload_aborts_and_exits_143(
    pg: asyncpg.Connection, aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str
) -> None:
    # GIVEN a big table and no export yet
    await insert_awkward_rows(pg, BIG_ROWS, pad=BIG_PAD)
    assert aws_settings.endpoint_url is not None
    async with S3PauseProxy(aws_settings.endpoint_url) as proxy:
        # AND its second part held on the way to S3, so its multipart upload is open until told otherwise
        second_part = proxy.hold("part 2", upload_part(2))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jiralake", "export", "--once",
            env=dict(cli_env(aws_settings, db_settings, bucket), AWS_ENDPOINT_URL=proxy.url),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        exited = asyncio.create_task(proc.wait(), name="exporter-exit")
        reached = asyncio.create_task(second_part.reached.wait(), name="part-2-held")
        await asyncio.wait({exited, reached}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        reached.cancel()
        assert second_part.reached.is_set(), f"the export never sent its second part (exit {proc.returncode})"
        assert len(await open_multipart_uploads(aws_settings, bucket)) == 1
        # WHEN SIGTERM arrives while its multipart upload is open
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    # THEN it exits 143 with one line, having aborted the upload and written nothing
    assert proc.returncode == 143
    assert stderr.decode().strip().splitlines()[-1] == (
        "jiralake: export stopped by SIGTERM before publishing: latest/ is unchanged, the multipart upload "
        "aborted (if S3 did not confirm it, the next export aborts it)"
    )
    assert await open_multipart_uploads(aws_settings, bucket) == []
    assert await list_keys(aws_settings, bucket) == []


def abort_upload() -> RequestMatch:
    """AbortMultipartUpload."""
    return lambda r: r.method == "DELETE" and "uploadId" in r.query


async def test_cli_sigterm_with_s3_not_answering_the_abort_exits_within_seconds(
    pg: asyncpg.Connection, aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str
) -> None:
    # GIVEN an export whose second part is held, and an S3 that takes every abort and never answers
    # (botocore alone would try 4 times, 60 s each)
    await insert_awkward_rows(pg, BIG_ROWS, pad=BIG_PAD)
    assert aws_settings.endpoint_url is not None
    async with S3PauseProxy(aws_settings.endpoint_url) as proxy:
        second_part = proxy.hold("part 2", upload_part(2))
        aborts = [proxy.hold(f"abort, attempt {i + 1}", abort_upload()) for i in range(4)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jiralake", "--log-json", "export", "--once",
            env=dict(cli_env(aws_settings, db_settings, bucket), AWS_ENDPOINT_URL=proxy.url),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(second_part.reached.wait(), timeout=60)
        # WHEN SIGTERM arrives
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=CLEANUP_CALL_TIMEOUT_S + 20)
        assert aborts[0].reached.is_set()
    # THEN it gives up on the abort after CLEANUP_CALL_TIMEOUT_S, says so, and exits 143 with one line
    assert proc.returncode == 143, stderr.decode()
    lines = stderr.decode().strip().splitlines()
    assert lines[-1].startswith("jiralake: export stopped by SIGTERM before publishing: latest/ is unchanged")
    [failed] = [json.loads(line) for line in lines if '"multipart_abort_failed"' in line]
    assert failed["reason"] == f"no answer from S3 within {CLEANUP_CALL_TIMEOUT_S:g} s"
    # AND the upload stays recorded, for the next export to abort
    assert await pg.fetchval("SELECT count(*) FROM jiralake_export_upload") == 1


async def test_cli_schedule_mode_stops_cleanly_on_sigterm_while_waiting(
    pg: asyncpg.Connection, aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str
) -> None:
    # GIVEN the exporter running on a daily schedule, waiting for its next time, with an admin port
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "--log-json", "export",
        "--schedule", "0 3 * * *", "--timezone", "America/Sao_Paulo", "--admin-port", str(port),
        env=cli_env(aws_settings, db_settings, bucket),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    scheduled = b""
    while b'"event": "export_scheduled"' not in scheduled:
        scheduled = await asyncio.wait_for(proc.stderr.readline(), timeout=30)
        assert scheduled, "the exporter ended before scheduling"
    assert b'"timezone": "America/Sao_Paulo"' in scheduled
    # AND its admin port answers health, readiness and metrics
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as healthz:
            assert healthz.status == 200
        async with http.get(f"http://127.0.0.1:{port}/readyz") as readyz:
            assert (readyz.status, await readyz.json()) == (200, {"status": "ready"})
        async with http.get(f"http://127.0.0.1:{port}/metrics") as metrics:
            assert "jiralake_export_last_success_timestamp_seconds" in await metrics.text()
    # WHEN SIGTERM arrives
    proc.send_signal(signal.SIGTERM)
    _, rest = await asyncio.wait_for(proc.communicate(), timeout=30)
    # THEN it stops at once, exit 0, saying so
    assert proc.returncode == 0
    assert b'"event": "exporter_stopped"' in rest and b'"signal": "SIGTERM"' in rest
