"""Reading the table and writing it, as CSV or Parquet, into a multipart upload as it is read: the
part of an export that streams (exporter/run.py runs it inside a run and publishes the result)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from exporter.columns import ORDER_KEY, TABLE, ExportColumn
from exporter.copy_stream import copy_csv
from exporter.csv_format import GzipStream, csv_query
from exporter.multipart import MultipartUpload
from exporter.progress import Progress
from exporter.settings import ExporterSettings, ExportFormat


async def stream_csv(
    settings: ExporterSettings,
    source: asyncpg.Connection,
    columns: list[ExportColumn],
    where: str,
    args: Sequence[Any],
    upload: MultipartUpload,
    progress: Progress,
) -> int:
    """COPY the rows as CSV (gzipped for csv.gz) into ``upload``; returns how many rows."""
    query = csv_query(columns, table=TABLE, order_key=ORDER_KEY, where=where)
    gzip = GzipStream(settings.gzip_level) if settings.format is ExportFormat.CSV_GZ else None
    header_pending = True

    async def sink(chunk: bytes) -> None:
        nonlocal header_pending
        # Text is newline-safe, so every line feed ends a row (the first one ends the header).
        lines = chunk.count(b"\n")
        rows, header_pending = (lines - 1, False) if header_pending and lines else (lines, header_pending)
        progress.read(rows=rows, source_bytes=len(chunk))
        await upload.write(gzip.compress(chunk) if gzip else chunk)

    rows = await copy_csv(source, query, args, sink)
    if gzip:
        await upload.write(gzip.finish())
    return rows


# A Parquet row group ends at JIRALAKE_EXPORT_PARQUET_ROWS_PER_GROUP rows or once its text values
# (text arrays included) reach PARQUET_GROUP_BYTES (counted in characters), whichever comes first:
# encoding a group takes several times the size of its values, and 10,000 rows of 15 KB issues (raw
# is always in Parquet) took 1.3 GiB. A group is cut at the row that reaches the budget, also inside
# a fetch (the rest starts the next group), so it overshoots by at most one row. A fetch is held
# whole: it is sized to fit what is left of the budget at the larger of the text per row seen so far
# and in the last fetch (so small rows before large ones do not make the first fetch of large ones
# huge), and it is at most PARQUET_FETCH_ROWS. The first fetch is one row, to learn: a first fetch of
# 20 rows of 1.7 MB issues held twice the group's budget before anything was known.
PARQUET_GROUP_BYTES = 16 * 1024 * 1024
PARQUET_FETCH_ROWS = 100
PARQUET_FIRST_FETCH_ROWS = 1


def _parquet_fetch_rows(*, room_rows: int, room_bytes: int, per_row: float | None) -> int:
    """How many rows to fetch next: at most ``room_rows``, and what ``room_bytes`` holds at
    ``per_row`` characters a row (None: nothing seen yet); at least one."""
    if per_row is None:
        return min(PARQUET_FIRST_FETCH_ROWS, room_rows)
    return max(1, min(PARQUET_FETCH_ROWS, room_rows, int(room_bytes // max(1.0, per_row))))


async def stream_parquet(
    settings: ExporterSettings,
    source: asyncpg.Connection,
    columns: list[ExportColumn],
    where: str,
    args: Sequence[Any],
    upload: MultipartUpload,
    progress: Progress,
) -> int:
    """The rows as Parquet row groups (below) into ``upload``, through a server-side cursor; returns
    how many rows."""
    # Imported here: pyarrow costs ~40 MiB of memory, which CSV exports should not pay.
    from exporter.parquet_format import ParquetStream, parquet_query

    query = parquet_query(columns, table=TABLE, order_key=ORDER_KEY, where=where)
    stream = ParquetStream(columns, compression=settings.parquet_compression)
    cursor = await source.cursor(query, *args)
    rows = 0
    group: list[asyncpg.Record] = []
    group_bytes = 0
    seen_rows = seen_bytes = 0
    per_row: float | None = None

    async def write_group() -> None:
        nonlocal rows, group, group_bytes
        data = stream.write_rows(group)
        rows += len(group)
        progress.read(rows=len(group), source_bytes=len(data))
        await upload.write(data)
        group, group_bytes = [], 0

    while True:
        wanted = _parquet_fetch_rows(
            room_rows=settings.parquet_rows_per_group - len(group),
            room_bytes=PARQUET_GROUP_BYTES - group_bytes,
            per_row=per_row,
        )
        batch = await cursor.fetch(wanted)
        batch_bytes = 0
        for record in batch:
            size = stream.text_bytes(record)
            batch_bytes += size
            group.append(record)
            group_bytes += size
            if len(group) >= settings.parquet_rows_per_group or group_bytes >= PARQUET_GROUP_BYTES:
                await write_group()
        if batch:
            seen_rows += len(batch)
            seen_bytes += batch_bytes
            per_row = max(seen_bytes / seen_rows, batch_bytes / len(batch))
        if len(batch) < wanted:
            break
    if group:
        await write_group()
    await upload.write(stream.finish())
    return rows
