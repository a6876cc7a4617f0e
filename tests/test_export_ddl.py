"""``--athena-ddl``: CREATE EXTERNAL TABLE statements matching the exported columns and locations."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from datetime import date

import asyncpg
import pytest

from exporter.athena_ddl import athena_ddl, validate_projection_start
from exporter.columns import ColumnKind, ExportColumn
from exporter.layout import ExportLayout
from exporter.settings import ExportFormat
from shared.settings import AwsSettings, DatabaseSettings
from tests.conftest import empty_database
from tests.test_export_failures import cli_env
from tests.test_export_support import exported_columns

COLUMNS = [
    ExportColumn("issue_id", "bigint", ColumnKind.BIGINT, not_null=True),
    ExportColumn("summary", "text", ColumnKind.TEXT),
    ExportColumn("labels", "text[]", ColumnKind.TEXT_ARRAY),
    ExportColumn("created_at", "timestamp with time zone", ColumnKind.TIMESTAMPTZ),
    ExportColumn("is_deleted", "boolean", ColumnKind.BOOLEAN),
]

DECODE = (
    "regexp_replace({c}, '\\\\(.)', x -> CASE x[1] WHEN 'n' THEN chr(10) WHEN 'r' THEN chr(13) ELSE x[1] END)"
)

EXPECTED_PARQUET_HISTORY = """CREATE EXTERNAL TABLE IF NOT EXISTS `ap_jira_task_parquet_history` (
  `issue_id` bigint,
  `summary` string,
  `labels` array<string>,
  `created_at` timestamp,
  `is_deleted` boolean
)
PARTITIONED BY (`dt` string)
STORED AS PARQUET
LOCATION 's3://bkt/lake/ap_jira_task_parquet/history/'
TBLPROPERTIES (
  'parquet.compression' = 'SNAPPY',
  'projection.enabled' = 'true',
  'projection.dt.type' = 'date',
  'projection.dt.format' = 'yyyy-MM-dd',
  'projection.dt.range' = '2024-01-01,NOW',
  'projection.dt.interval' = '1',
  'projection.dt.interval.unit' = 'DAYS',
  'storage.location.template' = 's3://bkt/lake/ap_jira_task_parquet/history/dt=${dt}/'
);"""

EXPECTED_CSV_LATEST = """CREATE EXTERNAL TABLE IF NOT EXISTS `ap_jira_task_latest_text` (
  `issue_id` string,
  `summary` string,
  `labels` string,
  `created_at` string,
  `is_deleted` string
)
ROW FORMAT SERDE 'org.apache.hadoop.hive.serde2.OpenCSVSerde'
WITH SERDEPROPERTIES ('separatorChar' = ',', 'quoteChar' = '"', 'escapeChar' = '\\\\')
STORED AS TEXTFILE
LOCATION 's3://bkt/lake/ap_jira_task/latest/'
TBLPROPERTIES (
  'skip.header.line.count' = '1'
);"""

EXPECTED_CSV_LATEST_VIEW = (
    'CREATE OR REPLACE VIEW "ap_jira_task_latest" AS\nSELECT\n'
    '  CAST(NULLIF("issue_id", \'\') AS bigint) AS "issue_id",\n'
    f'  {DECODE.format(c=chr(34) + "summary" + chr(34))} AS "summary",\n'
    f"  CAST(json_parse(NULLIF({DECODE.format(c=chr(34) + 'labels' + chr(34))}, ''))"
    ' AS array(varchar)) AS "labels",\n'
    '  CAST(NULLIF("created_at", \'\') AS timestamp) AS "created_at",\n'
    '  CAST(NULLIF("is_deleted", \'\') AS boolean) AS "is_deleted"\n'
    'FROM "ap_jira_task_latest_text";'
)


def test_parquet_ddl_declares_typed_tables_with_partition_projection() -> None:
    ddl = athena_ddl(
        COLUMNS, ExportLayout("bkt", "lake", ExportFormat.PARQUET), projection_start="2024-01-01"
    )
    assert ddl.count("CREATE EXTERNAL TABLE IF NOT EXISTS") == 3
    assert EXPECTED_PARQUET_HISTORY in ddl
    assert "CREATE EXTERNAL TABLE IF NOT EXISTS `ap_jira_task_parquet_latest` (" in ddl
    assert "LOCATION 's3://bkt/lake/ap_jira_task_parquet/latest/'" in ddl
    assert "LOCATION 's3://bkt/lake/ap_jira_task_parquet/changes/'" in ddl


def test_csv_ddl_declares_string_tables_and_typed_decoding_views() -> None:
    ddl = athena_ddl(COLUMNS, ExportLayout("bkt", "lake", ExportFormat.CSV))
    assert EXPECTED_CSV_LATEST in ddl
    assert EXPECTED_CSV_LATEST_VIEW in ddl
    # history and changes: partitioned by dt, projected, and their views carry dt and the object's path
    assert "CREATE EXTERNAL TABLE IF NOT EXISTS `ap_jira_task_history_text` (" in ddl
    assert "'storage.location.template' = 's3://bkt/lake/ap_jira_task/history/dt=${dt}/'" in ddl
    assert "'storage.location.template' = 's3://bkt/lake/ap_jira_task/changes/dt=${dt}/'" in ddl
    assert '  "dt",\n  "$path" AS "source_path"\nFROM "ap_jira_task_history_text";' in ddl
    assert '  "dt",\n  "$path" AS "source_path"\nFROM "ap_jira_task_changes_text";' in ddl
    assert ddl.count("'skip.header.line.count' = '1'") == 3


def test_csv_gz_tables_live_in_their_own_folder() -> None:
    ddl = athena_ddl(COLUMNS, ExportLayout("bkt", "", ExportFormat.CSV_GZ))
    assert "LOCATION 's3://bkt/ap_jira_task_csv_gz/latest/'" in ddl
    assert 'CREATE OR REPLACE VIEW "ap_jira_task_csv_gz_history" AS' in ddl


@pytest.mark.parametrize("export_format", [ExportFormat.CSV, ExportFormat.PARQUET])
async def test_cli_prints_ddl_for_the_tables_columns_in_table_order(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    db_settings: DatabaseSettings,
    bucket: str,
    export_format: ExportFormat,
) -> None:
    # WHEN `jiralake export --athena-ddl` runs against the migrated database
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "export", "--athena-ddl", "--format", export_format.value,
        env=cli_env(aws_settings, db_settings, bucket), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, stderr.decode()
    ddl = stdout.decode()
    # THEN the latest table lists exactly the exported columns, in the catalog's order
    columns = await exported_columns(pg, include_raw=export_format is ExportFormat.PARQUET)
    first_table = ddl.split("CREATE EXTERNAL TABLE", 2)[1]
    declared = re.findall(r"^  `(\w+)` (\S+?),?$", first_table, flags=re.MULTILINE)
    if export_format is ExportFormat.CSV:
        assert declared == [(c.name, "string") for c in columns]
        assert "raw" not in [name for name, _ in declared]
    else:
        assert declared == [(c.name, c.kind.athena_type) for c in columns]
        assert ("raw", "string") in declared and ("labels", "array<string>") in declared
    assert f"s3://{bucket}/lake/{ExportLayout(bucket, 'lake', export_format).table_folder}/latest/" in ddl


@pytest.mark.parametrize("start", ["NOW-3YEARS", "NOW", "NOW-18MONTHS", "NOW - 2 WEEKS", "2024-01-01"])
def test_projection_starts_athena_accepts(start: str) -> None:
    assert validate_projection_start(start) == start
    assert f"'projection.dt.range' = '{start},NOW'" in athena_ddl(
        COLUMNS, ExportLayout("bkt", "lake", ExportFormat.CSV), projection_start=start
    )


@pytest.mark.parametrize(
    "start", ["3 years ago", "2024/01/01", "2024-13-01", "NOW-3", "2024-01-01', 'x", "NOW+3DAYS"]
)
def test_a_projection_start_athena_would_refuse_is_an_error(start: str) -> None:
    with pytest.raises(ValueError, match="not a date"):
        athena_ddl(COLUMNS, ExportLayout("bkt", "lake", ExportFormat.CSV), projection_start=start)


def test_a_projection_start_after_today_is_an_error() -> None:
    # The range ends at NOW: a start after today projects no partition at all
    today = date(2026, 12, 6)
    assert validate_projection_start("2026-12-06", today=today) == "2026-12-06"
    with pytest.raises(ValueError, match="a start after today would project no partition: '2026-12-07'"):
        validate_projection_start("2026-12-07", today=today)


async def run_cli(env: dict[str, str], *args: str) -> tuple[int | None, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "export", *args,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, stdout.decode(), stderr.decode()


async def test_cli_refuses_a_bad_projection_start_with_exit_2(
    aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str
) -> None:
    # WHEN --athena-ddl is asked for a projection Athena would refuse
    env = cli_env(aws_settings, db_settings, bucket)
    code, stdout, stderr = await run_cli(env, "--athena-ddl", "--projection-start", "3 years ago")
    # THEN nothing is printed to paste into Athena, and argparse names the option
    assert (code, stdout) == (2, "")
    assert "argument --projection-start: not a date (YYYY-MM-DD)" in stderr.splitlines()[-1]


async def test_cli_ddl_without_the_table_is_one_line_not_a_crash(
    pg_server_dsn: str, aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str
) -> None:
    # GIVEN a database where `jiralake setup` has not run
    async with empty_database(pg_server_dsn, "empty") as empty:
        env = dict(cli_env(aws_settings, db_settings, bucket), DATABASE_URL=empty)
        # WHEN the DDL is asked for
        code, stdout, stderr = await run_cli(env, "--athena-ddl")
    # THEN one line says why, exit 1, no traceback
    assert (code, stdout) == (1, "")
    assert stderr == (
        "jiralake: cannot print the Athena DDL: table ap_jira_task does not exist in this database; "
        "run `jiralake setup --skip-queues` first\n"
    )
