"""Settings, migrations and ``jiralake setup`` against real Postgres and moto's server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import MutableMapping
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from consumer.apply import apply_envelopes
from ops.setup import SetupSettings, run_setup
from shared import aws, migrate
from shared.envelope import (
    ATTR_ERROR_CLASS,
    ATTR_ERROR_MESSAGE,
    ENVELOPE_ATTRIBUTES,
    ERROR_ATTRIBUTES,
    ERROR_CLASS_MAX_BYTES,
    ERROR_MESSAGE_MAX_BYTES,
    MAX_ATTRIBUTES,
    error_attributes,
)
from shared.settings import AwsSettings, ConfigError, DatabaseSettings, QueueSettings, env_int
from tests.conftest import empty_database
from tests.jira_fixtures import make_event
from tests.test_consumer_helpers import envelope_of, wait_for


def test_queue_settings_name_the_missing_variable() -> None:
    with pytest.raises(ConfigError, match="JIRALAKE_QUEUE_URL"):
        QueueSettings.from_env({"JIRALAKE_DLQ_URL": "x.fifo"})


def test_integer_settings_reject_garbage() -> None:
    with pytest.raises(ConfigError, match="JIRALAKE_X must be an integer"):
        env_int({"JIRALAKE_X": "ten"}, "JIRALAKE_X", 1)


def test_aws_settings_follow_the_standard_variables() -> None:
    s = AwsSettings.from_env({"AWS_DEFAULT_REGION": "sa-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"})
    assert (s.region, s.endpoint_url) == ("sa-east-1", "http://127.0.0.1:1")


def test_database_url_is_not_in_repr() -> None:
    assert "hunter2" not in repr(DatabaseSettings(url="postgresql://u:hunter2@h/db"))


def test_every_message_fits_sqs_attribute_limit() -> None:
    assert len(ENVELOPE_ATTRIBUTES) + len(ERROR_ATTRIBUTES) <= MAX_ATTRIBUTES


def test_dead_letter_reasons_are_cut_in_bytes_never_inside_a_character() -> None:
    # GIVEN reasons quoting non-ASCII text (asyncpg quotes the value PostgreSQL refused), three
    # bytes per character, and a character SQS refuses
    attrs = error_attributes(
        error_class="Ошибка" * 100,
        error_message="\x00" + "€" * 1024,
        failed_at_iso="2024-05-10T06:00:00+00:00",
        original_group_id="10040",
    )
    error_class = attrs[ATTR_ERROR_CLASS]["StringValue"]
    message = attrs[ATTR_ERROR_MESSAGE]["StringValue"]
    # THEN each is within its byte budget, whole characters only, the refused one replaced
    assert len(error_class.encode()) <= ERROR_CLASS_MAX_BYTES and error_class == "Ошибка" * 21 + "Ош"
    assert len(message.encode()) <= ERROR_MESSAGE_MAX_BYTES and message == "\ufffd" + "€" * 340


async def test_migrations_are_idempotent(pg: asyncpg.Connection) -> None:
    # GIVEN the session database, already migrated by the fixture
    before = await pg.fetch("SELECT version, applied_at FROM jiralake_schema_migrations ORDER BY version")
    # WHEN migrations run again
    applied = await migrate.apply(pg)
    # THEN nothing is applied and nothing changes
    assert applied == []
    after = await pg.fetch("SELECT version, applied_at FROM jiralake_schema_migrations ORDER BY version")
    assert before == after
    assert [r["version"] for r in after] == [m.version for m in migrate.available()]


async def test_setup_creates_fifo_queues_with_redrive_and_is_idempotent(
    aws_settings: AwsSettings, db_settings: DatabaseSettings, unique_name: str
) -> None:
    settings = SetupSettings(
        aws=aws_settings,
        database=db_settings,
        queue_name=f"{unique_name}.fifo",
        dlq_name=f"{unique_name}-dlq.fifo",
        bucket=unique_name,
        max_receive_count=7,
    )
    first = await run_setup(settings)
    second = await run_setup(settings)
    assert first.queues == second.queues
    assert second.migrations_applied == []
    assert first.queues is not None
    async with aws.sqs_client(aws_settings) as sqs:
        attrs = (await sqs.get_queue_attributes(QueueUrl=first.queues.queue_url, AttributeNames=["All"]))[
            "Attributes"
        ]
        dlq_arn = (
            await sqs.get_queue_attributes(QueueUrl=first.queues.dlq_url, AttributeNames=["QueueArn"])
        )["Attributes"]["QueueArn"]
    assert attrs["FifoQueue"] == "true"
    assert json.loads(attrs["RedrivePolicy"]) == {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 7}
    async with aws.s3_client(aws_settings) as s3:
        await s3.head_bucket(Bucket=unique_name)


def test_setup_without_configuration_is_one_line_and_exit_2() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "jiralake", "setup"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "jiralake: configuration error: JIRALAKE_QUEUE_URL is not set "
        "(see the configuration table in README.md)"
    )


PORT_PROBLEM = "has a port that is not a number 1..65535 (percent-encode any #, ? or / in the password)"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://me:s3cret@127.0.0.1:54x2/jiralake", PORT_PROBLEM),
        ("postgresql://me:s3cret@127.0.0.1:99999/jiralake", PORT_PROBLEM),
        # a raw # in the password: the "port" would be the password's first characters
        ("postgresql://me:s3#cret@127.0.0.1:5432/jiralake", PORT_PROBLEM),
        ("mysql://me:s3cret@127.0.0.1/jiralake", "must be a postgresql:// URL"),
    ],
)
def test_a_malformed_database_url_is_one_line_without_the_password(url: str, problem: str) -> None:
    # GIVEN a DATABASE_URL asyncpg would fail on with a bare ValueError (a traceback, exit 70)
    env = {
        "PATH": "/usr/bin:/bin",
        "JIRALAKE_QUEUE_URL": "http://127.0.0.1:1/1/q.fifo",
        "JIRALAKE_DLQ_URL": "http://127.0.0.1:1/1/dlq.fifo",
        "JIRALAKE_BUCKET": "b",
        "DATABASE_URL": url,
    }
    # WHEN a command that needs the database starts
    result = subprocess.run(
        [sys.executable, "-m", "jiralake", "setup"], capture_output=True, text=True, env=env, timeout=60
    )
    # THEN one line names the problem, exit 2, and the password is not repeated
    assert result.returncode == 2
    assert result.stderr.strip() == f"jiralake: configuration error: DATABASE_URL {problem}"
    assert "s3" not in result.stderr  # not even the start of the password


def test_a_database_host_that_does_not_resolve_is_named_in_one_line_without_the_password() -> None:
    # GIVEN a DATABASE_URL whose host name no resolver knows (.invalid never resolves, RFC 6761)
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "postgresql://me:s3cret@db.jiralake.invalid:5432/x"}
    # WHEN a command that needs the database starts
    result = subprocess.run(
        [sys.executable, "-m", "jiralake", "history", "prune", "--older-than", "30", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    # THEN it exits 1 (the name may resolve later: not a configuration error) with one line naming the
    # host, which asyncpg's own error does not, and not the password
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("jiralake: gaierror: [Errno "), line
    assert line.endswith(": PostgreSQL host 'db.jiralake.invalid'"), line
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("postgresql://u:p@h1:5432,[::1]:5433/db", ["h1", "::1"]),
        ("postgres:///db?host=db.internal&port=5432", ["db.internal"]),
        ("postgresql://db.example.com/db", ["db.example.com"]),
        ("postgres:///db", []),
    ],
)
def test_the_host_names_of_a_database_url_leave_out_ports_and_credentials(url: str, names: list[str]) -> None:
    assert DatabaseSettings(url=url).host_names() == names


def test_database_urls_libpq_accepts_are_accepted() -> None:
    for url in (
        "postgresql://u:p@h1:5432,h2:5433/db",
        "postgresql://[::1]:5432/db",
        "postgres:///db?host=/var/run/postgresql",
        "postgresql://127.0.0.1/db",
    ):
        assert DatabaseSettings(url=url).url == url


# -- migration 0010: LZ4 for the JSON columns --

JSON_COLUMNS_COMPRESSION = """
SELECT attrelid::regclass::text || '.' || attname AS column_name, attcompression::text AS method
FROM pg_attribute
WHERE (attrelid, attname) IN (
    ('ap_jira_task'::regclass, 'raw'), ('ap_jira_task_event'::regclass, 'changelog')
)
ORDER BY 1
"""
LZ4_MIGRATION = 10
UPDATED_LARGE = "mattermost-plugin-jira__webhook-server-issue-updated-comment-edited.json"


async def lz4_supported(conn: asyncpg.Connection) -> bool:
    """Whether this server can compress a column with LZ4 (PostgreSQL 14+ built with it)."""
    try:
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE lz4_probe (j jsonb COMPRESSION lz4) ON COMMIT DROP")
    except (asyncpg.FeatureNotSupportedError, asyncpg.PostgresSyntaxError):
        return False
    return True


async def test_raw_and_changelog_are_written_with_lz4_where_the_server_has_it(pg: asyncpg.Connection) -> None:
    # GIVEN the migrated session database
    if int(await pg.fetchval("SHOW server_version_num")) < 140000:
        pytest.skip("PostgreSQL 13 has no per-column compression (nor pg_column_compression)")
    method, stored = ("l", "lz4") if await lz4_supported(pg) else ("", "pglz")
    # WHEN the consumer applies a full-issue event (a 47 KB body: its issue object is compressed)
    body = make_event(UPDATED_LARGE, issue_id=9001, ts=1_700_000_000_000)
    result = await apply_envelopes(pg, [envelope_of(body)])
    assert result.counts() == {"applied": 1}
    # THEN both JSON columns are declared LZ4 ('l'), and the stored raw value was compressed with it
    # (elsewhere: the server's default, pglz)
    assert [tuple(r) for r in await pg.fetch(JSON_COLUMNS_COMPRESSION)] == [
        ("ap_jira_task.raw", method),
        ("ap_jira_task_event.changelog", method),
    ]
    assert (
        await pg.fetchval("SELECT pg_column_compression(raw) FROM ap_jira_task WHERE issue_id = 9001")
        == stored
    )


async def one_migration_before_lz4(conn: asyncpg.Connection) -> None:
    """A new database migrated to the latest schema, then taken back to before migration 0010: both
    JSON columns on the server's default compression, 0010 not recorded."""
    await migrate.apply(conn)
    await conn.execute(
        "ALTER TABLE ap_jira_task ALTER COLUMN raw SET COMPRESSION default;"
        "ALTER TABLE ap_jira_task_event ALTER COLUMN changelog SET COMPRESSION default"
    )
    await conn.execute("DELETE FROM jiralake_schema_migrations WHERE version = $1", LZ4_MIGRATION)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("busy", ["ap_jira_task", "ap_jira_task_event"])
