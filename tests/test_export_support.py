"""Helpers shared by the exporter tests (tests/test_export*.py): table data full of awkward text, ways
to read an exported object back into Python values, and Athena's CSV reader (OpenCSVSerDe) ported
from Trino's bug-for-bug compatible implementation, to show what Athena reads."""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from exporter.columns import ColumnKind, ExportColumn, read_columns, select_columns
from exporter.csv_format import decode_file_text
from exporter.settings import MIB, ExporterSettings, ExportFormat
from shared import aws
from shared.settings import AwsSettings, DatabaseSettings

# Text that breaks naive CSV: quotes, separators, line breaks, backslashes, NULL look-alikes, unicode.
AWKWARD_TEXT: list[str | None] = [
    "plain",
    "",
    None,
    'a "quoted" word',
    '"starts and ends with quotes"',
    "comma, inside",
    "line\nfeed",
    "carriage\rreturn",
    "crlf\r\nend",
    "back\\slash",
    "literal \\n is not a newline",
    "ends with a backslash \\",
    "\\\\two backslashes",
    '\\"backslash then quote',
    "tab\tinside",
    "  leading and trailing spaces  ",
    "unicode: café, 日本語, emoji 🚀, שלום",
    "NULL",
    "\\N",
    'multi\n\nline\r\n"quoted", \\ end\\',
    ",",
    '"',
    '""',
]

# -- insert_awkward_rows --
# $1 = the awkward texts, $2 = row count, $3 = padding characters per summary (to make rows bigger).
INSERT_AWKWARD_ROWS = """
WITH t AS (SELECT $1::text[] AS v, cardinality($1::text[]) AS n)
INSERT INTO ap_jira_task (
    issue_id, issue_key, project_id, project_key, project_name, issue_number, summary, status,
    status_category, issue_type, priority, resolution, assignee_account_id, assignee_display_name,
    reporter_account_id, reporter_display_name, labels, created_at, updated_at, resolved_at, due_date,
    parent_key, version, version_tiebreak, deleted_version, deleted_at, last_event_type, last_event_at,
    last_event_tiebreak, raw)
SELECT
    i,
    'PRJ-' || i,
    CASE WHEN i % 7 = 0 THEN NULL ELSE 10000 + i % 13 END,
    'PRJ',
    t.v[1 + i % t.n],
    CASE WHEN i % 11 = 0 THEN NULL ELSE i END,
    coalesce(t.v[1 + i % t.n], '') || repeat('x', $3),
    t.v[1 + (i * 3) % t.n],
    'To Do',
    'Task',
    CASE WHEN i % 2 = 0 THEN 'High' END,
    NULL,
    'acc-' || (i % 97),
    t.v[1 + (i * 5) % t.n],
    'acc-' || (i % 89),
    t.v[1 + (i * 7) % t.n],
    CASE i % 4
        WHEN 0 THEN NULL
        WHEN 1 THEN ARRAY[]::text[]
        WHEN 2 THEN ARRAY['a,b', 'c"d', 'e\\f', t.v[1 + i % t.n]]
        ELSE ARRAY['solo']
    END,
    timestamptz '2024-01-01 00:00:00+00' + i * interval '61.123456 seconds',
    timestamptz '2024-02-01 12:00:00+00' + i * interval '1.5 seconds',
    CASE WHEN i % 5 = 0 THEN timestamptz '2024-03-01 00:00:00.999999+00' END,
    CASE WHEN i % 3 = 0 THEN NULL ELSE date '2024-01-01' + i % 400 END,
    CASE WHEN i % 9 = 0 THEN 'PRJ-1' END,
    1700000000000 + i,
    'tb-' || i,
    CASE WHEN i % 10 = 0 THEN 1700000000000 + i + 1 END,
    CASE WHEN i % 10 = 0 THEN timestamptz '2024-04-01 00:00:00+00' END,
    'jira:issue_updated',
    timestamptz '2024-02-01 12:00:00+00' + i * interval '1.5 seconds',
    'tb-' || i,
    jsonb_build_object(
        'id', i::text, 'summary', t.v[1 + i % t.n], 'nested', jsonb_build_object('q', 'a"b\\c')
    )
FROM t, generate_series($4::int, $4::int + $2::int - 1) AS i
"""


