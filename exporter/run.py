"""One export: ``ap_jira_task`` -> one S3 object (+ the latest/ copy) -> manifests -> run recorded.

Consistency: the rows come from one ``REPEATABLE READ, READ ONLY`` transaction on the connection that
holds the export lock, and from a single statement inside it (``COPY (SELECT ...)`` for CSV, one
server-side cursor over one SELECT for Parquet): one snapshot, whatever commits meanwhile.

Atomicity, in order: (1) the data object is written by a multipart upload, which S3 makes visible only
on complete, and aborts on any failure (its id is kept in ``jiralake_export_upload`` meanwhile, so that
after a SIGKILL the next run aborts it: exporter/uploads.py); (2) for a full export, that exact object
(``If-Match`` its ETag) is copied server-side to latest/, which readers see switch from the old object to
the new one at once; (3) the manifests are written last; (4) the run is recorded in
``jiralake_export_run``, which advances the incremental watermark. A failure before (2) leaves latest/
untouched; a failure before (4) leaves the watermark where it was, so the next incremental run exports
those rows again rather than skip them. A stop request (SIGTERM) cancels a run only until every part
is stored; from the completion of the data object on, (1)-(4) run to their end first, and so does the
rest of the run (closing the S3 client and the connections: exporter/shutdown.py,
``finish_before_stopping``), so a stop never leaves latest/ ahead of its manifest, nor a published run
recorded as failed or reported as stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from exporter import run_log
from exporter.columns import ExportColumn, read_columns, select_columns
from exporter.errors import ExportLocked, failure_reason
from exporter.layout import ExportLayout
from exporter.lock import acquire_export_lock, confirm_export_lock
from exporter.manifest import ManifestFacts, manifest_document, put_manifest
from exporter.multipart import MultipartUpload, cleanup_failure, copy_object
from exporter.progress import Progress, ProgressListener
from exporter.settings import ExporterSettings, ExportFormat
from exporter.shutdown import CLEANUP_CALL_TIMEOUT_S, finish_before_stopping, finish_cleanup
from exporter.streaming import stream_csv, stream_parquet
from exporter.uploads import UploadLedger, abort_leftover_uploads
from shared import aws, db
from shared.metrics import EXPORT_BYTES, EXPORT_FAILURES, EXPORT_LAST_SUCCESS, EXPORT_ROWS, EXPORT_SECONDS

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = structlog.get_logger()

Clock = Callable[[], datetime]

# -- begin_export_transaction --
BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

# -- export_snapshot --
# The transaction's snapshot, taken by this first statement. xmax8 anchors each row's 32-bit xmin to a
# 64-bit transaction id. watermark8, the next run's starting point, is the oldest transaction the
# snapshot saw running (it cannot see their rows), or xmax8 if none: every row this export could not
# see was written by a transaction at or above it. Transactions of other databases are left out when
# pg_stat_activity (read after the snapshot was taken) shows them still running there, so a busy
# neighbour on a shared server does not hold the watermark back; if in doubt, a transaction counts.
EXPORT_SNAPSHOT = """
WITH snapshot AS (SELECT pg_current_snapshot() AS snap),
other_databases AS (
    SELECT backend_xid::text::bigint AS xid32 FROM pg_stat_activity
    WHERE backend_xid IS NOT NULL AND datname IS NOT NULL AND datname <> current_database()
)
SELECT
    pg_snapshot_xmax(snap)::text::bigint AS xmax8,
    pg_snapshot_xmin(snap)::text::bigint AS xmin8,
    coalesce(
        (SELECT min(x::text::bigint) FROM pg_snapshot_xip(snap) AS x
         WHERE (x::text::bigint & 4294967295) NOT IN (SELECT xid32 FROM other_databases)),
        pg_snapshot_xmax(snap)::text::bigint
    ) AS watermark8
