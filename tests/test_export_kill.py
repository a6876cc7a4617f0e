"""A real ``jiralake export`` process SIGKILLed at exact points of its S3 conversation: readers always
see a complete object under latest/ (the previous run's or the new one's), history/ never shows a half
object, and no incomplete multipart upload outlives the next export run.

The exporter talks to moto through tests/s3_pause_proxy.py, which holds one chosen request (before S3
sees it, or after S3 did it but before the exporter hears back); the test then kills the process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from exporter.columns import ExportColumn
from exporter.run import export_once
from exporter.settings import ExporterSettings
from exporter.uploads import abort_leftover_uploads
from shared import aws
from shared.settings import AwsSettings, DatabaseSettings
from tests.s3_pause_proxy import (
    RequestMatch,
    S3PauseProxy,
    complete_upload,
    copy_object,
    upload_part,
    upload_part_copy,
)
from tests.test_export_failures import cli_env
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

DAY_ONE = datetime(2024, 5, 10, 6, 0, tzinfo=UTC)
ROOT = "lake/ap_jira_task"
LATEST = f"{ROOT}/latest/ap_jira_task.csv"
LATEST_MANIFEST = f"{ROOT}/latest/_manifest.json"
DAY_ONE_HISTORY = f"{ROOT}/history/dt=2024-05-10/ap_jira_task.csv"
PREVIOUS_ROWS = 50
# ~15 MB of CSV: three 5 MiB parts (JIRALAKE_EXPORT_PART_SIZE_MIB=5 in cli_env), one in flight at a time.
BIG_ROWS, BIG_PAD = 2_500, 6_000
Rows = list[tuple[Any, ...]]

# The exporter's own code, in a process of its own, with latest/ copied part by part (UploadPartCopy):
# `jiralake export` always uses one CopyObject below 5 GiB, and this test has no 5 GiB to spare.
PART_COPY_EXPORT = """
import asyncio, dataclasses, os
from exporter.run import export_once
from exporter.settings import ExporterSettings
settings = dataclasses.replace(ExporterSettings.from_env(os.environ), single_copy_max_bytes=1)
asyncio.run(export_once(settings))
"""


@dataclass(frozen=True)
class KillPoint:
    name: str
    matches: RequestMatch
    # False: kill before S3 sees the request; True: S3 did it, the exporter never heard back.
    after_s3: bool
    # What readers see after the kill: the new run's history object (complete) and/or latest/.
    history_is_new: bool
    latest_is_new: bool
    # The killed run had written the new history object's manifest (it follows its object at once).
    history_manifest_is_new: bool
    # Multipart uploads S3 still holds open right after the kill (the next run must abort them).
    open_uploads: int
    # Parts stored in the open upload.
    parts_stored: int = 0
    # Run the export with latest/ copied by UploadPartCopy instead of one CopyObject.
    part_copy: bool = False


KILL_POINTS = [
    KillPoint(
        "before the first part",
        upload_part(1),
        after_s3=False,
        history_is_new=False,
        latest_is_new=False,
        history_manifest_is_new=False,
        open_uploads=1,
    ),
    KillPoint(
        "after two parts",
        upload_part(3),
        after_s3=False,
        history_is_new=False,
        latest_is_new=False,
        history_manifest_is_new=False,
        open_uploads=1,
        parts_stored=2,
    ),
    KillPoint(
        "complete done by S3, not yet confirmed",
        complete_upload("/ap_jira_task.csv"),
        after_s3=True,
        history_is_new=True,
        latest_is_new=False,
        history_manifest_is_new=False,
        open_uploads=0,
    ),
    KillPoint(
        "history complete, before the copy to latest",
        copy_object(),
        after_s3=False,
        history_is_new=True,
        latest_is_new=False,
        history_manifest_is_new=True,
        open_uploads=0,
    ),
    KillPoint(
        "copy to latest done by S3, not yet confirmed",
        copy_object(),
        after_s3=True,
        history_is_new=True,
        latest_is_new=True,
        history_manifest_is_new=True,
        open_uploads=0,
    ),
    KillPoint(
        "during the part-by-part copy to latest",
        upload_part_copy(2),
        after_s3=False,
        history_is_new=True,
        latest_is_new=False,
        history_manifest_is_new=True,
        open_uploads=1,
        parts_stored=1,
        part_copy=True,
    ),
]


@dataclass(frozen=True)
class TableStates:
    columns: list[ExportColumn]
    previous: Rows  # what the previous (successful) export wrote
    new: Rows  # what the killed export was writing


async def previous_export_then_more_rows(pg: asyncpg.Connection, settings: ExporterSettings) -> TableStates:
    await insert_awkward_rows(pg, PREVIOUS_ROWS)
    await export_once(settings, clock=lambda: DAY_ONE)
    columns = await exported_columns(pg, include_raw=False)
    previous = await table_rows(pg, columns)
    await insert_awkward_rows(pg, BIG_ROWS, pad=BIG_PAD, first_id=1_000)
    return TableStates(columns, previous, await table_rows(pg, columns))


async def run_and_kill(proxy: S3PauseProxy, point: KillPoint, env: dict[str, str], log_path: Path) -> None:
    """Start the exporter against the proxy, wait until it reaches the held request, SIGKILL it."""
    hold = proxy.hold(point.name, point.matches, after_s3=point.after_s3)
    command = ["-c", PART_COPY_EXPORT] if point.part_copy else ["-m", "jiralake", "export", "--once"]
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *command,
            env=dict(env, AWS_ENDPOINT_URL=proxy.url),
            stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
        reached = asyncio.create_task(hold.reached.wait(), name="held-request")
        exited = asyncio.create_task(proc.wait(), name="exporter-exit")
        await asyncio.wait({reached, exited}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        try:
            assert reached.done(), (
                f"the exporter never reached {point.name!r} (exit {proc.returncode}):\n" + tail(log_path)
            )
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            reached.cancel()
            proxy.release()
    assert proc.returncode == -signal.SIGKILL
    if point.after_s3:
        assert hold.s3_status == 200


def tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:]


async def read_export(aws_settings: AwsSettings, bucket: str, key: str, columns: list[ExportColumn]) -> Rows:
    """Download and parse the whole object: a truncated or half-written one fails here."""
    return csv_rows(await get_object(aws_settings, bucket, key), columns)


async def assert_history_consistent(
    aws_settings: AwsSettings, bucket: str, states: TableStates, *, new_history: bool, new_manifest: bool
) -> None:
    keys = await list_keys(aws_settings, bucket, f"{ROOT}/history/")
    data_keys = [k for k in keys if not k.rsplit("/", 1)[1].startswith("_")]
    # The previous run's partition is whole and unchanged; the killed run's is there only once complete.
    assert await read_export(aws_settings, bucket, DAY_ONE_HISTORY, states.columns) == states.previous
    others = [k for k in data_keys if k != DAY_ONE_HISTORY]
    assert len(others) == (1 if new_history else 0), data_keys
    for key in others:
        assert await read_export(aws_settings, bucket, key, states.columns) == states.new
    # A manifest describes the object beside it; the killed run wrote one only after its object.
    manifests = [k.rsplit("/", 1)[0] + "/_manifest.json" for k in [DAY_ONE_HISTORY, *others]]
    assert [k for k in keys if k not in data_keys] == manifests[: 2 if new_manifest else 1]
    for key, manifest in zip([DAY_ONE_HISTORY, *others], manifests, strict=True):
        if manifest in keys:
            document = json.loads(await get_object(aws_settings, bucket, manifest))
            data = await get_object(aws_settings, bucket, key)
            assert document["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: p.name.replace(" ", "-"))
async def test_sigkill_mid_export_leaves_latest_whole_and_no_upload_after_the_next_run(
    point: KillPoint,
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    db_settings: DatabaseSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
    tmp_path: Path,
) -> None:
    # GIVEN a successful export of 50 rows on an earlier day, then ~15 MB more rows in the table
    settings = settings_factory()
    states = await previous_export_then_more_rows(pg, settings)
    previous_latest = await get_object(aws_settings, bucket, LATEST)

    # WHEN `jiralake export --once` is SIGKILLed at the kill point
    async with S3PauseProxy(aws_settings.endpoint_url or "") as proxy:
        await run_and_kill(proxy, point, cli_env(aws_settings, db_settings, bucket), tmp_path / "export.log")

    # THEN latest/ is a whole object: the previous run's, or (copy done) the new one
    latest = await read_export(aws_settings, bucket, LATEST, states.columns)
    assert latest == (states.new if point.latest_is_new else states.previous)
    # AND its manifest is still the previous run's: it matches the object, or visibly does not
    latest_manifest = json.loads(await get_object(aws_settings, bucket, LATEST_MANIFEST))
    assert latest_manifest["sha256"] == hashlib.sha256(previous_latest).hexdigest()
    assert latest_manifest["rows"] == PREVIOUS_ROWS
    # AND history/ shows the new run's object only once it is complete, and never a part of one
    await assert_history_consistent(
        aws_settings,
        bucket,
        states,
        new_history=point.history_is_new,
        new_manifest=point.history_manifest_is_new,
    )
    # AND every upload S3 still holds open is recorded in PostgreSQL, with its parts
    uploads = await open_multipart_uploads(aws_settings, bucket)
    assert len(uploads) == point.open_uploads
    recorded = await pg.fetch("SELECT bucket, key, upload_id FROM jiralake_export_upload")
    recorded_ids = {r["upload_id"] for r in recorded}
    assert {u["UploadId"] for u in uploads} <= recorded_ids
    assert all(r["bucket"] == bucket for r in recorded)
    async with aws.s3_client(aws_settings) as s3:
        for upload in uploads:
            listed = await s3.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            assert len(listed.get("Parts", [])) == point.parts_stored
    killed = await pg.fetchrow("SELECT run_id, status FROM jiralake_export_run ORDER BY run_id DESC LIMIT 1")
    assert killed is not None and killed["status"] == "running"

    # WHEN the next export runs
    with capture_logs() as logs:
        result = await export_once(settings)

    # THEN it aborted what the killed run left open, and nothing is open any more
    assert await open_multipart_uploads(aws_settings, bucket) == []
    assert await pg.fetchval("SELECT count(*) FROM jiralake_export_upload") == 0
    cleaned = [e for e in logs if e["event"] in ("leftover_upload_aborted", "leftover_upload_gone")]
    assert {e["upload_id"] for e in cleaned} == recorded_ids
    assert {e["event"] for e in cleaned} <= (
        {"leftover_upload_aborted"} if point.open_uploads else {"leftover_upload_gone"}
    )
    # AND it published the whole table, and the killed run is recorded as abandoned
    assert result.rows == PREVIOUS_ROWS + BIG_ROWS
    assert await read_export(aws_settings, bucket, LATEST, states.columns) == states.new
    status = await pg.fetchval("SELECT status FROM jiralake_export_run WHERE run_id = $1", killed["run_id"])
    assert status == "abandoned"


async def test_cleanup_clears_uploads_that_are_gone_and_reports_unknown_ones(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a dead run's records: an open upload with a part, one S3 no longer knows, one never named
    settings_factory()
    key = f"{ROOT}/history/dt=2024-05-10/ap_jira_task.csv"
    async with aws.s3_client(aws_settings) as s3:
        created = await s3.create_multipart_upload(Bucket=bucket, Key=key)
        await s3.upload_part(
            Bucket=bucket, Key=key, UploadId=created["UploadId"], PartNumber=1, Body=b"x" * 1024
        )
    await pg.executemany(
        "INSERT INTO jiralake_export_upload (run_id, bucket, key, upload_id) VALUES (7, $1, $2, $3)",
        [(bucket, key, created["UploadId"]), (bucket, key, "no-such-upload"), (bucket, LATEST, None)],
    )
    # WHEN the cleanup runs (the next export does this first, holding the export lock)
    with capture_logs() as logs:
        cleared = await abort_leftover_uploads(pg, settings_factory().aws)
    # THEN every record is cleared: the open upload aborted, the gone one noted, the unknown one reported
    assert cleared == 3
    assert await pg.fetchval("SELECT count(*) FROM jiralake_export_upload") == 0
    assert await open_multipart_uploads(aws_settings, bucket) == []
    events = [(e["event"], e.get("upload_id"), e["key"]) for e in logs]
    assert events == [
        ("leftover_upload_aborted", created["UploadId"], key),
        ("leftover_upload_gone", "no-such-upload", key),
        ("multipart_upload_unknown", None, LATEST),
    ]
