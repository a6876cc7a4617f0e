"""``jiralake setup``: create the FIFO queue and its dead-letter queue, the bucket on a local endpoint,
and apply the Postgres migrations. Running it twice changes nothing.

Each SQS and S3 call is given up after PROMPT_CALL_TIMEOUT_S (10 s) without an answer: botocore alone
waits 30 s a try, and its retries, for each one, while a person or a deploy step waits. Setup then
stops with one line naming the call (whether SQS or S3 did it is unknown; running setup again is
safe) before it touches the database."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from exporter.settings import bucket_name
from shared import argtypes, aws, db, migrate, provision
from shared.errors import CommandError
from shared.provision import MAX_RECEIVE_COUNT, MAX_VISIBILITY_TIMEOUT_S
from shared.settings import AwsSettings, ConfigError, DatabaseSettings, env_int, env_str, require
from shared.shutdown import Stopped, run_unless_stopped, signal_exit_code, stop_on_signals
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S, Unanswered

log = structlog.get_logger()

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 2 bad arguments or configuration; 1 SQS, S3 or PostgreSQL unreachable or "
    f"refusing, or an SQS or S3 call not answered within {PROMPT_CALL_TIMEOUT_S:g} s (one line names it; "
    "the migrations come after, and running setup again is safe); 130/143 stopped by SIGINT/SIGTERM, the "
    "migration in progress, if any, rolled back (run it again to go on)."
)


@dataclass(frozen=True)
class SetupSettings:
    database: DatabaseSettings
    # The queues' part: None with --skip-queues, which needs only the database's settings.
    aws: AwsSettings | None = None
    queue_name: str | None = None
    dlq_name: str | None = None
    bucket: str | None = None
    max_receive_count: int = 5
    visibility_timeout_s: int = 60

    def __post_init__(self) -> None:
        if self.queue_name is not None and self.queue_name == self.dlq_name:
            # One queue would be its own dead-letter queue (as the consumer refuses the same URLs).
            raise ConfigError(
                f"JIRALAKE_QUEUE_URL and JIRALAKE_DLQ_URL name the same queue ({self.queue_name})"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, queues: bool = True) -> SetupSettings:
        """The settings ``setup`` reads; without ``queues`` (``--skip-queues``) only the database's."""
        database = DatabaseSettings.from_env(env)
        if not queues:
            return cls(database=database)
        bucket = env_str(env, "JIRALAKE_BUCKET")
        return cls(
            aws=AwsSettings.from_env(env),
            database=database,
            queue_name=provision.queue_name_from_url(require(env, "JIRALAKE_QUEUE_URL")),
            dlq_name=provision.queue_name_from_url(require(env, "JIRALAKE_DLQ_URL")),
            bucket=bucket_name(bucket) if bucket else None,
            max_receive_count=env_int(
                env, "JIRALAKE_MAX_RECEIVE_COUNT", 5, minimum=1, maximum=MAX_RECEIVE_COUNT
            ),
            visibility_timeout_s=env_int(
                env,
                "JIRALAKE_VISIBILITY_TIMEOUT_S",
                60,
                minimum=1,
                maximum=MAX_VISIBILITY_TIMEOUT_S,
            ),
        )


@dataclass(frozen=True)
class SetupResult:
    queues: provision.QueuePair | None
    migrations_applied: list[str]
    bucket_created_or_found: str | None