async def test_the_lz4_migration_gives_way_to_a_busy_table_and_names_it(
    pg_server_dsn: str, busy: str
) -> None:
    async with empty_database(pg_server_dsn, "lz4") as url:
        conn = await asyncpg.connect(url)
        holder = await asyncpg.connect(url)
        try:
            if not await lz4_supported(conn):
                pytest.skip("this PostgreSQL has no LZ4: migration 0010 changes nothing here")
            # GIVEN a schema one migration behind (0010 undone), and a reader holding one of the tables
            # (an export's COPY, a query over the history)
            await one_migration_before_lz4(conn)
            lock = {
                "ap_jira_task": "LOCK TABLE ap_jira_task IN ACCESS SHARE MODE",
                "ap_jira_task_event": "LOCK TABLE ap_jira_task_event IN ACCESS SHARE MODE",
            }[busy]
            await holder.execute("BEGIN; " + lock)
            # WHEN setup migrates
            with capture_logs() as logs:
                applied = await migrate.apply(conn)
            # THEN it gave up the lock after its timeout, recorded the migration and logged why
            assert [m.version for m in applied] == [LZ4_MIGRATION]
            warnings = [e for e in logs if e["event"] == "migration_warning"]
            assert warnings == [
                {
                    "event": "migration_warning",
                    "log_level": "warning",
                    "version": LZ4_MIGRATION,
                    "message": f"jiralake: {busy} was busy; raw and changelog keep pglz (see migration 0010)",
                }
            ]
            # AND both columns keep the server's default
            assert [r["method"] for r in await conn.fetch(JSON_COLUMNS_COMPRESSION)] == ["", ""]
        finally:
            await holder.close()
            await conn.close()


