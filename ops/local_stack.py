"""``jiralake up``: the whole pipeline on this machine, in one process with one log stream.

An embedded moto server (SQS + S3), ``setup``, then the receiver, the consumer and the scheduled
exporter together; PostgreSQL from ``DATABASE_URL``, else the local server, else a private one started
from the machine's binaries. ``--demo`` also sends the real sample webhooks (signed), waits until they
are applied, runs one export and prints the table and the S3 keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from consumer.service import run_consumer
from consumer.settings import ConsumerSettings
from exporter.run import ExportResult, export_once
from exporter.schedule import run_on_schedule
from exporter.settings import ExporterSettings
from ops import demo
from ops.local_aws import LocalAws, free_port
from ops.local_postgres import LocalPostgres, local_postgres
from ops.setup import SetupSettings, run_setup
from receiver.main import serve as serve_receiver
from receiver.settings import ReceiverSettings
from shared.errors import CommandError
from shared.logging import redact_text
from shared.settings import AwsSettings, DatabaseSettings, QueueSettings, env_str
from shared.shutdown import StopRequest, signal_exit_code, stop_on_signals

log = structlog.get_logger()

QUEUE_NAME = "jiralake-events.fifo"
DLQ_NAME = "jiralake-events-dlq.fifo"
BUCKET = "jiralake-local"
REGION = "us-east-1"
# moto accepts any credentials; these placeholders satisfy the AWS SDK's chain inside this process
# only, so real credentials from the environment are never sent to the local endpoint.
_LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "jiralake-local", "AWS_SECRET_ACCESS_KEY": "jiralake-local"}
# How long --demo waits for the consumer to apply the sample webhooks (--demo-timeout).
DEFAULT_DEMO_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class StackOptions:
    scratch_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    demo: bool = False
    keep_running: bool = False
    fixtures_dir: Path | None = None
    export_schedule: str = "*/15 * * * *"
    demo_timeout_s: float = DEFAULT_DEMO_TIMEOUT_S


@dataclass(frozen=True)
class Stack:
    receiver: ReceiverSettings
    consumer: ConsumerSettings
    exporter: ExporterSettings
    webhook_url: str
    secret_file: Path


class _Signals:
    """SIGTERM and SIGHUP (a closed terminal) for the whole of ``up``. While the stack starts, before
    its services take SIGTERM and SIGINT: they cancel the start, so what has started (moto, a private
    PostgreSQL) is stopped on the way out, as a Ctrl-C does (asyncio's own SIGINT handling). Once the
    services run (:meth:`serving`), SIGHUP stops them like SIGTERM does."""

    HANDLED = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._task = asyncio.current_task()
        self._stop: StopRequest | None = None

    def serving(self, stop: StopRequest) -> None:
        self._stop = stop

    def _handle(self, sig: signal.Signals) -> None:
        if self._stop is not None:
            self._stop.request(sig)
        elif self.received is None and self._task is not None:
            log.info("signal_received", signal=sig.name, detail="stopping what has started")
            self.received = sig
            self._task.cancel()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        loop = asyncio.get_running_loop()
        for sig in self.HANDLED:
            loop.add_signal_handler(sig, self._handle, sig)
        try:
            yield self
        finally:
            for sig in self.HANDLED:
                loop.remove_signal_handler(sig)


async def run_stack(options: StackOptions, env: Mapping[str, str]) -> int:
    with _Signals().installed() as signals:
        try:
            return await _start_and_run(options, env, signals)
        except asyncio.CancelledError:
            if signals.received is None:
                raise
            raise CommandError(
                f"up stopped by {signals.received.name} while starting; what it had started is stopped",
                exit_code=signal_exit_code(signals.received),
            ) from None


async def _start_and_run(options: StackOptions, env: Mapping[str, str], signals: _Signals) -> int:
    options.scratch_dir.mkdir(parents=True, exist_ok=True)
    with _only_up_in(options.scratch_dir):
        return await _start_and_run_alone(options, env, signals)


@contextlib.contextmanager
def _only_up_in(scratch: Path) -> Iterator[None]:
    """One `up` per state folder, for as long as it runs (the lock goes with the process, also when it
    is killed): a second one would take the first one's private PostgreSQL for a leftover of a killed
    `up` and stop it, and share its webhook secret file."""
    fd = os.open(scratch / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CommandError(
                f"another `jiralake up` is running with the state folder {scratch}: stop it, or give this "
                "one another --state-dir",
                exit_code=2,
            ) from None
        yield
    finally:
        os.close(fd)


async def _start_and_run_alone(options: StackOptions, env: Mapping[str, str], signals: _Signals) -> int:
    fixtures = demo.fixtures_dir(options.fixtures_dir) if options.demo else None
    pg = await local_postgres(env.get("DATABASE_URL") or None, options.scratch_dir)
    try:
        if fixtures is not None:
            await demo.refuse_a_table_of_real_issues(pg.url, fixtures)
        with (
            _local_aws_environment(),
            LocalAws(
                log_path=options.scratch_dir / "moto.log", pid_file=options.scratch_dir / "moto.pid"
            ) as local_aws,
        ):
            stack = await _prepare(options, env, pg, local_aws)
            _print_banner(stack, options, local_aws, pg)
            return await _run(stack, options, fixtures, signals)
    finally:
        await asyncio.to_thread(pg.stop)


async def _prepare(
    options: StackOptions, env: Mapping[str, str], pg: LocalPostgres, local_aws: LocalAws
) -> Stack:
    aws = AwsSettings(region=REGION, endpoint_url=local_aws.endpoint_url)
    database = DatabaseSettings(url=pg.url)
    result = await run_setup(
        SetupSettings(aws=aws, database=database, queue_name=QUEUE_NAME, dlq_name=DLQ_NAME, bucket=BUCKET)
    )
    assert result.queues is not None
    queues = QueueSettings(queue_url=result.queues.queue_url, dlq_url=result.queues.dlq_url)
    secret, secret_file = _webhook_secret(env, options.scratch_dir)
    port = options.port or free_port(options.host)
    receiver = ReceiverSettings(
        aws=aws,
        queue_url=queues.queue_url,
        webhook_secret=secret,
        host=options.host,
        port=port,
        admin_host=options.host,
        admin_port=free_port(options.host),
    )
    consumer = ConsumerSettings(
        aws=aws,
        queue=queues,
        database=database,
        wait_time_s=1,
        admin_host=options.host,
        admin_port=free_port(options.host),
        queue_stats_interval_s=5.0,
        export_freshness_interval_s=5.0,
    )
    exporter = ExporterSettings(
        aws=aws, database=database, bucket=BUCKET, schedule=options.export_schedule, timezone="UTC"
    )
    return Stack(receiver, consumer, exporter, f"http://{options.host}:{port}/webhooks/jira", secret_file)


async def _run(stack: Stack, options: StackOptions, fixtures: Path | None, signals: _Signals) -> int:
    stop = asyncio.Event()
    services = [
        asyncio.create_task(serve_receiver(stack.receiver, stop=stop), name="receiver"),
        asyncio.create_task(run_consumer(stack.consumer, stop), name="consumer"),
        asyncio.create_task(run_on_schedule(stack.exporter, stop), name="exporter-schedule"),
    ]
    code = 0
    with stop_on_signals(stop) as request:
        signals.serving(request)
        try:
            if fixtures is not None:
                demo_code = await _demo_beside(services, _demo(stack, fixtures, options, stop), stop)
                code = signal_exit_code(request.signal) if demo_code is None else demo_code
                if options.keep_running and not stop.is_set():
                    print("\nThe stack keeps running; press Ctrl-C to stop it.", flush=True)
                else:
                    stop.set()
            done, _ = await asyncio.wait(
                [asyncio.create_task(stop.wait(), name="local-stack-stop-watcher"), *services],
                return_when="FIRST_COMPLETED",
            )
            stop.set()
        finally:
            stop.set()
            results = await asyncio.gather(*services, return_exceptions=True)
    for task, outcome in zip(services, results, strict=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            log.error("service_failed", service=task.get_name(), error=f"{type(outcome).__name__}: {outcome}")
            code = code or 1
    return code


async def _demo_beside(
    services: list[asyncio.Task[Any]], demo_run: Coroutine[Any, Any, int], stop: asyncio.Event
) -> int | None:
    """The demo's exit code; 1 at once if a service ends first (the receiver could not bind its port,
    the consumer crashed): the demo would otherwise wait, or post to whatever holds the port, and
    the service's failure would be logged only after it. None when a stop request ended it."""
    demo_task = asyncio.create_task(demo_run, name="demo")
    await asyncio.wait([demo_task, *services], return_when=asyncio.FIRST_COMPLETED)
    if demo_task.done():
        return demo_task.result()
    demo_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await demo_task
    if stop.is_set():  # Ctrl-C or SIGTERM: the services end because they were asked to
        print("The demo was stopped before it finished.", flush=True)
        return None
    ended = [task.get_name() for task in services if task.done()]
    print(f"The demo stopped: {', '.join(ended)} ended before it finished (see the logs above).", flush=True)
    return 1