FROM snapshot
"""

# -- changed_since --
# Rows whose last writing transaction has an id at or above the previous run's watermark ($1): every
# transaction that run's snapshot could not see has such an id (subtransactions too: their ids follow
# their parent's), so no row committed while the previous export ran is skipped. A row written just
# before it by a transaction newer than the oldest one then running may be exported twice. The row's
# 32-bit xmin is widened to 64 bits with the epoch of this snapshot's xmax ($2).
CHANGED_SINCE = """
WHERE (
    ((($2::bigint >> 32) - CASE WHEN xmin::text::bigint > ($2::bigint & 4294967295) THEN 1 ELSE 0 END) << 32)
    | xmin::text::bigint
) >= $1::bigint"""


@dataclass(frozen=True)
class ExportResult:
    run_id: int
    mode: str  # "full" or "changes"
    format: ExportFormat
    rows: int
    bytes: int
    sha256: str
    parts: int
    data_key: str  # history/dt=... (full) or changes/dt=... (changes)
    latest_key: str | None
    manifest_keys: tuple[str, ...]
    started_at: datetime
    finished_at: datetime
    duration_s: float
    watermark_xid8: int
    since_xid8: int | None


def utc_now() -> datetime:
    return datetime.now(UTC)


async def export_once(
    settings: ExporterSettings,
    *,
    changed_since_last: bool = False,
    clock: Clock = utc_now,
    on_progress: ProgressListener | None = None,
) -> ExportResult:
    """Run one export now. Raises :class:`~exporter.errors.ExportLocked` if another is running, and
    re-raises any failure after aborting the upload and recording the run as failed. Every failure
    counts in ``jiralake_export_failures_total``, also one before the run could be recorded (PostgreSQL
    unreachable, no schema): the export-failure alert must not depend on where a run failed."""
    mode = "changes" if changed_since_last else "full"
    attempt = _Attempt()
    try:
        return await _export_under_lock(
            settings, mode=mode, clock=clock, on_progress=on_progress, attempt=attempt
        )
    except ExportLocked:
        raise  # another export is running: a skipped run, not a failed one
    except BaseException as exc:
        EXPORT_FAILURES.inc()
        # One line for every failure, also one before the run row existed (PostgreSQL unreachable).
        log.error(
            "export_failed",
            reason=_failure_text(exc),
            interrupted=isinstance(exc, asyncio.CancelledError),
            run_id=attempt.run_id,
            run_recorded=attempt.run_id is not None,
            export_mode=mode,
            export_format=settings.format.value,
        )
        raise


@dataclass
class _Attempt:
    # The run's row in jiralake_export_run, once it exists (its failure is recorded there too).
    run_id: int | None = None


def _failure_text(exc: BaseException) -> str:
    """A failed run's reason, as its row and its export_failed line give it."""
    if isinstance(exc, asyncio.CancelledError):
        return "interrupted (stop requested)"
    return failure_reason(exc) or repr(exc)


async def _export_under_lock(
    settings: ExporterSettings,
    *,
    mode: str,
    clock: Clock,
    on_progress: ProgressListener | None,
    attempt: _Attempt,
) -> ExportResult:
    source = await open_source(settings)
    try:
        await acquire_export_lock(source)
        control = await _connect(settings)
        try:
            with structlog.contextvars.bound_contextvars(
                export_mode=mode, export_format=settings.format.value
            ):
                return await _locked_export(
                    settings, source, control, mode=mode, clock=clock, listener=on_progress, attempt=attempt
                )
        finally:
            await db.close(control)
    finally:
        # Closing the session releases the advisory lock.
        await db.close(source)


# The rows are read in key order, so a parallel plan is a Gather Merge that still funnels every row
# through one backend, which formats and sends it: measured on the bench table, the parallel workers
# added 20-40% to PostgreSQL's CPU and ~10% to the export's time, for a COPY no faster alone.
#
# The export lock goes with this session, so the server should notice soon when the exporter's host
# is gone (a lost instance sends no FIN): TCP keepalives after 60 s idle, every 10 s, 6 unanswered
# end the session in about 2 minutes; the server's defaults (the OS's, often 2 hours) kept the lock,
# and every export was skipped as "another export is running", that long.
#
# A Parquet read is idle in its transaction while parts upload, so a server-side (role or database)
# idle_in_transaction_session_timeout would end it mid-export: off for this session.
SOURCE_SERVER_SETTINGS = {
    "max_parallel_workers_per_gather": "0",
    "idle_in_transaction_session_timeout": "0",
    "tcp_keepalives_idle": "60",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "6",
}