# -- migration 0011: infinite due dates back to Jira's dates --

FINITE_DUE_DATES_MIGRATION = 11


async def test_due_dates_stored_as_infinity_become_the_dates_jira_sent(pg_server_dsn: str) -> None:
    async with empty_database(pg_server_dsn, "due") as url:
        conn = await asyncpg.connect(url)
        try:
            # GIVEN a schema one migration behind, holding four issues whose due dates were stored
            # by an older consumer: infinity (Jira's 9999-12-31), -infinity (0001-01-01), a plain date,
            # none
            await migrate.apply(conn)
            await conn.execute(
                "DELETE FROM jiralake_schema_migrations WHERE version = $1", FINITE_DUE_DATES_MIGRATION
            )
            for issue_id in (1, 2, 3, 4):
                body = make_event(UPDATED_LARGE, issue_id=issue_id, ts=1_700_000_000_000)
                assert (await apply_envelopes(conn, [envelope_of(body)])).counts() == {"applied": 1}
            await conn.execute(
                "UPDATE ap_jira_task SET due_date = CASE issue_id WHEN 1 THEN 'infinity'::date "
                "WHEN 2 THEN '-infinity'::date WHEN 3 THEN DATE '2024-05-31' END"
            )
            # WHEN setup migrates
            applied = await migrate.apply(conn)
            # THEN the infinite ones hold the dates Jira sent; the others are unchanged (as text:
            # asyncpg reads infinity and 9999-12-31 alike)
            assert [m.version for m in applied] == [FINITE_DUE_DATES_MIGRATION]
            rows = await conn.fetch("SELECT issue_id, due_date::text AS due FROM ap_jira_task ORDER BY 1")
            assert [(r["issue_id"], r["due"]) for r in rows] == [
                (1, "9999-12-31"),
                (2, "0001-01-01"),
                (3, "2024-05-31"),
                (4, None),
            ]
        finally:
            await conn.close()


