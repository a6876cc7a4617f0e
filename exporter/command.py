"""``jiralake export``: one export (``--once``, for cron / ECS scheduled tasks / Kubernetes CronJobs),
a long-running scheduled exporter (``--schedule "0 3 * * *" --timezone America/Sao_Paulo``), or the
Athena DDL for what it writes (``--athena-ddl``).

Exit codes: 0 done; 1 the export failed (one line says why; the upload was aborted); 2 bad
configuration; 75 another export holds the lock (try again later); 130/143 stopped by SIGINT/SIGTERM
while the export streamed (upload aborted, latest/ unchanged). A stop once the export is publishing
(completing its object, copying it to latest/, writing the manifests, recording the run) waits for the
run to end, connections closed: exit 0 and its line, or 1, as it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Mapping

import structlog

from exporter.athena_ddl import DEFAULT_PROJECTION_START, athena_ddl, validate_projection_start
from exporter.columns import read_columns, select_columns
from exporter.errors import ExportError, ExportLocked, failure_reason
from exporter.layout import ExportLayout
from exporter.progress import LogProgress, ProgressListener, TerminalProgress
from exporter.run import ExportResult, export_once
from exporter.schedule import run_on_schedule
from exporter.settings import ExporterSettings, ExportFormat
from exporter.shutdown import run_unless_stopped
from shared import argtypes, db
from shared.admin_server import admin_app, start_admin_server
from shared.errors import CommandError
from shared.settings import env_str
from shared.shutdown import Stopped, signal_exit_code, stop_on_signals

log = structlog.get_logger()

EXIT_LOCKED = 75  # EX_TEMPFAIL


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "export",
        help="stream ap_jira_task to S3 (CSV, csv.gz or Parquet), once or on a schedule",
        description="Stream ap_jira_task to S3 through a multipart upload to history/dt=YYYY-MM-DD/ and "
        "its manifest, then latest/ (atomic copy) and its manifest. Settings from JIRALAKE_* (see "
        "README.md); flags override them, and a flag the mode does not use is refused (exit 2).",
    )
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--once",
        action="store_true",
        help="run one export and exit (default unless JIRALAKE_EXPORT_SCHEDULE)",
    )
    when.add_argument(
        "--schedule",
        type=argtypes.non_blank,
        metavar="CRON",
        help='keep running; export at each time of "0 3 * * *"',
    )
    when.add_argument(
        "--athena-ddl",
        action="store_true",
        help="print CREATE EXTERNAL TABLE statements for the format, exit",
    )
    parser.add_argument(
        "--timezone",
        type=argtypes.non_blank,
        metavar="TZ",
        help="with --schedule: its IANA time zone (default JIRALAKE_EXPORT_TIMEZONE or UTC)",
    )
    parser.add_argument(
        "--format",
        choices=[f.value for f in ExportFormat],
        help="csv, csv.gz, parquet (default JIRALAKE_EXPORT_FORMAT or csv)",
    )
    parser.add_argument("--bucket", type=argtypes.non_blank, help="S3 bucket (default JIRALAKE_BUCKET)")
    parser.add_argument(
        "--prefix",
        type=prefix,
        help="key prefix in the bucket, '' or / for its root (default JIRALAKE_EXPORT_PREFIX or jiralake)",
    )
    parser.add_argument(
        "--include-raw", action="store_true", default=None, help="keep the raw webhook JSON column in CSV"
    )
    parser.add_argument(
        "--changed-since-last",
        action="store_true",
        help="only rows changed since the last successful --changed-since-last run, to changes/dt=.../ "
        "(not with --athena-ddl)",
    )
    parser.add_argument(
        "--part-size-mib",
        type=argtypes.integer(5, 5120),
        metavar="MIB",
        help="multipart part size (5..5120, default JIRALAKE_EXPORT_PART_SIZE_MIB or 8; not with "
        "--athena-ddl)",
    )
    parser.add_argument(
        "--parts-in-flight",
        type=argtypes.positive_int,
        metavar="N",
        help="parts uploaded at once (default JIRALAKE_EXPORT_PARTS_IN_FLIGHT or 4; not with --athena-ddl)",
    )
    parser.add_argument(
        "--admin-port",
        type=argtypes.port,
        metavar="PORT",
        help="with --schedule: /healthz /readyz /metrics, 0: none "
        "(default JIRALAKE_EXPORT_ADMIN_PORT or 9092)",
    )
    parser.add_argument(
        "--projection-start",
        type=projection_start,
        metavar="START",
        help="with --athena-ddl: first dt of the partition projection, YYYY-MM-DD or NOW-<n><unit> "
        f"(default {DEFAULT_PROJECTION_START})",
    )
    # Said, not ignored: each of these given where the mode chosen would not use it is a usage error.
    scheduled = "with --schedule (or JIRALAKE_EXPORT_SCHEDULE)"
    argtypes.only_with(
        parser,
        "--timezone",
        f"{scheduled}: it is the schedule's time zone; history/ is dated by the UTC day whatever it is",
        _on_schedule,
    )
    argtypes.only_with(parser, "--admin-port", scheduled, _on_schedule)
    argtypes.only_with(
        parser, "--projection-start", "with --athena-ddl: it shapes only the printed DDL", _printing_ddl
    )
    for option in ("--changed-since-last", "--part-size-mib", "--parts-in-flight"):
        argtypes.only_with(parser, option, "to an export, not with --athena-ddl", _exporting)
    parser.set_defaults(func=_command)


def _on_schedule(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    """Whether the command runs on a schedule, as :func:`settings_from_args` decides it."""
    if args.once or args.athena_ddl:
        return False
    return args.schedule is not None or env_str(environ, "JIRALAKE_EXPORT_SCHEDULE") is not None


def _printing_ddl(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    return bool(args.athena_ddl)


def _exporting(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    return not args.athena_ddl


def prefix(raw: str) -> str:
    """``--prefix``: '' is the bucket's root (as /); spaces only would be read as unset, the default."""
    if raw and not raw.strip():
        raise argparse.ArgumentTypeError("must not be blank: give '' or / for the bucket's root")
    return raw