async def open_source(settings: ExporterSettings) -> asyncpg.Connection:
    """The connection that holds the export lock and reads the rows (one backend, no parallel workers)."""
    return await _connect(settings, server_settings=SOURCE_SERVER_SETTINGS)


async def _connect(settings: ExporterSettings, **kwargs: Any) -> asyncpg.Connection:
    """A connection of the run. Each sits idle for long stretches while the other works (the run's
    bookkeeping connection through the whole read, the reading one through the completion and the
    copy to latest/), so a server-side idle_session_timeout (PostgreSQL 14+, set for the role or
    database) is turned off for the session: it would end the run's session mid-run, and with the
    reading one the export lock."""
    conn = await db.connect(settings.database, **kwargs)
    if conn.get_server_version() >= (14,):
        await conn.execute("SET idle_session_timeout = 0")
    return conn


async def _locked_export(
    settings: ExporterSettings,
    source: asyncpg.Connection,
    control: asyncpg.Connection,
    *,
    mode: str,
    clock: Clock,
    listener: ProgressListener | None,
    attempt: _Attempt,
) -> ExportResult:
    started_at = clock().astimezone(UTC)
    started_monotonic = time.monotonic()
    abandoned = await run_log.abandon_unfinished(control, started_at)
    if abandoned:
        log.warning("export_runs_abandoned", count=abandoned)
    # Uploads a killed exporter left open: aborted now, while the lock says no export is running.
    cleared = await abort_leftover_uploads(control, settings.aws)
    if cleared:
        log.info("leftover_uploads_cleared", count=cleared)
    columns = select_columns(
        await read_columns(source),
        include_raw=settings.include_raw or settings.format is ExportFormat.PARQUET,
    )
    destination = f"s3://{settings.bucket}/{settings.prefix}"
    server_id = await run_log.server_id(control)
    since = (
        _watermark_to_start_from(
            await run_log.last_watermark(control, destination=destination, format=settings.format.value),
            server_id,
        )
        if mode == "changes"
        else None
    )
    run_id = await run_log.start_run(
        control,
        mode=mode,
        format=settings.format.value,
        destination=destination,
        started_at=started_at,
        since_xid8=since,
        server_id=server_id,
    )
    attempt.run_id = run_id
    with structlog.contextvars.bound_contextvars(run_id=run_id):
        log.info("export_started", bucket=settings.bucket, since_xid8=since, columns=len(columns))
        try:
            result = await _export(
                settings, source, control, run_id=run_id, mode=mode, columns=columns, since=since,
                started_at=started_at, started_monotonic=started_monotonic, clock=clock, listener=listener,
            )  # fmt: skip
        except BaseException as exc:
            EXPORT_SECONDS.observe(time.monotonic() - started_monotonic)
            # To its end even if a stop arrives meanwhile; the failure that came first is what is raised.
            await finish_cleanup(
                _record_failure(control, run_id, clock().astimezone(UTC), _failure_text(exc)),
                after=exc,
                name="export-record-failure",
            )
            raise
    EXPORT_ROWS.inc(result.rows)
    EXPORT_BYTES.inc(result.bytes)
    EXPORT_SECONDS.observe(result.duration_s)
    EXPORT_LAST_SUCCESS.labels(mode).set(result.finished_at.timestamp())
    log.info(
        "export_finished",
        run_id=result.run_id,
        rows=result.rows,
        bytes=result.bytes,
        parts=result.parts,
        duration_s=round(result.duration_s, 3),
        object=f"s3://{settings.bucket}/{result.data_key}",
        latest=f"s3://{settings.bucket}/{result.latest_key}" if result.latest_key else None,
    )
    return result