@pytest.mark.timeout(60)
async def test_the_lz4_migration_run_by_a_role_that_does_not_own_the_tables_says_so(
    pg_server_dsn: str,
) -> None:
    async with empty_database(pg_server_dsn, "lz4owner") as url:
        conn = await asyncpg.connect(url)
        role = f"jiralake_grantee_{uuid.uuid4().hex[:8]}"
        try:
            if not await lz4_supported(conn):
                pytest.skip("this PostgreSQL has no LZ4: migration 0010 changes nothing here")
            try:
                await conn.execute(f"CREATE ROLE {role} LOGIN")
            except asyncpg.InsufficientPrivilegeError:
                pytest.skip("the test server's role may not create roles")
            # GIVEN a schema one migration behind (0010 undone), and a role granted every right on the
            # tables, which it does not own
            await one_migration_before_lz4(conn)
            await conn.execute(
                f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};"
                f"GRANT USAGE, CREATE ON SCHEMA public TO {role}"
            )
            grantee = await asyncpg.connect(url, user=role)
            try:
                # WHEN setup migrates as that role
                with capture_logs() as logs:
                    applied = await migrate.apply(grantee)
            finally:
                await grantee.close()
            # THEN the optimisation is skipped with a warning, and setup goes on
            assert [m.version for m in applied] == [LZ4_MIGRATION]
            assert [e["message"] for e in logs if e["event"] == "migration_warning"] == [
                "jiralake: only the tables' owner may change their compression; raw and changelog keep "
                "pglz (see migration 0010)"
            ]
        finally:
            if await conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
            await conn.close()


async def test_an_index_of_0008_s_name_on_another_column_stops_setup_with_a_message(
    pg_server_dsn: str,
) -> None:
    async with empty_database(pg_server_dsn, "idx0008") as url:
        conn = await asyncpg.connect(url)
        try:
            # GIVEN a schema one migration behind 0008 and an index of its name built on another column
            await migrate.apply(conn)
            await conn.execute(
                "DROP INDEX ap_jira_task_event_ingested_at_idx;"
                "CREATE INDEX ap_jira_task_event_ingested_at_idx ON ap_jira_task_event (received_at)"
            )
            await conn.execute("DELETE FROM jiralake_schema_migrations WHERE version >= 8")
            # WHEN setup migrates, THEN it stops there and says what to do, rather than record 0008
            with pytest.raises(asyncpg.RaiseError, match="is not a plain index on ap_jira_task_event"):
                await migrate.apply(conn)
            assert await conn.fetchval("SELECT max(version) FROM jiralake_schema_migrations") == 7
        finally:
            await conn.close()


@pytest.mark.timeout(60)
async def test_a_connection_ended_during_a_migration_fails_with_the_server_s_reason(
    pg_server_dsn: str,
) -> None:
    async with empty_database(pg_server_dsn, "terminated") as url:
        conn = await asyncpg.connect(url)
        admin = await asyncpg.connect(url)
        try:
            # GIVEN a schema one migration behind (0010 undone) whose table another session holds, so
            # the migration waits on it
            await one_migration_before_lz4(conn)
            await admin.execute("BEGIN; LOCK TABLE ap_jira_task IN ACCESS SHARE MODE")
            migrating = asyncio.create_task(migrate.apply(conn))
            pid = conn.get_server_pid()

            async def waiting() -> bool:
                return bool(
                    await admin.fetchval(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                    )
                )

            for _ in range(200):
                if await waiting():
                    break
                await asyncio.sleep(0.02)
            # WHEN the server ends that connection (an operator, a failover)
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            # THEN the error is the server's own reason, not "the connection is closed" raised over it
            with pytest.raises(
                asyncpg.ConnectionDoesNotExistError,
                match="terminating connection due to administrator command",
            ):
                await migrating
        finally:
            await admin.close()
            await conn.close()


