"""deploy/postgres/grants.sql: each service does its work as a role with only the grants the script gives
it, and the analysts' role reads the two tables but not the pseudonym key (README.md, "Database")."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from backfill import state
from consumer.apply import APPLIED, apply_envelopes
from consumer.export_freshness import publish_last_export
from exporter.run import export_once
from ops import forget_user, history_prune
from ops.user_scrub import Person
from shared import db, migrate
from shared.settings import AwsSettings, DatabaseSettings
from tests.conftest import empty_database
from tests.jira_fixtures import make_event
from tests.test_consumer_helpers import envelope_of
from tests.test_export_support import make_settings

GRANTS = Path(__file__).resolve().parent.parent / "deploy" / "postgres" / "grants.sql"
SERVICES = ("consumer", "exporter", "backfill", "forget_user", "prune", "analyst")
CREATED = "mattermost-plugin-jira__webhook-issue-created.json"
PSQL = shutil.which("psql")
# grants.sql is a psql script (its role names are psql variables), run as the docs say; as the restore
# test (tests/test_deploy.py), skipped where psql is not installed.
pytestmark = pytest.mark.skipif(PSQL is None, reason="psql is not installed")


def _as_role(url: str, role: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(role, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
async def role_urls(pg_server_dsn: str) -> AsyncIterator[dict[str, str]]:
    """A migrated database, one login role per service granted by grants.sql; yields each role's URL
    (and the owner's, under "owner")."""
    assert PSQL
    suffix = secrets.token_hex(4)
    roles = {service: f"jl_{service}_{suffix}" for service in SERVICES}
    password = secrets.token_hex(16)  # made up here, for trust and password authentication alike
    async with empty_database(pg_server_dsn, "roles") as url:
        admin = await asyncpg.connect(url)
        try:
            await migrate.apply(admin)
            for role in roles.values():
                await admin.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
            variables = [arg for service, role in roles.items() for arg in ("-v", f"{service}={role}")]
            granted = await asyncio.to_thread(
                subprocess.run,
                [PSQL, url, "-X", "-q", "-v", "ON_ERROR_STOP=1", *variables, "-f", str(GRANTS)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert granted.returncode == 0, granted.stderr
            yield {"owner": url} | {service: _as_role(url, role, password) for service, role in roles.items()}
        finally:
            await admin.close()
            # The roles own nothing; their grants go with the database, dropped first.
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        for role in roles.values():
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await admin.close()


async def test_each_service_works_with_only_its_grants(
    role_urls: dict[str, str], aws_settings: AwsSettings, bucket: str
) -> None:
    # GIVEN the roles grants.sql set up
    # WHEN the consumer applies an event and reads what it reads before a receive and for its gauge
    consumer = await db.connect(DatabaseSettings(url=role_urls["consumer"]))
    try:
        assert await migrate.check_schema(consumer) is False  # the schema is current, the role may write
        result = await apply_envelopes(consumer, [envelope_of(make_event(CREATED, issue_id="42", ts=1000))])
        assert [r.outcome for r in result.results] == [APPLIED]
        # THEN it could; and so can each other service with its own role
        pool = await db.create_pool(DatabaseSettings(url=role_urls["consumer"]), min_size=0, max_size=1)
        try:
            await publish_last_export(pool)
        finally:
            await pool.close()
    finally:
        await consumer.close()

    exported = await export_once(
        make_settings(aws_settings, DatabaseSettings(url=role_urls["exporter"]), bucket)
    )
    assert exported.rows == 1

    backfill = await db.connect(DatabaseSettings(url=role_urls["backfill"]))
    try:
        key = state.RunKey("https://jira.example", "", "", "")
        run = await state.start_run(
            backfill, key, effective_jql="order by created", covers_from=None, started_at=datetime.now(UTC)
        )
        await state.save_page(backfill, key, next_cursor="t", pages_done=1, issues_sent=1, issues_refused=0)
        await state.finish_run(backfill, key, run, issues_sent=1, store_watermark=True)
        await state.store_failed_webhook_cursor(backfill, "https://jira.example", 5)
        assert await backfill.fetchval("SELECT count(*) FROM ap_jira_task") == 1  # reconcile's read
    finally:
        await backfill.close()

    account_id = make_event(CREATED)["issue"]["fields"]["reporter"]["accountId"]
    forgotten = await forget_user.run(
        DatabaseSettings(url=role_urls["forget_user"]),
        Person(account_id=account_id),
        batch_size=10,
        dry_run=False,
    )
    assert forgotten.rows["ap_jira_task"] == 1
    # (a Data Center username: the pseudonym key is created the first time, then read)
    await forget_user.run(
        DatabaseSettings(url=role_urls["forget_user"]),
        Person(username="nobody"),
        batch_size=10,
        dry_run=False,
    )

    owner = await asyncpg.connect(role_urls["owner"])
    try:  # the history row, a year old
        await owner.execute("UPDATE ap_jira_task_event SET ingested_at = ingested_at - interval '365 days'")
    finally:
        await owner.close()
    pruned = await history_prune.run(
        DatabaseSettings(url=role_urls["prune"]), history_prune.PruneOptions(older_than_days=30)
    )
    assert pruned.rows == 1


async def test_analysts_read_the_tables_but_not_the_pseudonym_key(role_urls: dict[str, str]) -> None:
    analyst = await asyncpg.connect(role_urls["analyst"])
    try:
        assert await analyst.fetchval("SELECT count(*) FROM ap_jira_task") == 0
        assert await analyst.fetchval("SELECT count(*) FROM ap_jira_task_event") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await analyst.fetchval("SELECT key FROM jiralake_pseudonym_key")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await analyst.execute("DELETE FROM ap_jira_task")
    finally:
        await analyst.close()
