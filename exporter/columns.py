"""The exported columns, read from the PostgreSQL catalog at run time, in table order (``attnum``).

The consumer may add columns to ``ap_jira_task``; the exporter follows without a code change. Each
column gets a :class:`ColumnKind`, which decides how it is written (csv_format, parquet_format) and
which Athena type describes it (athena_ddl).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import asyncpg

from exporter.errors import ExportError

TABLE = "ap_jira_task"
# The table's primary key: exports are ordered by it, so two exports of the same data are identical.
ORDER_KEY = "issue_id"
# Left out of CSV unless --include-raw (it is the whole webhook body); always in Parquet.
RAW_COLUMN = "raw"

# -- exported_columns --
# Domains are described by their base type; dropped columns are skipped.
EXPORTED_COLUMNS = """
SELECT a.attname AS name,
       format_type(a.atttypid, a.atttypmod) AS pg_type,
       base.typname AS base_type,
       a.attnotnull AS not_null
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type base ON base.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


class ColumnKind(enum.Enum):
    BIGINT = "bigint"
    INTEGER = "integer"
    SMALLINT = "smallint"
    BOOLEAN = "boolean"
    DOUBLE = "double"
    REAL = "real"
    TIMESTAMPTZ = "timestamptz"  # written in UTC
    TIMESTAMP = "timestamp"  # written as stored (no zone)
    DATE = "date"
    TEXT_ARRAY = "text_array"
    JSON = "json"  # written as JSON text
    TEXT = "text"  # text, and any type not listed here, as its PostgreSQL text form

    @property
    def athena_type(self) -> str:
        """The column's type in Athena's (Hive) DDL, as Parquet stores it."""
        return _ATHENA_TYPE[self]


_ATHENA_TYPE = {
    ColumnKind.BIGINT: "bigint",
    ColumnKind.INTEGER: "int",
    ColumnKind.SMALLINT: "smallint",
    ColumnKind.BOOLEAN: "boolean",
    ColumnKind.DOUBLE: "double",
    ColumnKind.REAL: "float",
    ColumnKind.TIMESTAMPTZ: "timestamp",
    ColumnKind.TIMESTAMP: "timestamp",
    ColumnKind.DATE: "date",
    ColumnKind.TEXT_ARRAY: "array<string>",
    ColumnKind.JSON: "string",
    ColumnKind.TEXT: "string",
}

_KIND_BY_TYPE: dict[str, ColumnKind] = {
    "int8": ColumnKind.BIGINT,
    "int4": ColumnKind.INTEGER,
    "int2": ColumnKind.SMALLINT,
    "bool": ColumnKind.BOOLEAN,
    "float8": ColumnKind.DOUBLE,
    "float4": ColumnKind.REAL,
    "timestamptz": ColumnKind.TIMESTAMPTZ,
    "timestamp": ColumnKind.TIMESTAMP,
    "date": ColumnKind.DATE,
    "_text": ColumnKind.TEXT_ARRAY,
    "_varchar": ColumnKind.TEXT_ARRAY,
    "_bpchar": ColumnKind.TEXT_ARRAY,
    "json": ColumnKind.JSON,
    "jsonb": ColumnKind.JSON,
}


@dataclass(frozen=True)
class ExportColumn:
    name: str
    pg_type: str
    kind: ColumnKind
    not_null: bool = False

    @property
    def sql_ident(self) -> str:
        """The name as a quoted SQL identifier (names come from the catalog, never from input)."""
        return quote_ident(self.name)


# PostgreSQL's infinity and -infinity are no values a CSV reader, Athena or Parquet take (to_char gives
# an empty string, the epoch arithmetic an error): they are written as the type's last and first values
# Python and Athena hold. The consumer stores a Jira due date of 9999-12-31 as that date, but older rows,
# or a time of exactly 0001-01-01T00:00:00Z (which asyncpg sends as -infinity), may hold them.
_FINITE: dict[ColumnKind, str] = {
    ColumnKind.TIMESTAMPTZ: (
        "CASE WHEN {col} = 'infinity' THEN TIMESTAMPTZ '9999-12-31 23:59:59.999+00' "
        "WHEN {col} = '-infinity' THEN TIMESTAMPTZ '0001-01-01 00:00:00+00' ELSE {col} END"
    ),
    ColumnKind.TIMESTAMP: (
        "CASE WHEN {col} = 'infinity' THEN TIMESTAMP '9999-12-31 23:59:59.999' "
        "WHEN {col} = '-infinity' THEN TIMESTAMP '0001-01-01 00:00:00' ELSE {col} END"
    ),
    ColumnKind.DATE: (
        "CASE WHEN {col} = 'infinity' THEN DATE '9999-12-31' "
        "WHEN {col} = '-infinity' THEN DATE '0001-01-01' ELSE {col} END"
    ),
}


def finite_value(column: ExportColumn) -> str:
    """The column as an SQL expression with no infinite value (see _FINITE); other kinds as they are."""
    return _FINITE.get(column.kind, "{col}").format(col=column.sql_ident)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def kind_of(base_type: str) -> ColumnKind:
    return _KIND_BY_TYPE.get(base_type, ColumnKind.TEXT)


async def read_columns(conn: asyncpg.Connection) -> list[ExportColumn]:
    """Every column of ``ap_jira_task`` in table order; an error if the table does not exist."""
    rows = await conn.fetch(EXPORTED_COLUMNS, TABLE)
    if not rows:
        raise ExportError(
            f"table {TABLE} does not exist in this database; run `jiralake setup --skip-queues` first"
        )
    return [
        ExportColumn(
            name=r["name"], pg_type=r["pg_type"], kind=kind_of(r["base_type"]), not_null=r["not_null"]
        )
        for r in rows
    ]


def select_columns(columns: list[ExportColumn], *, include_raw: bool) -> list[ExportColumn]:
    """The columns an export writes: all of them, without ``raw`` unless asked."""
    return [c for c in columns if include_raw or c.name != RAW_COLUMN]
