"""Shared test infrastructure: a real PostgreSQL database per test session and a real moto server
(HTTP) per test session, with unique queues and buckets per test.

PostgreSQL: ``DATABASE_URL`` (or libpq's PG* variables) names the server; the suite creates its own
database there and drops it afterwards. Where no server is reachable, pytest-postgresql starts a
throwaway one from the machine's PostgreSQL binaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pytest_postgresql import factories

from consumer.service import run_consumer
from consumer.settings import ConsumerSettings
from consumer.worker import ConsumerStats
from ops.local_aws import LocalAws
from shared import aws, db, migrate, provision
from shared.settings import AwsSettings, DatabaseSettings, QueueSettings
from tests.jira_api_server import JiraApiServer, serve

postgresql_proc = factories.postgresql_proc(port=None)

REGION = "us-east-1"
TABLES = ("ap_jira_task", "ap_jira_task_event")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first: pytest-xdist hands tests out in this order, so a minutes-long test
    starts while the others run beside it, rather than alone at the end (Makefile: PYTEST_WORKERS)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order


def _server_dsn() -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    # libpq's PG* variables, else the machine's local server.
    host = os.environ.get("PGHOST", "127.0.0.1")
    port = os.environ.get("PGPORT", "5432")
    user = os.environ.get("PGUSER", "postgres")
    password = os.environ.get("PGPASSWORD", "")
    dbname = os.environ.get("PGDATABASE", "postgres")
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@{host}:{port}/{dbname}"


async def _reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def _with_database(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
async def pg_server_dsn(request: pytest.FixtureRequest) -> str:
    dsn = _server_dsn()
    if await _reachable(dsn):
        return dsn
    proc = request.getfixturevalue("postgresql_proc")
    return f"postgresql://{proc.user}@{proc.host}:{proc.port}/postgres"


@contextlib.asynccontextmanager
async def empty_database(server_dsn: str, label: str) -> AsyncIterator[str]:
    """A new database without jiralake's schema on the test server, dropped afterwards; yields its URL."""
    name = f"jiralake_{label}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(server_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def database_url(pg_server_dsn: str) -> AsyncIterator[str]:
    """A fresh database for this test session, migrated to the latest schema."""
    async with empty_database(pg_server_dsn, "test") as url:
        conn = await asyncpg.connect(url)
        try:
            await migrate.apply(conn)
        finally:
            await conn.close()
        yield url


@pytest.fixture(scope="session")
def db_settings(database_url: str) -> DatabaseSettings:
    return DatabaseSettings(url=database_url)


@pytest.fixture
async def pg(db_settings: DatabaseSettings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the session database, with the jiralake tables emptied before the test."""
    conn = await db.connect(db_settings)
    existing = [
        r["tablename"]
        for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> "
            "'jiralake_schema_migrations'"
        )
    ]
    if existing:
        await conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in existing))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAws]:
    """One moto server for the whole session, reached over HTTP like real AWS."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": REGION}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(env)
    os.environ["AWS_DEFAULT_REGION"] = REGION
    server = LocalAws(log_path=tmp_path_factory.mktemp("moto") / "moto.log")
    with server:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def aws_settings(moto_server: LocalAws) -> AwsSettings:
    return AwsSettings(region=REGION, endpoint_url=moto_server.endpoint_url)


@pytest.fixture
def unique_name() -> str:
    return f"t{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def queues(aws_settings: AwsSettings, unique_name: str) -> AsyncIterator[provision.QueuePair]:
    """A fresh FIFO queue and DLQ for one test, deleted afterwards (moto slows as queues grow)."""
    async with aws.sqs_client(aws_settings) as sqs:
        pair = await provision.ensure_queues(
            sqs,
            queue_name=f"{unique_name}.fifo",
            dlq_name=f"{unique_name}-dlq.fifo",
            max_receive_count=5,
            visibility_timeout_s=30,
        )
        # Tests don't wait 20 s on an empty queue unless they ask to.
        await sqs.set_queue_attributes(
            QueueUrl=pair.queue_url, Attributes={"ReceiveMessageWaitTimeSeconds": "0"}
        )
        try:
            yield pair
        finally:
            await sqs.delete_queue(QueueUrl=pair.queue_url)
            await sqs.delete_queue(QueueUrl=pair.dlq_url)


