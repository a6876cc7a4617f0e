"""Exports read back equal the table: CSV, csv.gz and Parquet over tens of thousands of rows of awkward
text; what Athena's CSV reader sees decodes to the same values; layout and manifests are as documented."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Callable
from datetime import UTC, date, datetime

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from exporter import streaming
from exporter.columns import ORDER_KEY, TABLE, ColumnKind, read_columns, select_columns
from exporter.csv_format import csv_query
from exporter.errors import ExportError
from exporter.run import export_once, open_source
from exporter.settings import ExporterSettings, ExportFormat
from shared.settings import AwsSettings, DatabaseSettings
from tests.test_export_support import (
    AWKWARD_TEXT,
    athena_decode,
    csv_rows,
    exported_columns,
    get_object,
    insert_awkward_rows,
    list_keys,
    open_csv_serde_line,
    open_multipart_uploads,
    parquet_rows,
    settings_factory,
    table_rows,
)

__all__ = ["settings_factory"]  # a fixture, used by name

ROWS = 25_000
RUN_AT = datetime(2024, 5, 10, 6, 0, 5, tzinfo=UTC)


def fixed_clock() -> datetime:
    return RUN_AT


async def test_csv_export_round_trips_awkward_text_and_keeps_one_line_per_row(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN 25,000 rows whose text holds quotes, commas, CR, LF, backslashes, unicode, NULL and ''
    await insert_awkward_rows(pg, ROWS, pad=200)
    settings = settings_factory(format=ExportFormat.CSV)
    # WHEN one export runs
    result = await export_once(settings, clock=fixed_clock)
    # THEN the object, parsed by a plain RFC 4180 reader and decoded, equals the table, row for row
    data = await get_object(aws_settings, bucket, result.data_key)
    columns = await exported_columns(pg, include_raw=False)
    assert "raw" not in [c.name for c in columns]
    assert csv_rows(data, columns) == await table_rows(pg, columns)
    # AND no value spans lines: one header line plus exactly one line per row
    assert data.count(b"\n") == ROWS + 1
    assert b"\r" not in data
    assert data.splitlines()[0].decode() == ",".join(c.name for c in columns)
    # AND it went up in several parts, and latest/ holds the same bytes
    assert result.rows == ROWS
    assert result.parts >= 2
    assert result.bytes == len(data)
    assert await get_object(aws_settings, bucket, "lake/ap_jira_task/latest/ap_jira_task.csv") == data
    assert await open_multipart_uploads(aws_settings, bucket) == []


async def test_csv_gz_export_round_trips(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN awkward rows, raw JSON included on request
    await insert_awkward_rows(pg, ROWS)
    settings = settings_factory(format=ExportFormat.CSV_GZ, include_raw=True)
    # WHEN exported as csv.gz
    result = await export_once(settings, clock=fixed_clock)
    # THEN it is one gzip stream under the csv.gz table folder, and equals the table
    assert result.data_key == "lake/ap_jira_task_csv_gz/history/dt=2024-05-10/ap_jira_task.csv.gz"
    data = await get_object(aws_settings, bucket, result.data_key)
    assert data[:2] == b"\x1f\x8b"
    columns = await exported_columns(pg, include_raw=True)
    assert "raw" in [c.name for c in columns]
    assert csv_rows(data, columns, gzipped=True) == await table_rows(pg, columns)
    assert gzip.decompress(data).count(b"\n") == ROWS + 1


async def test_parquet_export_round_trips_with_types_and_raw(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN awkward rows
    await insert_awkward_rows(pg, ROWS)
    # WHEN exported as Parquet in row groups of 4,000 rows
    settings = settings_factory(format=ExportFormat.PARQUET, parquet_rows_per_group=4_000)
    result = await export_once(settings, clock=fixed_clock)
    # THEN the file holds every column (raw included) with its type, and equals the table
    data = await get_object(aws_settings, bucket, result.data_key)
    columns = await exported_columns(pg, include_raw=True)
    schema, rows = parquet_rows(data)
    assert schema.names == [c.name for c in columns]
    types = dict(zip(schema.names, schema.types, strict=True))
    assert types["issue_id"] == pa.int64()
    assert types["issue_number"] == pa.int32()
    assert types["is_deleted"] == pa.bool_()
    assert types["created_at"] == pa.timestamp("ms", tz="UTC")
    assert types["due_date"] == pa.date32()
    assert types["labels"] == pa.list_(pa.string())
    assert types["raw"] == pa.string()
    assert rows == await table_rows(pg, columns)
    # AND row groups of 4,000 rows (small rows: their text stays under the group's byte budget)
    assert pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups == -(-ROWS // 4_000)
    assert result.latest_key == "lake/ap_jira_task_parquet/latest/ap_jira_task.parquet"


async def test_a_parquet_row_group_of_large_rows_ends_at_its_byte_budget(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN 300 rows with about 1,700 characters of text each, a budget of 100,000 characters per row
    # group (the product's: 16 MiB), fetches of up to 500 rows (a whole table's worth here), and
    # groups of up to 4,000 rows
    monkeypatch.setattr(streaming, "PARQUET_GROUP_BYTES", 100_000)
    await insert_awkward_rows(pg, 300, pad=2_000)
    settings = settings_factory(format=ExportFormat.PARQUET, parquet_rows_per_group=4_000)
    # WHEN exported as Parquet
    result = await export_once(settings, clock=fixed_clock)
    # THEN each group ended once its text reached the budget (a 4,000-row group of 15 KB issues took
    # 1.3 GiB to encode), and the file still equals the table
    data = await get_object(aws_settings, bucket, result.data_key)
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sum(sizes) == 300 and len(sizes) >= 5
    assert all(size <= 60 for size in sizes), sizes
    columns = await exported_columns(pg, include_raw=True)
    assert parquet_rows(data)[1] == await table_rows(pg, columns)


def group_sizes(data: bytes) -> list[int]:
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


LABELS = {
    # 20 labels of 500 characters: 10,000 characters a row
    "long-labels": "UPDATE ap_jira_task SET labels = array_fill(repeat('l', 500), ARRAY[20])",
    # 2,000 one-character labels: 2,000 characters, but 2,000 Python strings
    "many-short-labels": "UPDATE ap_jira_task SET labels = array_fill('l'::text, ARRAY[2000])",
}


@pytest.mark.parametrize(
    ("labels", "rows", "largest_group"),
    [
        ("long-labels", 200, 100_000 // 10_000 + 1),  # the budget's worth of them, and one row more
        ("many-short-labels", 50, 1),  # counted by characters alone, 50 rows fitted in one group
    ],
)
async def test_text_arrays_count_toward_a_parquet_row_group_s_budget(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
    monkeypatch: pytest.MonkeyPatch,
    labels: str,
    rows: int,
    largest_group: int,
) -> None:
    # GIVEN rows with labels, and a budget of 100,000 per group
    monkeypatch.setattr(streaming, "PARQUET_GROUP_BYTES", 100_000)
    await insert_awkward_rows(pg, rows)
    await pg.execute(LABELS[labels])
    settings = settings_factory(format=ExportFormat.PARQUET, parquet_rows_per_group=4_000)
    # WHEN exported as Parquet
    result = await export_once(settings, clock=fixed_clock)
    # THEN the labels counted, each element at its characters plus about what it holds in memory
    # beyond them (ARRAY_ITEM_CHARS): no group holds more than the budget's worth, and one row more
    data = await get_object(aws_settings, bucket, result.data_key)
    sizes = group_sizes(data)
    assert sum(sizes) == rows and max(sizes) <= largest_group, sizes
    columns = await exported_columns(pg, include_raw=True)
    assert parquet_rows(data)[1] == await table_rows(pg, columns)


async def test_large_rows_after_many_small_ones_do_not_swell_a_parquet_row_group(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN 300 small rows, then (in key order, as newer issues follow older ones) 100 rows with 5,000
    # characters more text each, and a budget of 100,000 characters per group
    monkeypatch.setattr(streaming, "PARQUET_GROUP_BYTES", 100_000)
    await insert_awkward_rows(pg, 300)
    await insert_awkward_rows(pg, 100, pad=5_000, first_id=301)
    settings = settings_factory(format=ExportFormat.PARQUET, parquet_rows_per_group=4_000)
    # WHEN exported as Parquet
    result = await export_once(settings, clock=fixed_clock)
    # THEN no group took in more large rows than its budget holds, and one more: the first fetch of
    # large rows, sized on the small ones, was cut where the budget was reached
    data = await get_object(aws_settings, bucket, result.data_key)
    sizes = group_sizes(data)
    first_row = 0
    for size in sizes:
        large = len(range(max(first_row, 300), first_row + size))
        assert large <= 100_000 // 5_000 + 1, sizes
        first_row += size
    assert first_row == 400
    columns = await exported_columns(pg, include_raw=True)
    assert parquet_rows(data)[1] == await table_rows(pg, columns)


async def test_what_athena_reads_from_the_csv_decodes_to_the_table_values(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN one row per awkward text (and more), exported as CSV
    await insert_awkward_rows(pg, 3 * len(AWKWARD_TEXT))
    result = await export_once(settings_factory(), clock=fixed_clock)
    data = (await get_object(aws_settings, bucket, result.data_key)).decode("utf-8")
    columns = await exported_columns(pg, include_raw=False)
    text_positions = [i for i, c in enumerate(columns) if c.kind is ColumnKind.TEXT]
    expected = await table_rows(pg, columns)
    # WHEN each line is read the way OpenCSVSerDe reads it (skip.header.line.count = 1)
    lines = data.split("\n")[1:-1]
    assert len(lines) == len(expected)
    for line, row in zip(lines, expected, strict=True):
        seen = open_csv_serde_line(line, len(columns))
        # THEN every text value, after the views' decoding, is the table's value (NULL reads as '')
        for i in text_positions:
            assert athena_decode(seen[i] or "") == (row[i] or ""), (columns[i].name, line)
        # AND numbers and flags arrive as plain strings the views can cast
        assert seen[0] == str(row[0])
    # AND the awkward values really were there
    summaries = {athena_decode(open_csv_serde_line(line, len(columns))[6] or "") for line in lines}
    assert {"crlf\r\nend", 'a "quoted" word', "ends with a backslash \\", "\\\\two backslashes"} <= summaries


async def test_layout_and_manifests_are_as_documented(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a few rows
    await insert_awkward_rows(pg, 100)
    rows_before = REGISTRY.get_sample_value("jiralake_export_rows_total") or 0.0
    # WHEN a full CSV export runs at 2024-05-10 06:00:05 UTC
    result = await export_once(settings_factory(), clock=fixed_clock)
    # THEN exactly these objects exist: data in history/ and latest/, a manifest beside each
    assert await list_keys(aws_settings, bucket) == [
        "lake/ap_jira_task/history/dt=2024-05-10/_manifest.json",
        "lake/ap_jira_task/history/dt=2024-05-10/ap_jira_task.csv",
        "lake/ap_jira_task/latest/_manifest.json",
        "lake/ap_jira_task/latest/ap_jira_task.csv",
    ]
    assert result.manifest_keys == (
        "lake/ap_jira_task/history/dt=2024-05-10/_manifest.json",
        "lake/ap_jira_task/latest/_manifest.json",
    )
    # AND the manifest describes the object exactly
    data = await get_object(aws_settings, bucket, result.data_key)
    manifest = json.loads(await get_object(aws_settings, bucket, result.manifest_keys[0]))
    assert manifest["object"] == f"s3://{bucket}/lake/ap_jira_task/history/dt=2024-05-10/ap_jira_task.csv"
    assert (manifest["rows"], manifest["bytes"], manifest["sha256"]) == (
        100,
        len(data),
        hashlib.sha256(data).hexdigest(),
    )
    assert (manifest["mode"], manifest["format"], manifest["run_id"]) == ("full", "csv", result.run_id)
    assert manifest["started_at"] == "2024-05-10T06:00:05Z"
    assert manifest["columns"][:3] == [
        {"name": "issue_id", "postgres_type": "bigint", "athena_type": "bigint"},
        {"name": "issue_key", "postgres_type": "text", "athena_type": "string"},
        {"name": "project_id", "postgres_type": "bigint", "athena_type": "bigint"},
    ]
    assert {"name": "labels", "postgres_type": "text[]", "athena_type": "array<string>"} in manifest[
        "columns"
    ]
    assert manifest["csv"]["header"] is True
    latest = json.loads(await get_object(aws_settings, bucket, result.manifest_keys[1]))
    assert latest["object"] == f"s3://{bucket}/lake/ap_jira_task/latest/ap_jira_task.csv"
    assert latest["copied_from"] == manifest["object"]
    assert latest["sha256"] == manifest["sha256"]
    # AND the metrics count it
    assert REGISTRY.get_sample_value("jiralake_export_rows_total") == rows_before + 100
    assert (
        REGISTRY.get_sample_value("jiralake_export_last_success_timestamp_seconds", {"mode": "full"})
        == RUN_AT.timestamp()
    )
    # AND the run is recorded as succeeded
    run = await pg.fetchrow("SELECT * FROM jiralake_export_run WHERE run_id = $1", result.run_id)
    assert run is not None
    assert (run["status"], run["mode"], run["rows_exported"], run["data_key"]) == (
        "succeeded",
        "full",
        100,
        result.data_key,
    )


@pytest.mark.parametrize("export_format", [ExportFormat.CSV, ExportFormat.PARQUET])
async def test_infinite_dates_and_times_are_written_as_the_last_and_first_values(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
    export_format: ExportFormat,
) -> None:
    # GIVEN rows holding PostgreSQL's infinity and -infinity (a due date of 9999-12-31 stored before the
    # consumer sent due dates as text; a time of exactly 0001-01-01T00:00:00Z, which asyncpg sends so)
    await pg.execute(
        "INSERT INTO ap_jira_task (issue_id, issue_key, version, due_date, created_at) VALUES "
        "(1, 'A-1', 1, 'infinity', '-infinity'), (2, 'A-2', 1, '-infinity', 'infinity'), "
        "(3, 'A-3', 1, NULL, NULL)"
    )
    # WHEN exported
    result = await export_once(settings_factory(format=export_format), clock=fixed_clock)
    # THEN the export succeeds, and each is the type's last or first value; NULL stays NULL
    data = await get_object(aws_settings, bucket, result.data_key)
    columns = await exported_columns(pg, include_raw=export_format is ExportFormat.PARQUET)
    rows = csv_rows(data, columns) if export_format is ExportFormat.CSV else parquet_rows(data)[1]
    names = [c.name for c in columns]
    picked = {
        r[names.index("issue_id")]: (r[names.index("due_date")], r[names.index("created_at")]) for r in rows
    }
    assert picked == {
        1: (date(9999, 12, 31), datetime(1, 1, 1, tzinfo=UTC)),
        2: (date(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)),
        3: (None, None),
    }


async def test_a_value_parquet_cannot_hold_fails_the_export_with_the_row_named(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
) -> None:
    # GIVEN a row whose labels SQL written by hand made two-dimensional (the consumer writes lists)
    await pg.execute(
        "INSERT INTO ap_jira_task (issue_id, issue_key, version, labels) VALUES "
        "(1, 'A-1', 1, '{x}'), (2, 'A-2', 1, '{{a,b},{c,d}}')"
    )
    # WHEN exported as Parquet
    with pytest.raises(ExportError) as failed:
        await export_once(settings_factory(format=ExportFormat.PARQUET), clock=fixed_clock)
    # THEN the export fails with a reason naming the column and the row, not a crash, and leaves no
    # object and no upload behind
    assert str(failed.value).startswith("labels of issue_id 2 cannot be written to Parquet as list<")
    assert str(failed.value).endswith("; correct the row, or export it as CSV")
    assert await list_keys(aws_settings, bucket) == []
    assert await open_multipart_uploads(aws_settings, bucket) == []


@pytest.mark.parametrize("export_format", [ExportFormat.CSV, ExportFormat.PARQUET])
async def test_an_empty_table_exports_a_valid_empty_file(
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
    bucket: str,
    settings_factory: Callable[..., ExporterSettings],
    export_format: ExportFormat,
) -> None:
    # GIVEN an empty table
    # WHEN exported
    result = await export_once(settings_factory(format=export_format), clock=fixed_clock)
    # THEN the object is a valid file with no rows (a CSV header, a Parquet schema)
    data = await get_object(aws_settings, bucket, result.data_key)
    columns = await exported_columns(pg, include_raw=export_format is ExportFormat.PARQUET)
    assert result.rows == 0
    if export_format is ExportFormat.CSV:
        assert data == (",".join(c.name for c in columns) + "\n").encode()
    else:
        schema, rows = parquet_rows(data)
        assert (schema.names, rows) == ([c.name for c in columns], [])


async def test_the_export_reads_with_one_backend_where_a_plain_session_would_go_parallel(
    database_url: str, pg: asyncpg.Connection
) -> None:
    # GIVEN session settings (in the URL) that make any scan worth a parallel plan
    eager = (
        database_url
        + ("&" if "?" in database_url else "?")
        + "&".join(
            f"{name}=0"
            for name in (
                "parallel_setup_cost",
                "parallel_tuple_cost",
                "min_parallel_index_scan_size",
                "min_parallel_table_scan_size",
            )
        )
    )
    columns = select_columns(await read_columns(pg), include_raw=False)
    query = csv_query(columns, table=TABLE, order_key=ORDER_KEY)
    plain = await asyncpg.connect(eager)
    source = await open_source(
        ExporterSettings(aws=AwsSettings(), database=DatabaseSettings(url=eager), bucket="unused")
    )
    try:
        # WHEN a plain session and the exporter's plan the export's query
        plans = ["\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query)) for conn in (plain, source)]
    finally:
        await plain.close()
        await source.close()
    # THEN the plain one gathers from parallel workers, the exporter's reads in one backend
    assert "Gather" in plans[0]
    assert "Gather" not in plans[1]
