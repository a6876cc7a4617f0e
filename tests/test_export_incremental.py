"""Same-day re-runs replace the day's partition; --changed-since-last exports what changed since the
last successful incremental run, including rows committed while that run was reading."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
from structlog.testing import capture_logs

from consumer.apply import apply_envelopes
from exporter import run_log
from exporter.run import export_once
from exporter.settings import ExporterSettings, ExportFormat
from shared import db
from shared.settings import AwsSettings, DatabaseSettings
from tests.conftest import empty_database
from tests.jira_fixtures import make_event
from tests.test_consumer_helpers import envelope_of
from tests.test_export_failures import cli_env
from tests.test_export_support import (
    csv_rows,
    exported_columns,
    get_object,
    insert_awkward_rows,
    list_keys,
    settings_factory,
    table_rows,
)

__all__ = ["settings_factory"]  # a fixture, used by name

CREATED = "mattermost-plugin-jira__webhook-issue-created.json"  # issue 10040


def at(day: int, hour: int, minute: int = 0) -> Callable[[], datetime]:
    return lambda: datetime(2024, 5, day, hour, minute, tzinfo=UTC)


async def test_a_same_day_rerun_replaces_that_days_partition(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    settings = settings_factory()
    columns = await exported_columns(pg, include_raw=False)
    # GIVEN a morning export of 10 rows
    await insert_awkward_rows(pg, 10)
    first = await export_once(settings, clock=at(10, 6))
    # WHEN 5 rows are added and the export runs again the same (UTC) day
    await insert_awkward_rows(pg, 5, first_id=100)
    second = await export_once(settings, clock=at(10, 18))
    # THEN the day still has one object, now the second run's, and its manifest says so
    history = await list_keys(aws_settings, bucket, "lake/ap_jira_task/history/")
    assert history == [
        "lake/ap_jira_task/history/dt=2024-05-10/_manifest.json",
        "lake/ap_jira_task/history/dt=2024-05-10/ap_jira_task.csv",
    ]
    assert first.data_key == second.data_key
    day = await get_object(aws_settings, bucket, second.data_key)
    assert csv_rows(day, columns) == await table_rows(pg, columns)
    assert len(csv_rows(day, columns)) == 15
    manifest = json.loads(await get_object(aws_settings, bucket, second.manifest_keys[0]))
    assert (manifest["run_id"], manifest["rows"]) == (second.run_id, 15)
    # AND the next day adds a partition, and latest/ follows the newest run
    await insert_awkward_rows(pg, 1, first_id=200)
    third = await export_once(settings, clock=at(11, 6))
    assert third.data_key == "lake/ap_jira_task/history/dt=2024-05-11/ap_jira_task.csv"
    assert await get_object(aws_settings, bucket, "lake/ap_jira_task/latest/ap_jira_task.csv") == (
        await get_object(aws_settings, bucket, third.data_key)
    )
    assert await get_object(aws_settings, bucket, first.data_key) == day


async def test_changed_since_last_exports_only_rows_changed_since_the_previous_incremental_run(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    settings = settings_factory()
    columns = await exported_columns(pg, include_raw=False)
    # GIVEN 100 rows and a first incremental run (no watermark yet: every row)
    await insert_awkward_rows(pg, 100)
    first = await export_once(settings, changed_since_last=True, clock=at(10, 6))
    assert (first.rows, first.since_xid8, first.latest_key) == (100, None, None)
    assert (
        first.data_key
        == f"lake/ap_jira_task/changes/dt=2024-05-10/ap_jira_task-20240510T060000Z-r{first.run_id}.csv"
    )
    # AND a full export in between (it does not move the incremental watermark)
    await export_once(settings, clock=at(10, 7))
    # WHEN three rows change, one is deleted (flagged), two are added, and the next incremental run goes
    await pg.execute(
        "UPDATE ap_jira_task SET summary = 'changed\nsummary', version = version + 1 "
        "WHERE issue_id IN (3, 4, 5)"
    )
    await pg.execute("UPDATE ap_jira_task SET deleted_version = version + 5 WHERE issue_id = 7")
    await insert_awkward_rows(pg, 2, first_id=500)
    second = await export_once(settings, changed_since_last=True, clock=at(10, 8))
    # THEN it holds exactly those six rows, as they are now, in its own object beside the first
    data = await get_object(aws_settings, bucket, second.data_key)
    assert csv_rows(data, columns) == await table_rows(
        pg, columns, where="issue_id IN (3, 4, 5, 7, 500, 501)"
    )
    assert second.since_xid8 == first.watermark_xid8
    assert second.watermark_xid8 >= first.watermark_xid8
    changes = await list_keys(aws_settings, bucket, "lake/ap_jira_task/changes/")
    assert changes == sorted(
        [
            first.data_key,
            f"lake/ap_jira_task/changes/dt=2024-05-10/_ap_jira_task-20240510T060000Z-r{first.run_id}.manifest.json",
            second.data_key,
            f"lake/ap_jira_task/changes/dt=2024-05-10/_ap_jira_task-20240510T080000Z-r{second.run_id}.manifest.json",
        ]
    )
    manifest = json.loads(await get_object(aws_settings, bucket, second.manifest_keys[0]))
    assert (manifest["mode"], manifest["rows"], manifest["changed_since_xid8"]) == (
        "changes",
        6,
        first.watermark_xid8,
    )
    # AND with nothing changed, the next run is empty
    third = await export_once(settings, changed_since_last=True, clock=at(10, 9))
    assert third.rows == 0


async def test_keeping_the_greatest_ingested_at_per_issue_across_changes_objects_gives_the_table(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    settings = settings_factory()
    columns = await exported_columns(pg, include_raw=False)
    names = [c.name for c in columns]
    ingested, deleted, version = (names.index(n) for n in ("ingested_at", "is_deleted", "version"))
    # GIVEN an issue the consumer created, and an incremental run
    await apply_envelopes(pg, [envelope_of(make_event(CREATED, ts=1000))])
    first = await export_once(settings, changed_since_last=True, clock=at(10, 6))
    # WHEN the consumer applies a delete without the issue's fields (as reconcile's, or a slim payload),
    # and the next incremental run goes
    slim = {
        "webhookEvent": "jira:issue_deleted",
        "timestamp": 2000,
        "issue": {"id": "10040", "key": "TES-41"},
    }
    await apply_envelopes(pg, [envelope_of(slim)])
    second = await export_once(settings, changed_since_last=True, clock=at(10, 8))
    # THEN both objects hold the issue with the same version, so README's rule (per issue_id the row with
    # the greatest ingested_at) is what picks the current row: the table's, deleted
    rows = [
        r
        for key in (first.data_key, second.data_key)
        for r in csv_rows(await get_object(aws_settings, bucket, key), columns)
    ]
    assert [(r[version], r[deleted]) for r in rows] == [(1000, False), (1000, True)]
    newest = max(rows, key=lambda r: r[ingested])
    assert [newest] == await table_rows(pg, columns, where="issue_id = 10040")


async def test_each_destination_keeps_its_own_incremental_watermark(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN two exporters of the same format on one database, to two prefixes (a production lake and
    # a test lake), and 10 rows the first one exported incrementally
    production, test_lake = settings_factory(prefix="prod"), settings_factory(prefix="test")
    await insert_awkward_rows(pg, 10)
    first = await export_once(production, changed_since_last=True, clock=at(10, 6))
    assert first.rows == 10
    # WHEN a row changes and each runs incrementally
    await pg.execute("UPDATE ap_jira_task SET version = version + 1 WHERE issue_id = 3")
    to_test = await export_once(test_lake, changed_since_last=True, clock=at(10, 7))
    to_production = await export_once(production, changed_since_last=True, clock=at(10, 8))
    # THEN the test lake's first incremental run has every row (the production runs don't count for
    # it), and production gets just the changed row
    assert (to_test.since_xid8, to_test.rows) == (None, 10)
    assert (to_production.since_xid8, to_production.rows) == (first.watermark_xid8, 1)
    destinations = await pg.fetch(
        "SELECT destination FROM jiralake_export_run WHERE run_id = ANY($1::bigint[]) ORDER BY run_id",
        [first.run_id, to_test.run_id, to_production.run_id],
    )
    assert [r["destination"] for r in destinations] == [f"s3://{bucket}/prod", f"s3://{bucket}/test"] + [
        f"s3://{bucket}/prod"
    ]


async def test_after_a_move_to_a_cluster_with_lower_transaction_ids_every_row_goes_out_once(
    pg: asyncpg.Connection, settings_factory: Callable[..., ExporterSettings]
) -> None:
    # GIVEN 10 rows exported incrementally, then the database restored on another cluster (pg_dump,
    # pg_restore) whose transaction ids are far below the stored watermark
    settings = settings_factory()
    await insert_awkward_rows(pg, 10)
    first = await export_once(settings, changed_since_last=True, clock=at(10, 6))
    await pg.execute(
        "UPDATE jiralake_export_run SET watermark_xid8 = watermark_xid8 + 1000000000 WHERE run_id = $1",
        first.run_id,
    )
    await pg.execute("UPDATE ap_jira_task SET version = version + 1 WHERE issue_id = 3")
    # WHEN the next incremental run goes
    with capture_logs() as logs:
        moved = await export_once(settings, changed_since_last=True, clock=at(10, 7))
    # THEN it cannot tell what changed, so every row goes out (none would have), and says why
    assert (moved.since_xid8, moved.rows) == (None, 10)
    assert [e["since_xid8"] for e in logs if e["event"] == "export_watermark_ahead"] == [
        first.watermark_xid8 + 1000000000
    ]
    # AND the watermark is this server's again: the run after it exports only what changed
    assert moved.watermark_xid8 < first.watermark_xid8 + 1000000000
    await pg.execute("UPDATE ap_jira_task SET version = version + 1 WHERE issue_id = 4")
    after = await export_once(settings, changed_since_last=True, clock=at(10, 8))
    assert (after.since_xid8, after.rows) == (moved.watermark_xid8, 1)


async def test_after_a_move_to_a_server_whose_ids_passed_the_watermark_every_row_goes_out_once(
    pg: asyncpg.Connection, settings_factory: Callable[..., ExporterSettings]
) -> None:
    # GIVEN 10 rows exported incrementally, each run recording the server's system identifier
    settings = settings_factory()
    await insert_awkward_rows(pg, 10)
    first = await export_once(settings, changed_since_last=True, clock=at(10, 6))
    server = await pg.fetchval("SELECT system_identifier::text FROM pg_control_system()")
    assert await pg.fetchval("SELECT server_id FROM jiralake_export_run WHERE run_id = $1", first.run_id) == (
        server
    )
    # AND that watermark recorded as another server's: as after a restore on a server whose ids had
    # passed it (a busy cluster), every row has an id below the watermark, which is not ahead of this
    # server's ids either, so only the identifier tells the ids apart
    await pg.execute("UPDATE jiralake_export_run SET server_id = '42' WHERE run_id = $1", first.run_id)
    # WHEN the next incremental run goes
    with capture_logs() as logs:
        moved = await export_once(settings, changed_since_last=True, clock=at(10, 7))
    # THEN every row goes out (none would have: all were written before the watermark), and it says why
    assert (moved.since_xid8, moved.rows) == (None, 10)
    [warning] = [e for e in logs if e["event"] == "export_watermark_from_another_server"]
    assert (warning["since_xid8"], warning["watermark_server_id"], warning["server_id"]) == (
        first.watermark_xid8,
        "42",
        server,
    )
    assert "export_watermark_ahead" not in [e["event"] for e in logs]
    # AND the next run goes on from this server's watermark
    await pg.execute("UPDATE ap_jira_task SET version = version + 1 WHERE issue_id = 4")
    after = await export_once(settings, changed_since_last=True, clock=at(10, 8))
    assert (after.since_xid8, after.rows) == (moved.watermark_xid8, 1)


async def test_a_server_that_does_not_let_the_role_read_its_identifier_records_none(
    pg_server_dsn: str,
) -> None:
    # GIVEN a database whose owner revoked pg_control_system() from everyone, as a managed service may
    role = f"jl_noctl_{uuid.uuid4().hex[:8]}"
    async with empty_database(pg_server_dsn, "noctl") as url:
        admin = await asyncpg.connect(url)
        try:
            await admin.execute(
                f"CREATE ROLE {role} LOGIN; REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC"
            )
            exporter = await asyncpg.connect(url, user=role)
            try:
                # WHEN the exporter asks for the server's identifier THEN it has none, and goes on
                assert await run_log.server_id(exporter) is None
            finally:
                await exporter.close()
            assert await run_log.server_id(admin) == await admin.fetchval(run_log.SERVER_ID)
        finally:
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
            await admin.close()


async def test_rows_committed_while_an_incremental_run_reads_are_in_the_next_one(
    pg: asyncpg.Connection,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    settings = settings_factory(format=ExportFormat.CSV_GZ)
    columns = await exported_columns(pg, include_raw=False)
    await insert_awkward_rows(pg, 20)
    await export_once(settings, changed_since_last=True, clock=at(10, 6))
    # GIVEN a writer whose transaction inserted row 900 and changed row 2 but has not committed yet
    writer = await db.connect(db_settings)
    try:
        transaction = writer.transaction()
        await transaction.start()
        await insert_awkward_rows(writer, 1, first_id=900)
        await writer.execute("UPDATE ap_jira_task SET status = 'Done' WHERE issue_id = 2")
        # WHEN an incremental run reads meanwhile, and the writer commits afterwards
        during = await export_once(settings, changed_since_last=True, clock=at(10, 7))
        await transaction.commit()
    finally:
        await writer.close()
    after = await export_once(settings, changed_since_last=True, clock=at(10, 8))
    # THEN the run that could not see the writer's rows left them out, and the next run has them
    assert during.rows == 0
    data = await get_object(aws_settings, bucket, after.data_key)
    assert csv_rows(data, columns, gzipped=True) == await table_rows(
        pg, columns, where="issue_id IN (2, 900)"
    )
    assert after.data_key.endswith(".csv.gz")


async def test_a_run_left_running_by_a_killed_process_is_marked_abandoned(
    pg: asyncpg.Connection, settings_factory: Callable[..., ExporterSettings]
) -> None:
    # GIVEN a run row a killed exporter left 'running'
    dead = await pg.fetchval(
        "INSERT INTO jiralake_export_run (mode, format, status, started_at) "
        "VALUES ('changes', 'csv', 'running', now()) RETURNING run_id"
    )
    # WHEN the next export takes the lock
    result = await export_once(settings_factory(), clock=at(10, 6))
    # THEN the dead run is abandoned and the new one succeeded
    statuses = {
        r["run_id"]: r["status"] for r in await pg.fetch("SELECT run_id, status FROM jiralake_export_run")
    }
    assert statuses == {dead: "abandoned", result.run_id: "succeeded"}


async def test_cli_once_prints_what_it_wrote(
    pg: asyncpg.Connection, aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:  # fmt: skip
    # GIVEN rows
    await insert_awkward_rows(pg, 30)
    # WHEN `jiralake export --once --format parquet` runs (on the day it starts or, past midnight UTC,
    # the next)
    days = {datetime.now(UTC).date().isoformat()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "export", "--once", "--format", "parquet",
        env=cli_env(aws_settings, db_settings, bucket), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    # THEN it exits 0 and says where the export went
    days.add(datetime.now(UTC).date().isoformat())
    assert proc.returncode == 0, stderr.decode()
    line = stdout.decode().strip()
    assert line.startswith("exported 30 rows (")
    assert any(
        line.endswith(
            f"parquet) to s3://{bucket}/lake/ap_jira_task_parquet/history/dt={day}/ap_jira_task.parquet; "
            f"latest: s3://{bucket}/lake/ap_jira_task_parquet/latest/ap_jira_task.parquet"
        )
        for day in days
    ), line