async def _demo(stack: Stack, fixtures: Path, options: StackOptions, stop: asyncio.Event) -> int:
    await demo.wait_until_listening(stack.receiver.host, stack.receiver.port, timeout_s=30)
    sent = await demo.send_fixtures(stack.webhook_url, stack.receiver.webhook_secret, fixtures)
    print(
        f"\nSent {sent.total} sample webhooks: {sent.queued} queued, "
        f"{sent.ignored} ignored (not about an issue)."
    )
    if sent.failed:
        print(f"{len(sent.failed)} were refused: " + "; ".join(sent.failed[:3]))
        return 1
    applied = await demo.wait_until_applied(
        stack.consumer.database, sent.delivery_ids, options.demo_timeout_s, stop
    )
    if not applied:
        print(f"Not every queued event was applied within {options.demo_timeout_s:.0f}s; see the logs above.")
        return 1
    result: ExportResult = await export_once(stack.exporter)
    await demo.print_results(stack.consumer.database, stack.exporter, result)
    return 0


def _webhook_secret(env: Mapping[str, str], scratch: Path) -> tuple[str, Path]:
    """The secret to paste into Jira: ``JIRALAKE_WEBHOOK_SECRET``, else one generated and kept in a file
    readable only by this user (never printed or logged)."""
    path = scratch / "webhook-secret"
    configured = env_str(env, "JIRALAKE_WEBHOOK_SECRET")
    if configured:
        return configured, path
    # An empty file (a run interrupted between creating and writing it) must not become an empty
    # secret: anyone can sign with the empty key.
    try:
        existing = path.read_text() if path.exists() else ""
    except UnicodeDecodeError:
        raise CommandError(
            f"the webhook secret file {path} is not UTF-8 text: delete it (up makes a new one; then "
            "paste that into Jira) or set JIRALAKE_WEBHOOK_SECRET",
            exit_code=2,
        ) from None
    if not existing.strip():
        # os.open's mode applies only to a new file, so an existing one (left empty) is chmod-ed too.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(secrets.token_urlsafe(32))
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)  # a secret readable by others was never only ours: make it so from now on
        log.warning("webhook_secret_file_permissions_fixed", path=str(path))
    return path.read_text().strip(), path