async def insert_awkward_rows(pg: asyncpg.Connection, count: int, *, pad: int = 0, first_id: int = 1) -> None:
    await pg.execute(INSERT_AWKWARD_ROWS, AWKWARD_TEXT, count, pad, first_id)


def make_settings(
    aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str, **overrides: Any
) -> ExporterSettings:
    base = ExporterSettings(
        aws=aws_settings,
        database=db_settings,
        bucket=bucket,
        prefix="lake",
        part_size_bytes=5 * MIB,
        parts_in_flight=2,
    )
    return replace(base, **overrides)


async def get_object(aws_settings: AwsSettings, bucket: str, key: str) -> bytes:
    async with aws.s3_client(aws_settings) as s3:
        response = await s3.get_object(Bucket=bucket, Key=key)
        # Read as a reader would: the body itself validates the object's checksum at its end
        # (``async with`` on it would hand back the raw stream, which does not).
        body = response["Body"]
        try:
            data: bytes = await body.read()
        finally:
            body.close()
    return data


async def list_keys(aws_settings: AwsSettings, bucket: str, prefix: str = "") -> list[str]:
    async with aws.s3_client(aws_settings) as s3:
        keys: list[str] = []
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(keys)


async def open_multipart_uploads(aws_settings: AwsSettings, bucket: str) -> list[dict[str, Any]]:
    async with aws.s3_client(aws_settings) as s3:
        response = await s3.list_multipart_uploads(Bucket=bucket)
    return [dict(upload) for upload in response.get("Uploads", [])]


async def exported_columns(pg: asyncpg.Connection, *, include_raw: bool) -> list[ExportColumn]:
    return select_columns(await read_columns(pg), include_raw=include_raw)


# -- expected rows: the table as the exports represent it (timestamps truncated to milliseconds) --
def _expected_sql(columns: list[ExportColumn]) -> str:
    values = []
    for c in columns:
        if c.kind in (ColumnKind.TIMESTAMPTZ, ColumnKind.TIMESTAMP):
            values.append(f"date_trunc('milliseconds', {c.sql_ident})")
        elif c.kind is ColumnKind.JSON:
            values.append(f"{c.sql_ident}::text")
        else:
            values.append(c.sql_ident)
    return f"SELECT {', '.join(values)} FROM ap_jira_task ORDER BY issue_id"


async def table_rows(
    pg: asyncpg.Connection, columns: list[ExportColumn], *, where: str = ""
) -> list[tuple[Any, ...]]:
    sql = _expected_sql(columns)
    if where:
        sql = sql.replace(" ORDER BY", f" WHERE {where} ORDER BY")
    return [tuple(_normalise(v) for v in r) for r in await pg.fetch(sql)]


