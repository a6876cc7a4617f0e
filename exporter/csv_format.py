r"""CSV as Athena can read it: what each column becomes, how text is made newline-safe, streaming gzip.

The file is RFC 4180 CSV written by ``COPY (SELECT ...) TO STDOUT (FORMAT csv, HEADER, FORCE_QUOTE *)``:
a header row, ``,`` between fields, every non-NULL value in double quotes (a quote inside doubled),
NULL as an empty unquoted field, so ``""`` (empty text) and NULL stay distinct for readers that care.

Athena reads quoted CSV with OpenCSVSerDe, which (docs.aws.amazon.com/athena/latest/ug/csv-serde.html)
cannot take a line break inside a value and always treats backslash as its escape character: ``\\``
reads as ``\``, ``\"`` as ``"``, and a backslash before any other character is dropped. So text is
written with backslash escapes that survive that one level of unescaping:

=================  ============  =================
in the table       in the file   what Athena reads
=================  ============  =================
``\``              ``\\\\``      ``\\``
line feed          ``\\n``       ``\n``
carriage return    ``\\r``       ``\r``
=================  ============  =================

Every other character is written as is, so a row is always exactly one line.
:func:`decode_file_text` undoes the file form (for Python readers); :data:`ATHENA_DECODE` undoes what
Athena reads (the typed views that ``jiralake export --athena-ddl`` prints use it).
"""

from __future__ import annotations

import re
import zlib

from exporter.columns import ColumnKind, ExportColumn, finite_value, quote_ident

# -- newline_safe --
# backslash -> 4 backslashes, CR -> 2 backslashes + r, LF -> 2 backslashes + n (chr() keeps this
# independent of standard_conforming_strings).
NEWLINE_SAFE = (
    "replace(replace(replace({value}, chr(92), repeat(chr(92), 4)),"
    " chr(13), repeat(chr(92), 2) || 'r'), chr(10), repeat(chr(92), 2) || 'n')"
)

# What each kind of column becomes in the CSV, as an SQL expression producing text.
_CSV_VALUE: dict[ColumnKind, str] = {
    ColumnKind.BIGINT: "{col}::text",
    ColumnKind.INTEGER: "{col}::text",
    ColumnKind.SMALLINT: "{col}::text",
    ColumnKind.DOUBLE: "{col}::text",
    ColumnKind.REAL: "{col}::text",
    ColumnKind.BOOLEAN: "CASE WHEN {col} THEN 'true' WHEN NOT {col} THEN 'false' END",
    # Millisecond precision, UTC, in the form Athena/Trino cast to timestamp: 2024-05-10 03:00:00.123
    ColumnKind.TIMESTAMPTZ: "to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS')",
    ColumnKind.TIMESTAMP: "to_char({col}, 'YYYY-MM-DD HH24:MI:SS.MS')",
    ColumnKind.DATE: "to_char({col}, 'YYYY-MM-DD')",
    # Arrays as JSON arrays: ["a","b"]
    ColumnKind.TEXT_ARRAY: NEWLINE_SAFE.format(value="array_to_json({col})::text"),
    ColumnKind.JSON: NEWLINE_SAFE.format(value="{col}::text"),
    ColumnKind.TEXT: NEWLINE_SAFE.format(value="{col}::text"),
}

# -- export_csv --
# ORDER BY names the table's column: the output column of the same name is its text form.
CSV_QUERY = "SELECT {values} FROM {table}{where} ORDER BY {table}.{order_key}"

# Trino/Athena SQL turning what Athena reads (the table above, right column) back into the text.
ATHENA_DECODE = (
    "regexp_replace({value}, '\\\\(.)', "
    "x -> CASE x[1] WHEN 'n' THEN chr(10) WHEN 'r' THEN chr(13) ELSE x[1] END)"
)

_FILE_ESCAPE = re.compile(r"\\\\(\\\\|n|r)")
_FILE_UNESCAPE = {"\\\\": "\\", "n": "\n", "r": "\r"}


def csv_value_sql(column: ExportColumn) -> str:
    """The SQL expression for one column, named as the column (so the header row carries the name)."""
    return _CSV_VALUE[column.kind].format(col=finite_value(column)) + " AS " + column.sql_ident


def csv_query(columns: list[ExportColumn], *, table: str, order_key: str, where: str = "") -> str:
    return CSV_QUERY.format(
        values=", ".join(csv_value_sql(c) for c in columns),
        table=quote_ident(table),
        where=where,
        order_key=quote_ident(order_key),
    )


def decode_file_text(value: str) -> str:
    """A text value as read from the CSV file by any RFC 4180 reader -> the value in the table."""
    if "\\" not in value:
        return value
    return _FILE_ESCAPE.sub(lambda m: _FILE_UNESCAPE[m.group(1)], value)


class GzipStream:
    """Streaming gzip (one member): feed chunks, then :meth:`finish`. Memory: zlib's window, not the file."""

    def __init__(self, level: int = 6) -> None:
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def compress(self, data: bytes) -> bytes:
        return self._compressor.compress(data)

    def finish(self) -> bytes:
        return self._compressor.flush(zlib.Z_FINISH)