def _watermark_to_start_from(last: run_log.Watermark | None, server_id: str | None) -> int | None:
    """The last run's watermark, unless it is another server's transaction id: the database moved
    (pg_dump/pg_restore, logical replication), and what changed since cannot be told, so every row
    goes out, as on a first run. Read against this server's ids, restored rows older than the
    watermark would never be exported."""
    if last is None:
        return None
    if last.server_id is not None and server_id is not None and last.server_id != server_id:
        log.warning(
            "export_watermark_from_another_server",
            since_xid8=last.xid8,
            watermark_server_id=last.server_id,
            server_id=server_id,
        )
        return None
    return last.xid8


async def _export(
    settings: ExporterSettings,
    source: asyncpg.Connection,
    control: asyncpg.Connection,
    *,
    run_id: int,
    mode: str,
    columns: list[ExportColumn],
    since: int | None,
    started_at: datetime,
    started_monotonic: float,
    clock: Clock,
    listener: ProgressListener | None,
) -> ExportResult:
    layout = ExportLayout(bucket=settings.bucket, prefix=settings.prefix, format=settings.format)
    data_key = (
        layout.history_key(started_at.date()) if mode == "full" else layout.changes_key(started_at, run_id)
    )
    progress = Progress(listener)
    ledger = UploadLedger(control, run_id)
    async with aws.s3_client(settings.aws, max_pool=settings.parts_in_flight + 4) as s3:
        async with MultipartUpload(
            s3,
            bucket=settings.bucket,
            key=data_key,
            part_size_bytes=settings.part_size_bytes,
            parts_in_flight=settings.parts_in_flight,
            content_type=layout.content_type,
            on_part_stored=progress.part_stored,
            recorder=ledger,
        ) as upload:
            # Not `async with conn.transaction()`: after a failed or cancelled COPY its ROLLBACK would
            # raise over the real error. On failure the connection is closed, which rolls back.
            await source.execute(BEGIN_SNAPSHOT)
            snapshot = await source.fetchrow(EXPORT_SNAPSHOT)
            assert snapshot is not None
            if since is not None and since > snapshot["xmax8"]:
                # Ahead of every transaction id this server has given out: the database was restored
                # or moved to another cluster (pg_dump/pg_restore, logical replication), where ids
                # start lower. What changed since the last run cannot be told: every row goes out, as
                # on a first run. Read as is, no row would have, and the watermark would go back.
                log.warning("export_watermark_ahead", since_xid8=since, xmax8=snapshot["xmax8"])
                since = None
            where, args = ("", ()) if since is None else (CHANGED_SINCE, (since, snapshot["xmax8"]))
            if settings.format.is_csv:
                rows = await stream_csv(settings, source, columns, where, args, upload, progress)
            else:
                rows = await stream_parquet(settings, source, columns, where, args, upload, progress)
            await source.execute("COMMIT")
            await upload.send_remaining()
            await confirm_export_lock(source, before=f"completing {layout.uri(data_key)}")
            # Up to here a stop aborts the upload: readers see nothing new. From the completion on, the
            # run publishes, and a stop waits for the run to end (this block's S3 client and the
            # connections closed too): cancelled half-way, it could leave latest/ replaced and its
            # manifest not, or a published run recorded as failed or reported as stopped.
            publication = Publication(
                settings=settings, s3=s3, source=source, control=control, layout=layout, ledger=ledger,
                run_id=run_id, mode=mode, columns=columns, since=since, rows=rows,
                watermark_xid8=snapshot["watermark8"], started_at=started_at,
                started_monotonic=started_monotonic, clock=clock, progress=progress,
            )  # fmt: skip
            return await finish_before_stopping(_publish(publication, upload), name="export-publish")