def projection_start(raw: str) -> str:
    """``--projection-start``: what Athena's date projection accepts as the start of its range."""
    try:
        return validate_projection_start(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def settings_from_args(args: argparse.Namespace, environ: dict[str, str]) -> ExporterSettings:
    env = dict(environ)
    overrides = {
        "JIRALAKE_BUCKET": args.bucket,
        "JIRALAKE_EXPORT_PREFIX": args.prefix,
        "JIRALAKE_EXPORT_FORMAT": args.format,
        "JIRALAKE_EXPORT_PART_SIZE_MIB": args.part_size_mib,
        "JIRALAKE_EXPORT_PARTS_IN_FLIGHT": args.parts_in_flight,
        "JIRALAKE_EXPORT_SCHEDULE": args.schedule,
        "JIRALAKE_EXPORT_TIMEZONE": args.timezone,
        "JIRALAKE_EXPORT_ADMIN_PORT": args.admin_port,
        "JIRALAKE_EXPORT_INCLUDE_RAW": "true" if args.include_raw else None,
    }
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    if args.once or args.athena_ddl:
        env.pop("JIRALAKE_EXPORT_SCHEDULE", None)
    if args.prefix == "":
        env["JIRALAKE_EXPORT_PREFIX"] = "/"
    return ExporterSettings.from_env(env)


def _command(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, dict(os.environ))
    if args.athena_ddl:
        try:
            ddl = asyncio.run(
                render_ddl(settings, projection_start=args.projection_start or DEFAULT_PROJECTION_START)
            )
        except ExportError as exc:
            raise CommandError(f"cannot print the Athena DDL: {exc}") from None
        sys.stdout.write(ddl)
        return 0
    listener = _progress_listener(settings)
    if settings.schedule is not None:
        return asyncio.run(_serve(settings, changed_since_last=args.changed_since_last, listener=listener))
    result = asyncio.run(_once(settings, changed_since_last=args.changed_since_last, listener=listener))
    latest = f"; latest: s3://{settings.bucket}/{result.latest_key}" if result.latest_key else ""
    print(
        f"exported {result.rows:,} rows ({result.bytes:,} bytes, {result.format.value}) to "
        f"s3://{settings.bucket}/{result.data_key}{latest}"
    )
    return 0


async def render_ddl(settings: ExporterSettings, *, projection_start: str = DEFAULT_PROJECTION_START) -> str:
    conn = await db.connect(settings.database)
    try:
        columns = await read_columns(conn)
    finally:
        await conn.close()
    exported = select_columns(columns, include_raw=settings.include_raw or not settings.format.is_csv)
    layout = ExportLayout(bucket=settings.bucket, prefix=settings.prefix, format=settings.format)
    return athena_ddl(exported, layout, projection_start=projection_start)


async def _once(
    settings: ExporterSettings, *, changed_since_last: bool, listener: ProgressListener
) -> ExportResult:
    with stop_on_signals() as stop:
        try:
            return await run_unless_stopped(
                export_once(settings, changed_since_last=changed_since_last, on_progress=listener),
                stop.event,
                name="export",
            )
        except Stopped:
            sig = stop.signal or signal.SIGTERM
            raise CommandError(
                f"export stopped by {sig.name} before publishing: latest/ is unchanged, the multipart "
                "upload aborted (if S3 did not confirm it, the next export aborts it)",
                exit_code=signal_exit_code(sig),
            ) from None
        except ExportLocked as exc:
            raise CommandError(str(exc), exit_code=EXIT_LOCKED) from None
        except ExportError as exc:
            raise CommandError(f"export failed: {exc}") from None
        except Exception as exc:
            reason = failure_reason(exc)
            if reason is None:
                raise
            raise CommandError(f"export failed: {reason}") from None


async def _serve(settings: ExporterSettings, *, changed_since_last: bool, listener: ProgressListener) -> int:
    with stop_on_signals() as stop:
        runner = None
        if settings.admin_port is not None:
            runner = await start_admin_server(
                admin_app(lambda: _database_reachable(settings)), settings.admin_host, settings.admin_port
            )
        try:
            runs = await run_on_schedule(
                settings, stop.event, changed_since_last=changed_since_last, on_progress=listener
            )
        finally:
            if runner is not None:
                await runner.cleanup()
    log.info("exporter_stopped", signal=stop.signal.name if stop.signal else None, successful_runs=runs)
    return 0


# /readyz's whole check (connect, query, goodbye) answers within seconds: a PostgreSQL that takes the
# connection and then says nothing would otherwise hold the probe, and a stop behind it, for ever.
READINESS_TIMEOUT_S = 3.0


async def _database_reachable(settings: ExporterSettings) -> str | None:
    conn = await db.connect(settings.database, timeout=READINESS_TIMEOUT_S)
    try:
        await conn.fetchval("SELECT 1", timeout=READINESS_TIMEOUT_S)
    finally:
        await db.close(conn)
    return None


def _progress_listener(settings: ExporterSettings) -> ProgressListener:
    if sys.stderr.isatty():
        return TerminalProgress(sys.stderr)
    return LogProgress(interval_s=settings.progress_log_interval_s)
