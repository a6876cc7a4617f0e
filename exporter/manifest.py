"""The small JSON manifest written beside each exported object, last, once the object is in place.

Its name starts with ``_`` so Athena never reads it as data. A reader can check an object against its
manifest (``etag``, ``sha256``, ``bytes``): if a later run replaced the object but failed before
writing its own manifest, the ETags differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from exporter.columns import TABLE, ExportColumn
from exporter.csv_format import ATHENA_DECODE
from exporter.settings import ExportFormat

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ManifestFacts:
    run_id: int
    mode: str
    format: ExportFormat
    rows: int
    bytes: int
    sha256: str
    etag: str
    parts: int
    started_at: datetime
    finished_at: datetime
    watermark_xid8: int
    since_xid8: int | None
    columns: list[ExportColumn]


def manifest_document(
    facts: ManifestFacts, *, object_uri: str, source_uri: str | None = None
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "table": TABLE,
        "run_id": facts.run_id,
        "mode": facts.mode,
        "format": facts.format.value,
        "object": object_uri,
        "rows": facts.rows,
        "bytes": facts.bytes,
        "sha256": facts.sha256,
        "etag": facts.etag,
        "parts": facts.parts,
        "started_at": _iso(facts.started_at),
        "finished_at": _iso(facts.finished_at),
        "watermark_xid8": facts.watermark_xid8,
        "columns": [
            {"name": c.name, "postgres_type": c.pg_type, "athena_type": c.kind.athena_type}
            for c in facts.columns
        ],
    }
    if source_uri is not None:
        doc["copied_from"] = source_uri
    if facts.mode == "changes":
        doc["changed_since_xid8"] = facts.since_xid8
    if facts.format.is_csv:
        doc["csv"] = {
            "header": True,
            "separator": ",",
            "quote": '"',
            "null": "empty unquoted field (every non-NULL value is quoted)",
            "timestamps": "UTC, YYYY-MM-DD HH:MM:SS.mmm",
            "arrays": "JSON arrays, with the text escapes: decode, then parse",
            "text_escapes_in_file": {"\\": "\\\\\\\\", "LF": "\\\\n", "CR": "\\\\r"},
            "athena_decode": ATHENA_DECODE.format(value="col"),
        }
    return doc


async def put_manifest(s3: S3Client, *, bucket: str, key: str, document: dict[str, Any]) -> None:
    body = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    await s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
