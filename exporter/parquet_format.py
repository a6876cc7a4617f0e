"""Parquet written as the rows stream: the caller gathers cursor fetches into row groups (by rows and
by the size of their text, exporter/run.py) and each is written into a small in-memory sink that
the caller drains into the multipart upload after every group. Memory: one row group, never the
table.

Types (Athena reads all of them): integers, booleans and floats as themselves; timestamps as
TIMESTAMP(MILLIS) in UTC (Athena has long read milliseconds; microsecond timestamps need engine v3);
dates as DATE; text arrays as LIST<STRING>; JSON and everything else as STRING (UTF-8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from exporter.columns import ColumnKind, ExportColumn, finite_value, quote_ident
from exporter.errors import ExportError
from shared.errors import one_line

# What the server-side cursor selects for each kind of column: values pyarrow takes directly.
_PARQUET_VALUE: dict[ColumnKind, str] = {
    ColumnKind.BIGINT: "{col}",
    ColumnKind.INTEGER: "{col}",
    ColumnKind.SMALLINT: "{col}",
    ColumnKind.BOOLEAN: "{col}",
    ColumnKind.DOUBLE: "{col}",
    ColumnKind.REAL: "{col}",
    # Milliseconds since the epoch (truncated), like the CSV's .MS.
    ColumnKind.TIMESTAMPTZ: "floor(extract(epoch FROM {col}) * 1000)::bigint",
    ColumnKind.TIMESTAMP: "floor(extract(epoch FROM {col}) * 1000)::bigint",
    # Days since 1970-01-01.
    ColumnKind.DATE: "({col} - DATE '1970-01-01')",
    ColumnKind.TEXT_ARRAY: "{col}::text[]",
    ColumnKind.JSON: "{col}::text",
    ColumnKind.TEXT: "{col}::text",
}

_ARROW_TYPE: dict[ColumnKind, pa.DataType] = {
    ColumnKind.BIGINT: pa.int64(),
    ColumnKind.INTEGER: pa.int32(),
    ColumnKind.SMALLINT: pa.int16(),
    ColumnKind.BOOLEAN: pa.bool_(),
    ColumnKind.DOUBLE: pa.float64(),
    ColumnKind.REAL: pa.float32(),
    ColumnKind.TIMESTAMPTZ: pa.timestamp("ms", tz="UTC"),
    ColumnKind.TIMESTAMP: pa.timestamp("ms"),
    ColumnKind.DATE: pa.date32(),
    ColumnKind.TEXT_ARRAY: pa.list_(pa.string()),
    ColumnKind.JSON: pa.string(),
    ColumnKind.TEXT: pa.string(),
}

# -- export_parquet --
# ORDER BY names the table's column, not the output column of the same name.
PARQUET_QUERY = "SELECT {values} FROM {table}{where} ORDER BY {table}.{order_key}"


def parquet_query(columns: list[ExportColumn], *, table: str, order_key: str, where: str = "") -> str:
    values = ", ".join(
        _PARQUET_VALUE[c.kind].format(col=finite_value(c)) + " AS " + c.sql_ident for c in columns
    )
    return PARQUET_QUERY.format(
        values=values, table=quote_ident(table), where=where, order_key=quote_ident(order_key)
    )


def arrow_schema(columns: list[ExportColumn]) -> pa.Schema:
    return pa.schema([pa.field(c.name, _ARROW_TYPE[c.kind], nullable=not c.not_null) for c in columns])


class _DrainableSink:
    """The file ParquetWriter writes to: bytes pile up until :meth:`drain` hands them over."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._position = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self._buffer += data
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        # The writer records offsets (row groups, footer) from here: the whole stream's position.
        return self._position

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def drain(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


# What one element of a text array holds beyond its characters, counted toward a row group's budget:
# a Python str object (about 50 bytes), its slot in the list, and Arrow's offset. An issue with
# 170,000 one-character labels is 170,000 such objects: counted by characters alone, a 16 MiB group of
# them took about twice the memory the budget is meant to allow.
ARRAY_ITEM_CHARS = 64


class ParquetStream:
    """``write_rows(rows) -> bytes`` per row group, then ``finish() -> bytes`` (the footer)."""

    def __init__(self, columns: list[ExportColumn], *, compression: str = "snappy") -> None:
        self.schema = arrow_schema(columns)
        self._text_columns = [
            i for i, c in enumerate(columns) if c.kind in (ColumnKind.TEXT, ColumnKind.JSON)
        ]
        self._array_columns = [i for i, c in enumerate(columns) if c.kind is ColumnKind.TEXT_ARRAY]
        self._sink = _DrainableSink()
        self._writer = pq.ParquetWriter(
            self._sink, self.schema, compression=compression, version="2.6", write_statistics=True
        )

    def text_bytes(self, row: Sequence[Any]) -> int:
        """About how much a row's text, JSON and text-array values hold (characters, not UTF-8
        bytes, and :data:`ARRAY_ITEM_CHARS` per array element): what makes a row group big."""
        size = sum(len(row[i]) for i in self._text_columns if row[i] is not None)
        for i in self._array_columns:
            if row[i] is not None:  # a list of text, or of lists for a value only SQL can store
                size += sum(len(item) if isinstance(item, str) else len(str(item)) for item in row[i])
                size += ARRAY_ITEM_CHARS * len(row[i])
        return size

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> bytes:
        if rows:
            arrays = [
                self._array(list(values), field, rows)
                for values, field in zip(zip(*rows, strict=True), self.schema, strict=True)
            ]
            batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
            self._writer.write_batch(batch, row_group_size=len(rows))
        return self._sink.drain()

    def _array(self, values: list[Any], field: pa.Field, rows: Sequence[Sequence[Any]]) -> pa.Array:
        """The column's values as Arrow's type; an :class:`ExportError` naming the column and the row
        for a value that type cannot hold (one that only SQL written by hand can store, such as a
        multi-dimensional labels array), rather than a crash."""
        try:
            return pa.array(values, type=field.type)
        except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
            bad = next((i for i, value in enumerate(values) if not self._fits(value, field)), 0)
            names = self.schema.names
            row = f"issue_id {rows[bad][names.index('issue_id')]}" if "issue_id" in names else f"row {bad}"
            raise ExportError(
                f"{field.name} of {row} cannot be written to Parquet as {field.type} "
                f"({one_line(str(exc))}); correct the row, or export it as CSV"
            ) from None

    @staticmethod
    def _fits(value: Any, field: pa.Field) -> bool:
        try:
            pa.array([value], type=field.type)
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            return False
        return True

    def finish(self) -> bytes:
        self._writer.close()
        return self._sink.drain()