async def run_setup(
    settings: SetupSettings,
    *,
    queues: bool = True,
    database: bool = True,
    call_timeout_s: float | None = None,
) -> SetupResult:
    """Queues (and a local bucket), then the migrations. An SQS or S3 call not answered within
    ``call_timeout_s`` (None: botocore's own limits) raises :class:`Unanswered` naming it."""
    pair = None
    bucket = None
    if queues:
        if settings.aws is None or settings.queue_name is None or settings.dlq_name is None:
            raise ValueError("setting up the queues needs their settings: SetupSettings.from_env(env)")
        async with aws.sqs_client(settings.aws) as sqs:
            pair = await provision.ensure_queues(
                sqs,
                queue_name=settings.queue_name,
                dlq_name=settings.dlq_name,
                max_receive_count=settings.max_receive_count,
                visibility_timeout_s=settings.visibility_timeout_s,
                call_timeout_s=call_timeout_s,
            )
        # Buckets belong to infrastructure code in AWS; locally (moto, LocalStack) we create it.
        if settings.bucket and settings.aws.endpoint_url:
            async with aws.s3_client(settings.aws) as s3:
                await provision.ensure_bucket(
                    s3, settings.bucket, settings.aws.region, call_timeout_s=call_timeout_s
                )
            bucket = settings.bucket
    applied: list[str] = []
    if database:
        conn = await db.connect(settings.database)
        try:
            if conn.get_server_version() >= (14,):
                # A setup killed outright (SIGKILL, OOM, a lost host) ends its migration within seconds
                # instead of when the statement finishes: the server checks that the client is there.
                await conn.execute("SET client_connection_check_interval = '5s'")
            applied = [f"{m.version:04d}_{m.name}" for m in await migrate.apply(conn)]
        finally:
            await conn.close()
    return SetupResult(queues=pair, migrations_applied=applied, bucket_created_or_found=bucket)


async def _setup_unless_stopped(settings: SetupSettings, *, queues: bool, database: bool) -> SetupResult:
    """:func:`run_setup` until SIGTERM or SIGINT (``docker stop``, Kubernetes, ECS send SIGTERM): then
    the statement running on the server is cancelled and the migration in progress rolled back (and
    its locks released) before the process exits, rather than left running on the server. An SQS or S3
    call without an answer within PROMPT_CALL_TIMEOUT_S ends it with one line (exit 1)."""
    with stop_on_signals() as request:
        try:
            return await run_unless_stopped(
                run_setup(settings, queues=queues, database=database, call_timeout_s=PROMPT_CALL_TIMEOUT_S),
                request.event,
                name="setup",
            )
        except Unanswered as exc:
            not_applied = "; the migrations were not applied" if database else ""
            raise CommandError(
                f"setup stopped: {exc}; whether that call took effect is unknown{not_applied}: run setup "
                "again (it changes nothing that is already right)"
            ) from None
        except Stopped:
            signame = request.signal.name if request.signal else "a stop request"
            raise CommandError(
                f"setup stopped by {signame} before it finished (a migration in progress, if any, was rolled "
                "back); run setup again: it changes nothing that is already right",
                exit_code=signal_exit_code(request.signal),
            ) from None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "setup",
        help="create queues (and a local bucket), apply migrations",
        description="Create the FIFO queue and its dead-letter queue (and the bucket on a local endpoint), "
        "then apply the PostgreSQL migrations. Running it twice changes nothing.",
        epilog=EXIT_CODES_HELP,
    )
    only = parser.add_mutually_exclusive_group()  # both would do nothing, and say nothing
    only.add_argument("--skip-queues", action="store_true", help="only apply the Postgres migrations")
    only.add_argument("--skip-db", action="store_true", help="only create the queues (and local bucket)")
    parser.add_argument(
        "--max-receive-count",
        type=argtypes.integer(1, MAX_RECEIVE_COUNT),
        help="DLQ redrive threshold, set on the queue setup creates; not with --skip-queues (default "
        "JIRALAKE_MAX_RECEIVE_COUNT or 5)",
    )
    # Said, not ignored: --skip-queues leaves the queues, and so their redrive policy, as they are.
    argtypes.only_with(
        parser, "--max-receive-count", "when setup creates the queues, not with --skip-queues", _queues
    )
    parser.set_defaults(func=_command)


def _queues(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    return not args.skip_queues


def _command(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.max_receive_count is not None:
        env["JIRALAKE_MAX_RECEIVE_COUNT"] = str(args.max_receive_count)
    settings = SetupSettings.from_env(env, queues=not args.skip_queues)
    result = asyncio.run(
        _setup_unless_stopped(settings, queues=not args.skip_queues, database=not args.skip_db)
    )
    if result.queues:
        print(f"queue: {result.queues.queue_url}")
        print(f"dead-letter queue: {result.queues.dlq_url}")
    if result.bucket_created_or_found:
        print(f"bucket: {result.bucket_created_or_found}")
    if not args.skip_db:
        print("migrations applied: " + (", ".join(result.migrations_applied) or "none (up to date)"))
    return 0
