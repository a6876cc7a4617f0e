"""The ``jiralake_export_upload`` table (migration 0005): the multipart uploads an export has open, and
the cleanup of those a killed exporter left behind.

An upload is recorded before ``CreateMultipartUpload`` (key only), its id is stored as soon as S3
returns it, and the row is deleted once S3 confirmed the upload completed or aborted. No code runs when
the process is killed (SIGKILL, OOM), so its rows stay; the next export, holding the export lock (no
other export can be running: every row is a dead one), aborts each recorded upload and deletes its row.
This needs ``s3:AbortMultipartUpload`` only, which the exporter has anyway; no listing of the bucket.

Not covered: a kill after S3 created an upload and before its id was stored (one local round trip to
PostgreSQL). The row then has no upload id; the cleanup logs ``multipart_upload_unknown`` with the key,
and the bucket's ``AbortIncompleteMultipartUpload`` lifecycle rule removes the upload.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import structlog
from botocore.exceptions import ClientError

from exporter.errors import failure_reason
from shared import aws
from shared.settings import AwsSettings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = structlog.get_logger()

# S3's answers meaning "there is no such upload (any more)": aborted, completed, or its bucket is gone.
GONE_CODES = frozenset({"NoSuchUpload", "NoSuchBucket"})

# -- upload_opening --
UPLOAD_OPENING = """
INSERT INTO jiralake_export_upload (run_id, bucket, key) VALUES ($1, $2, $3) RETURNING upload_ref
"""

# -- upload_opened --
UPLOAD_OPENED = "UPDATE jiralake_export_upload SET upload_id = $2 WHERE upload_ref = $1"

# -- upload_closed --
UPLOAD_CLOSED = "DELETE FROM jiralake_export_upload WHERE upload_ref = $1"

# -- leftover_uploads --
# Called with the export lock held: no export is running, so every recorded upload is a dead run's.
LEFTOVER_UPLOADS = """
SELECT upload_ref, run_id, bucket, key, upload_id FROM jiralake_export_upload ORDER BY upload_ref
"""


class UploadLedger:
    """Records one run's multipart uploads in ``jiralake_export_upload`` (an ``UploadRecorder``)."""

    def __init__(self, conn: asyncpg.Connection, run_id: int) -> None:
        self._conn = conn
        self._run_id = run_id

    async def opening(self, bucket: str, key: str) -> int:
        ref: int = await self._conn.fetchval(UPLOAD_OPENING, self._run_id, bucket, key)
        return ref

    async def opened(self, ref: int, upload_id: str) -> None:
        await self._conn.execute(UPLOAD_OPENED, ref, upload_id)

    async def closed(self, ref: int) -> None:
        await self._conn.execute(UPLOAD_CLOSED, ref)


async def abort_leftover_uploads(conn: asyncpg.Connection, aws_settings: AwsSettings) -> int:
    """Abort every upload recorded by a run that died; returns how many rows were cleared.

    Call with the export lock held. An upload S3 cannot abort now (unreachable, access denied) keeps its
    row, to be tried again by the next export; the lifecycle rule remains the backstop.
    """
    rows = await conn.fetch(LEFTOVER_UPLOADS)
    if not rows:
        return 0
    cleared = 0
    async with aws.s3_client(aws_settings) as s3:
        for row in rows:
            if row["upload_id"] is None:
                log.warning(
                    "multipart_upload_unknown",
                    run_id=row["run_id"],
                    bucket=row["bucket"],
                    key=row["key"],
                    reason="CreateMultipartUpload went unanswered, or the process ended around it: if S3 "
                    "created an upload, the lifecycle rule removes it",
                )
            elif not await _abort(s3, row):
                continue
            await conn.execute(UPLOAD_CLOSED, row["upload_ref"])
            cleared += 1
    return cleared


async def _abort(s3: S3Client, row: asyncpg.Record) -> bool:
    """True when the upload is gone (aborted now, or already aborted or completed)."""
    try:
        await s3.abort_multipart_upload(Bucket=row["bucket"], Key=row["key"], UploadId=row["upload_id"])
    except ClientError as exc:
        if aws.error_code(exc) in GONE_CODES:
            log.info("leftover_upload_gone", run_id=row["run_id"], key=row["key"], upload_id=row["upload_id"])
            return True
        _not_aborted(row, exc)
        return False
    except Exception as exc:
        if failure_reason(exc) is None:
            raise
        _not_aborted(row, exc)
        return False
    log.warning("leftover_upload_aborted", run_id=row["run_id"], key=row["key"], upload_id=row["upload_id"])
    return True


def _not_aborted(row: asyncpg.Record, exc: BaseException) -> None:
    log.warning(
        "leftover_upload_not_aborted",
        run_id=row["run_id"],
        bucket=row["bucket"],
        key=row["key"],
        upload_id=row["upload_id"],
        reason=failure_reason(exc),
    )