def _print_banner(stack: Stack, options: StackOptions, local_aws: LocalAws, pg: LocalPostgres) -> None:
    from_env = env_str(os.environ, "JIRALAKE_WEBHOOK_SECRET")
    secret_from = "JIRALAKE_WEBHOOK_SECRET" if from_env else str(stack.secret_file)
    lines = [
        "jiralake local stack",
        f"  webhook URL (paste into Jira)  {stack.webhook_url}",
        f"  webhook secret                 in {secret_from}",
        f"  PostgreSQL                     {_redacted(pg.url)}  (table ap_jira_task)",
        f"  SQS + S3 (moto)                {local_aws.endpoint_url}  queue {QUEUE_NAME}, bucket {BUCKET}",
        f"  receiver metrics               http://{options.host}:{stack.receiver.admin_port}/metrics",
        f"  consumer metrics               http://{options.host}:{stack.consumer.admin_port}/metrics",
        f"  exports                        s3://{BUCKET}/{stack.exporter.prefix}/",
        f"  export schedule (UTC)          {options.export_schedule}",
    ]
    print("\n".join(lines), flush=True)


def _redacted(url: str | None) -> str:
    return "(libpq defaults)" if url is None else redact_text(url)


# Both spellings: tools read one or the other.
_NO_PROXY = ("NO_PROXY", "no_proxy")


@contextlib.contextmanager
def _local_aws_environment() -> Iterator[None]:
    """moto's placeholder credentials instead of the environment's, and moto's address (127.0.0.1)
    past any HTTP(S)_PROXY: the SDK would send the local stack's requests through the proxy."""
    names = (*_LOCAL_CREDENTIALS, "AWS_SESSION_TOKEN", "AWS_PROFILE", *_NO_PROXY)
    saved = {key: os.environ.get(key) for key in names}
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(key, None)
    os.environ.update(_LOCAL_CREDENTIALS)
    for key in _NO_PROXY:
        os.environ[key] = ",".join(filter(None, (saved[key], LocalAws.host)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