@dataclass(frozen=True)
class Publication:
    """What :func:`_publish` needs of a run whose rows are all in its (not yet completed) upload."""

    settings: ExporterSettings
    s3: S3Client
    source: asyncpg.Connection  # holds the export lock
    control: asyncpg.Connection
    layout: ExportLayout
    ledger: UploadLedger
    run_id: int
    mode: str
    columns: list[ExportColumn]
    since: int | None
    rows: int
    watermark_xid8: int
    started_at: datetime
    started_monotonic: float
    clock: Clock
    progress: Progress


async def _publish(run: Publication, upload: MultipartUpload) -> ExportResult:
    """Complete the data object and write its manifest, copy it to latest/ (full exports) and write
    that manifest, record the run. Each manifest follows its object at once, so a run that fails at
    the copy leaves today's history object described by its own manifest."""
    settings, layout = run.settings, run.layout
    stored = await upload.complete()
    run.progress.finish(rows=run.rows)
    facts = ManifestFacts(
        run_id=run.run_id,
        mode=run.mode,
        format=settings.format,
        rows=run.rows,
        bytes=stored.size_bytes,
        sha256=stored.sha256,
        etag=stored.etag,
        parts=stored.parts,
        started_at=run.started_at,
        finished_at=run.clock().astimezone(UTC),
        watermark_xid8=run.watermark_xid8,
        since_xid8=run.since,
        columns=run.columns,
    )
    manifest_keys: tuple[str, ...] = (layout.manifest_key(stored.key),)
    await put_manifest(
        run.s3,
        bucket=layout.bucket,
        key=manifest_keys[0],
        document=manifest_document(facts, object_uri=stored.uri),
    )

    latest_key = None
    if run.mode == "full":
        latest_key = layout.latest_key
        await confirm_export_lock(run.source, before=f"replacing {layout.uri(latest_key)}")
        latest_etag = await copy_object(
            run.s3,
            bucket=settings.bucket,
            source=stored,
            dest_key=latest_key,
            part_size_bytes=settings.part_size_bytes,
            single_copy_max_bytes=settings.single_copy_max_bytes,
            content_type=layout.content_type,
            recorder=run.ledger,
        )
        latest_manifest = layout.manifest_key(latest_key)
        document = manifest_document(
            dataclasses.replace(facts, etag=latest_etag),
            object_uri=layout.uri(latest_key),
            source_uri=stored.uri,
        )
        await put_manifest(run.s3, bucket=layout.bucket, key=latest_manifest, document=document)
        manifest_keys += (latest_manifest,)

    finished_at = run.clock().astimezone(UTC)
    await run_log.run_succeeded(
        run.control,
        run.run_id,
        finished_at=finished_at,
        watermark_xid8=run.watermark_xid8,
        rows=run.rows,
        bytes_exported=stored.size_bytes,
        sha256=stored.sha256,
        data_key=stored.key,
        latest_key=latest_key,
        manifest_key=manifest_keys[0],
    )
    return ExportResult(
        run_id=run.run_id,
        mode=run.mode,
        format=settings.format,
        rows=run.rows,
        bytes=stored.size_bytes,
        sha256=stored.sha256,
        parts=stored.parts,
        data_key=stored.key,
        latest_key=latest_key,
        manifest_keys=manifest_keys,
        started_at=run.started_at,
        finished_at=finished_at,
        duration_s=time.monotonic() - run.started_monotonic,
        watermark_xid8=run.watermark_xid8,
        since_xid8=run.since,
    )


async def _record_failure(control: asyncpg.Connection, run_id: int, now: datetime, reason: str) -> None:
    """Mark the run failed; a row left 'running' (PostgreSQL did not answer) the next export marks
    abandoned."""
    try:
        async with asyncio.timeout(CLEANUP_CALL_TIMEOUT_S):
            await run_log.run_failed(control, run_id, finished_at=now, error=reason)
    except Exception as exc:
        log.warning("export_run_not_recorded", run_id=run_id, reason=cleanup_failure(exc, "PostgreSQL"))