MIGRATION_LOCK_HELD = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = $1 AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


async def one_migration_before_0008(conn: asyncpg.Connection) -> None:
    await migrate.apply(conn)
    await conn.execute("DROP INDEX ap_jira_task_event_ingested_at_idx")
    await conn.execute("DELETE FROM jiralake_schema_migrations WHERE version >= 8")


@pytest.mark.timeout(90)
async def test_sigterm_during_setup_rolls_the_migration_back_on_the_server_and_exits_143(
    pg_server_dsn: str,
) -> None:
    async with empty_database(pg_server_dsn, "setupterm") as url:
        conn = await asyncpg.connect(url)
        writer = await asyncpg.connect(url)
        try:
            # GIVEN a schema one migration behind 0008 (an index build), and a consumer transaction
            # writing the history, which the build waits for
            await one_migration_before_0008(conn)
            await writer.execute("BEGIN")
            await writer.execute(
                "INSERT INTO ap_jira_task_event (delivery_id, issue_id, event_type, event_at, event_version, "
                "event_tiebreak, applied) VALUES ('d', 1, 'jira:issue_updated', now(), 1, '', true)"
            )
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "jiralake", "--log-json", "setup", "--skip-queues",
                env={**os.environ, "DATABASE_URL": url},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip

            async def migrating() -> bool:
                return bool(await conn.fetchval(MIGRATION_LOCK_HELD, migrate.LOCK_KEY))

            await wait_for(migrating, what="setup holding the migration lock")
            # WHEN setup gets SIGTERM (docker stop, a Kubernetes or ECS task stopped) while it waits
            child.send_signal(signal.SIGTERM)
            stdout, stderr = await asyncio.wait_for(child.communicate(), timeout=30)
            # THEN it exits 143 with one line, and nothing of it goes on on the server: the build was
            # cancelled and rolled back, the migration lock released, while the writer still runs
            assert child.returncode == 143, stderr
            assert stderr.decode().splitlines()[-1] == (
                "jiralake: setup stopped by SIGTERM before it finished (a migration in progress, if any, "
                "was rolled back); run setup again: it changes nothing that is already right"
            )
            await wait_for(
                lambda: has_no_migrator(conn), timeout_s=5, what="the server-side migration to end"
            )
            assert await conn.fetchval("SELECT max(version) FROM jiralake_schema_migrations") == 7
            assert await conn.fetchval("SELECT to_regclass('ap_jira_task_event_ingested_at_idx')") is None
            lines = (stdout + stderr).decode().splitlines()
            logged_lines = [json.loads(line) for line in lines if line.startswith("{")]
            assert [line["version"] for line in logged_lines if line["event"] == "migration_started"] == [8]
        finally:
            await writer.close()
            await conn.close()


async def has_no_migrator(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval(MIGRATION_LOCK_HELD, migrate.LOCK_KEY)


async def test_a_second_setup_says_it_waits_for_the_first(pg_server_dsn: str) -> None:
    async with (
        empty_database(pg_server_dsn, "twosetups") as url,
        empty_database(pg_server_dsn, "neighbour") as neighbour_url,
    ):
        conn = await asyncpg.connect(url)
        other = await asyncpg.connect(url)
        neighbour = await asyncpg.connect(neighbour_url)
        try:
            # GIVEN a setup of another database on the same server holding its own migration lock
            await neighbour.execute("SELECT pg_advisory_lock($1)", migrate.LOCK_KEY)
            # AND another setup of this database holding this one's
            await other.execute("SELECT pg_advisory_lock($1)", migrate.LOCK_KEY)
            # WHEN setup runs
            with capture_logs() as logs:
                migrating = asyncio.create_task(migrate.apply(conn))
                await wait_for(lambda: logged(logs, "waiting_for_migration_lock"), what="the waiting line")
                await other.execute("SELECT pg_advisory_unlock($1)", migrate.LOCK_KEY)
                applied = await asyncio.wait_for(migrating, timeout=60)
            # THEN it said it waits and for whom, then applied every migration, each announced first
            [waiting] = [line for line in logs if line["event"] == "waiting_for_migration_lock"]
            assert waiting["holder_pid"] == other.get_server_pid()
            started = [line["version"] for line in logs if line["event"] == "migration_started"]
            assert started == [m.version for m in applied] == [m.version for m in migrate.available()]
        finally:
            await neighbour.close()
            await other.close()
            await conn.close()


async def logged(logs: list[MutableMapping[str, Any]], event: str) -> bool:
    return any(line["event"] == event for line in logs)