SMALL_QUEUE_BYTES = 262_144


@pytest.fixture
async def small_queue(aws_settings: AwsSettings, unique_name: str) -> AsyncIterator[str]:
    """A FIFO queue that takes messages of at most 256 KiB (older Terraform, or made by hand, has
    such queues); yields its URL."""
    async with aws.sqs_client(aws_settings) as sqs:
        created = await sqs.create_queue(
            QueueName=f"{unique_name}-small.fifo",
            Attributes={"FifoQueue": "true", "MaximumMessageSize": str(SMALL_QUEUE_BYTES)},
        )
        try:
            yield created["QueueUrl"]
        finally:
            await sqs.delete_queue(QueueUrl=created["QueueUrl"])


@pytest.fixture
async def bucket(aws_settings: AwsSettings, unique_name: str) -> AsyncIterator[str]:
    async with aws.s3_client(aws_settings) as s3:
        await provision.ensure_bucket(s3, unique_name, aws_settings.region)
        yield unique_name


async def drain(aws_settings: AwsSettings, queue_url: str, *, max_empty: int = 2) -> list[dict[str, Any]]:
    """Every message currently on a queue, received and deleted (a test helper, not a consumer)."""
    messages: list[dict[str, Any]] = []
    empty = 0
    async with aws.sqs_client(aws_settings) as sqs:
        while empty < max_empty:
            resp = await sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=10,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
                WaitTimeSeconds=0,
            )
            batch = resp.get("Messages", [])
            if not batch:
                empty += 1
                continue
            empty = 0
            messages.extend(dict(m) for m in batch)
            await sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)],
            )
    return messages


async def consume_all(
    aws_settings: AwsSettings,
    queues: provision.QueuePair,
    db_settings: DatabaseSettings,
    *,
    pollers: int = 1,
    timeout_s: float = 45,
) -> ConsumerStats:
    """Run the real consumer until the queue has been idle for half a second (no long polls)."""
    settings = ConsumerSettings(
        aws=aws_settings,
        queue=QueueSettings(queue_url=queues.queue_url, dlq_url=queues.dlq_url),
        database=db_settings,
        pollers=pollers,
        wait_time_s=0,
        visibility_timeout_s=30,
        admin_port=None,
        queue_stats_interval_s=0,
    )
    stats = await consume_until_idle(settings, idle_s=0.5, timeout_s=timeout_s)
    assert stats.went_idle, f"the queue was not idle within {timeout_s} s"
    return stats


async def consume_until_idle(
    settings: ConsumerSettings, *, idle_s: float = 1.0, timeout_s: float = 60
) -> ConsumerStats:
    """The consumer service (no admin port, no gauge pollers) until receives have found the queue
    empty for ``idle_s`` (``went_idle``), or until ``timeout_s`` (then ``went_idle`` is False).
    Receives wait at most ``idle_s`` (rounded up to a second), so an idle queue ends the run soon."""
    settings = replace(
        settings,
        wait_time_s=min(settings.wait_time_s, max(1, math.ceil(idle_s))),
        exit_when_idle_s=idle_s,
        admin_port=None,
        queue_stats_interval_s=0,
        export_freshness_interval_s=0,
    )
    stop = asyncio.Event()
    timer = asyncio.get_running_loop().call_later(timeout_s, stop.set)
    try:
        return await run_consumer(settings, stop)
    finally:
        timer.cancel()


@pytest.fixture
async def jira() -> AsyncIterator[tuple[JiraApiServer, str]]:
    """A local server speaking the Jira REST shapes (tests/jira_api_server.py), and its URL."""
    server = JiraApiServer()
    async with serve(server) as url:
        yield server, url


FIXTURES = Path(__file__).parent / "fixtures" / "jira-webhooks"
