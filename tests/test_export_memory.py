"""Peak memory of an export does not grow with the table: exports of 20,000 and 80,000 rows, each in a
fresh process, peak within a few MiB of each other while the data grows by about 75 MB. (The full
measurement, with bigger tables, belongs to the benchmarks.)"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from exporter.settings import MIB, ExporterSettings, ExportFormat
from tests.test_export_support import insert_awkward_rows, settings_factory

__all__ = ["settings_factory"]  # a fixture, used by name

SMALL_ROWS, LARGE_ROWS, PAD = 20_000, 80_000, 1_000
# Generous: the larger table adds ~75 MB of CSV; holding it (or any growing fraction) would show.
MARGIN_BYTES = 24 * MIB

CHILD = """
import asyncio, json, resource, sys
from exporter.run import export_once
from exporter.settings import ExporterSettings, ExportFormat
from shared.settings import AwsSettings, DatabaseSettings

cfg = json.loads(sys.argv[1])
settings = ExporterSettings(
    aws=AwsSettings(region=cfg["region"], endpoint_url=cfg["endpoint_url"]),
    database=DatabaseSettings(url=cfg["database_url"]),
    bucket=cfg["bucket"],
    prefix=cfg["prefix"],
    format=ExportFormat(cfg["format"]),
    part_size_bytes=cfg["part_size_bytes"],
    parts_in_flight=cfg["parts_in_flight"],
    parquet_rows_per_group=cfg["parquet_rows_per_group"],
)
result = asyncio.run(export_once(settings))
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": result.rows, "bytes": result.bytes, "peak_rss_bytes": peak_kib * 1024}))
"""


async def export_in_child(settings: ExporterSettings) -> dict[str, Any]:
    cfg = {
        "region": settings.aws.region,
        "endpoint_url": settings.aws.endpoint_url,
        "database_url": settings.database.url,
        "bucket": settings.bucket,
        "prefix": settings.prefix,
        "format": settings.format.value,
        "part_size_bytes": settings.part_size_bytes,
        "parts_in_flight": settings.parts_in_flight,
        "parquet_rows_per_group": settings.parquet_rows_per_group,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, json.dumps(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("export_format", [ExportFormat.CSV, ExportFormat.PARQUET])
async def test_peak_memory_does_not_grow_with_the_table(
    pg: asyncpg.Connection, settings_factory: Callable[..., ExporterSettings], export_format: ExportFormat
) -> None:
    settings = settings_factory(
        format=export_format, part_size_bytes=5 * MIB, parts_in_flight=2, parquet_rows_per_group=2_000
    )
    # GIVEN 20,000 rows of ~1.3 KB, exported in a fresh process
    await insert_awkward_rows(pg, SMALL_ROWS, pad=PAD)
    small = await export_in_child(settings)
    # AND then 80,000 rows (four times the data), exported in another fresh process
    await insert_awkward_rows(pg, LARGE_ROWS - SMALL_ROWS, pad=PAD, first_id=SMALL_ROWS + 1)
    large = await export_in_child(settings)
    # THEN the larger export really is 4x the rows (and, as CSV, ~75 MB more; Parquet compresses the padding)
    assert (small["rows"], large["rows"]) == (SMALL_ROWS, LARGE_ROWS)
    if export_format is ExportFormat.CSV:
        assert large["bytes"] - small["bytes"] > 3 * MARGIN_BYTES
    # AND its peak memory is within the margin of the smaller one's
    grew = large["peak_rss_bytes"] - small["peak_rss_bytes"]
    assert grew < MARGIN_BYTES, f"peak RSS grew by {grew / MIB:.1f} MiB: {small} -> {large}"