def _normalise(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    return value


# -- reading a CSV export back --
def csv_rows(data: bytes, columns: list[ExportColumn], *, gzipped: bool = False) -> list[tuple[Any, ...]]:
    """Parse an exported CSV object with an ordinary RFC 4180 reader, then decode each value."""
    raw = gzip.decompress(data) if gzipped else data
    table = pacsv.read_csv(
        io.BytesIO(raw),
        parse_options=pacsv.ParseOptions(newlines_in_values=False),
        convert_options=pacsv.ConvertOptions(
            column_types={c.name: pa.string() for c in columns},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            null_values=[""],
        ),
    )
    assert table.column_names == [c.name for c in columns]
    decoders = [_CSV_DECODERS[c.kind] for c in columns]
    return [
        tuple(None if v is None else decode(v) for v, decode in zip(row, decoders, strict=True))
        for row in zip(*(table.column(i).to_pylist() for i in range(table.num_columns)), strict=True)
    ]


def _parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


_CSV_DECODERS: dict[ColumnKind, Callable[[str], Any]] = {
    ColumnKind.BIGINT: int,
    ColumnKind.INTEGER: int,
    ColumnKind.SMALLINT: int,
    ColumnKind.DOUBLE: float,
    ColumnKind.REAL: float,
    ColumnKind.BOOLEAN: {"true": True, "false": False}.__getitem__,
    ColumnKind.TIMESTAMPTZ: _parse_utc,
    ColumnKind.TIMESTAMP: datetime.fromisoformat,
    ColumnKind.DATE: date.fromisoformat,
    ColumnKind.TEXT_ARRAY: lambda s: json.loads(decode_file_text(s)),
    ColumnKind.JSON: decode_file_text,
    ColumnKind.TEXT: decode_file_text,
}


def parquet_rows(data: bytes) -> tuple[pa.Schema, list[tuple[Any, ...]]]:
    table = pq.read_table(io.BytesIO(data))
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return table.schema, [tuple(_normalise(v) for v in row) for row in zip(*columns, strict=True)]


# -- what Athena reads: OpenCSVSerde semantics (Trino's CsvDeserializer.parseLine, in Python) --
def open_csv_serde_line(line: str, column_count: int) -> list[str | None]:
    separator, quote, escape = ",", '"', "\\"
    values: list[str | None] = [None] * column_count
    buffer: list[str] = []
    column = 0
    in_quotes = in_field = False
    position = 0

    def peek(p: int) -> str | None:
        return line[p + 1] if p + 1 < len(line) else None

    while position < len(line) and column < column_count:
        c = line[position]
        if c == escape:
            if in_quotes or in_field:
                nxt = peek(position)
                if nxt in (quote, escape):
                    buffer.append(line[position + 1])
                    position += 1
        elif c == quote:
            if (in_quotes or in_field) and peek(position) == quote:
                buffer.append(line[position + 1])
                position += 1
            else:
                if (
                    position > 2
                    and line[position - 1] != separator
                    and len(line) > position + 1
                    and line[position + 1] != separator
                ):
                    if buffer and "".join(buffer).isspace():
                        buffer.clear()
                    else:
                        buffer.append(c)
                in_quotes = not in_quotes
            in_field = not in_field
        elif c == separator and not in_quotes:
            values[column] = "".join(buffer)
            column += 1
            buffer.clear()
            in_field = False
        else:
            buffer.append(c)
            in_field = True
        position += 1
    if column < column_count and not in_quotes:
        values[column] = "".join(buffer)
    return values


_ATHENA_ESCAPE = re.compile(r"\\(.)")


def athena_decode(value: str) -> str:
    """exporter.csv_format.ATHENA_DECODE (Trino's regexp_replace with a lambda), in Python."""
    return _ATHENA_ESCAPE.sub(lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), value)


@pytest.fixture
async def settings_factory(
    aws_settings: AwsSettings, db_settings: DatabaseSettings, bucket: str
) -> AsyncIterator[Callable[..., ExporterSettings]]:
    """Builds settings for the test's bucket; empties the bucket afterwards (moto keeps it in memory)."""

    def build(**overrides: Any) -> ExporterSettings:
        return make_settings(aws_settings, db_settings, bucket, **overrides)

    yield build
    await empty_bucket(aws_settings, bucket)


async def empty_bucket(aws_settings: AwsSettings, bucket: str) -> None:
    async with aws.s3_client(aws_settings) as s3:
        for upload in (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads", []):
            await s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for key in await list_keys(aws_settings, bucket):
            await s3.delete_object(Bucket=bucket, Key=key)


FORMATS = [ExportFormat.CSV, ExportFormat.CSV_GZ, ExportFormat.PARQUET]
