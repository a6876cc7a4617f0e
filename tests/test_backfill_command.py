"""``jiralake backfill`` / ``jiralake reconcile`` as an operator runs them: a child process, its exit
code, its stdout summary and its one-line errors."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import pytest

from shared.provision import QueuePair
from shared.settings import AwsSettings
from tests.conftest import drain
from tests.jira_api_server import API_TOKEN, EMAIL, JiraApiServer, fixture_issues
from tests.test_reconcile import serve_an_unpageable_failed_webhook_list

FAILED_SEARCH = "Jira still failing after 1 attempts at /rest/api/2/search/jql: HTTP 500"


def cli_env(url: str, queues: QueuePair, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JIRALAKE_")}
    env.update(
        JIRALAKE_JIRA_URL=url,
        JIRALAKE_JIRA_EMAIL=EMAIL,
        JIRALAKE_JIRA_API_TOKEN=API_TOKEN,
        JIRALAKE_QUEUE_URL=queues.queue_url,
        JIRALAKE_DLQ_URL=queues.dlq_url,
        DATABASE_URL=database_url,
    )
    env.update(extra)
    return {k: v for k, v in env.items() if v}


async def jiralake(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jiralake",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_backfill_then_reconcile_from_the_command_line(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    database_url: str,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Jira Cloud with 15 issues
    server, url = jira
    server.issues = fixture_issues(15)
    env = cli_env(url, queues, database_url)
    # WHEN an operator runs a backfill
    code, out, err = await jiralake("--log-json", "backfill", env=env)
    # THEN it enqueued all 15 and says so; the credentials appear nowhere
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("backfill complete: 15 issues enqueued from 1 pages in ")
    assert lines[1] == "  jql: project IS NOT EMPTY ORDER BY created ASC"
    assert lines[2].startswith("  watermark: ")
    assert API_TOKEN not in out + err
    assert len(await drain(aws_settings, queues.queue_url)) == 15
    # WHEN a dry-run reconcile runs with a live row Jira no longer has
    await pg.execute("INSERT INTO ap_jira_task (issue_id, issue_key, version) VALUES (50001, 'OLD-1', 1)")
    code, out, err = await jiralake("--log-json", "reconcile", "--dry-run", env=env)
    # THEN it prints what it would change and enqueues nothing
    assert code == 0, err
    assert out.splitlines() == [
        "reconcile dry run: 15 issues in Jira, 1 live rows, 1 live rows missing from Jira's answer",
        "  jql: project IS NOT EMPTY ORDER BY created ASC",
        "  would mark deleted: 50001 OLD-1 (HTTP 404)",
        "  nothing was enqueued",
        "failed webhooks: not available (HTTP 403: Only Connect apps can use this operation.). Jira Cloud "
        "lists failed deliveries only to Connect apps, for their own webhooks; for admin-registered "
        "webhooks (and on Data Center) run `jiralake backfill --updated-since <outage start>` instead",
    ]
    assert await drain(aws_settings, queues.queue_url) == []


@pytest.mark.parametrize(
    ("args", "extra_env", "code", "message"),
    [
        (
            ["backfill"],
            {"JIRALAKE_JIRA_URL": ""},
            2,
            "jiralake: configuration error: JIRALAKE_JIRA_URL is not set "
            "(see the configuration table in README.md)",
        ),
        (
            ["backfill"],
            {"JIRALAKE_JIRA_EMAIL": "", "JIRALAKE_JIRA_API_TOKEN": ""},
            2,
            "jiralake: configuration error: no Jira credentials: set JIRALAKE_JIRA_EMAIL and "
            "JIRALAKE_JIRA_API_TOKEN (Cloud) or JIRALAKE_JIRA_PAT (Data Center)",
        ),
        (
            ["backfill", "--updated-since", "last tuesday"],
            {},
            2,
            "jiralake: --updated-since must be a date like 2024-05-01, a time like 2024-05-01T08:30:00Z, "
            "or last-run; got 'last tuesday'",
        ),
        (
            ["backfill", "--updated-since", "0001-01-01T00:00:00+05:00"],
            {},
            2,
            "jiralake: --updated-since must lie between 1970 and 9998; got '0001-01-01T00:00:00+05:00'",
        ),
        (
            ["reconcile"],
            {"JIRALAKE_JIRA_API_TOKEN": "wrong-token"},
            1,
            "jiralake: Jira rejected the credentials (HTTP 401) at {url}: check JIRALAKE_JIRA_EMAIL + "
            "JIRALAKE_JIRA_API_TOKEN or JIRALAKE_JIRA_PAT",
        ),
    ],
)
async def test_bad_input_is_one_line_and_a_non_zero_exit(
    args: list[str],
    extra_env: dict[str, str],
    code: int,
    message: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    database_url: str,
    pg: asyncpg.Connection,
) -> None:
    _, url = jira
    env = cli_env(url, queues, database_url)
    env.update(extra_env)
    env = {k: v for k, v in env.items() if v}
    got_code, out, err = await jiralake("--log-json", *args, env=env)
    assert (got_code, out, err) == (code, "", message.format(url=url) + "\n")


@pytest.mark.parametrize(
    ("fail_from_page", "hint"),
    [(0, ""), (1, " (1 page(s) already enqueued are saved: run the same command to resume)")],
)
async def test_a_backfill_that_dies_mid_run_says_to_resume_only_when_pages_were_saved(
    fail_from_page: int,
    hint: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    database_url: str,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN 150 issues (two pages of 100) and a Jira whose search fails from page one or page two on
    server, url = jira
    server.issues = fixture_issues(150)
    server.fail_from_page = fail_from_page
    env = cli_env(url, queues, database_url, JIRALAKE_JIRA_MAX_ATTEMPTS="1")
    # WHEN an operator runs a backfill
    code, out, err = await jiralake("--log-json", "backfill", env=env)
    # THEN it exits 1 with one line (after the JSON logs), which says to rerun only when a page was
    # saved to resume from
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == f"jiralake: {FAILED_SEARCH}{hint}"
    assert len(await drain(aws_settings, queues.queue_url)) == 100 * fail_from_page
    # WHEN Jira is back and the same command runs again
    server.fail_from_page = None
    code, out, err = await jiralake("--log-json", "backfill", env=env)
    # THEN it sends the pages that were not saved
    assert code == 0, err
    assert len(await drain(aws_settings, queues.queue_url)) == 150 - 100 * fail_from_page


async def test_reconcile_exits_1_when_rows_could_not_be_checked_or_deletes_would_be_withheld(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    database_url: str,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a live row Jira's search does not return and whose lookup Jira refuses with 401 (a token
    # revoked mid-run), and two rows whose lookups answer 404
    server, url = jira
    server.issues = fixture_issues(3)
    server.issue_status = {"60001": 401}
    await pg.executemany(
        "INSERT INTO ap_jira_task (issue_id, issue_key, version) VALUES ($1, $2, 1)",
        [(60001, "OLD-1"), (60002, "OLD-2"), (60003, "OLD-3")],
    )
    env = cli_env(url, queues, database_url)
    # WHEN reconcile runs with room for the deletes
    code, out, err = await jiralake("--log-json", "reconcile", "--max-deletes", "5", env=env)
    # THEN the 404s are enqueued, but the run is not reported as done: the 401 row was never checked
    assert code == 1, err
    assert "  left alone (no access: permission lost?): 60001 OLD-1 (HTTP 401)" in out.splitlines()
    assert err.splitlines()[-1] == (
        "jiralake: 1 live row(s) could not be checked (lookup kept failing, or HTTP 401: credentials "
        "rejected); they were left alone; rerun when Jira answers"
    )
    # WHEN its dry run has a limit the deletes exceed
    code, out, err = await jiralake("--log-json", "reconcile", "--dry-run", "--max-deletes", "1", env=env)
    # THEN it says the real run would withhold them, and exits as the real run would
    assert code == 1, err
    assert err.splitlines()[-1] == (
        "jiralake: 2 issues answered 404, more than --max-deletes 1: no delete would be enqueued. Jira "
        "also answers 404 for issues the account may not browse; check its permissions, then rerun with "
        "a higher --max-deletes"
    )


async def test_reconcile_reports_its_deletes_and_exits_1_when_replaying_failed_webhooks_stops(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    database_url: str,
    pg: asyncpg.Connection,
    aws_settings: AwsSettings,
) -> None:
    # GIVEN a live row Jira no longer has (404), and a failed-webhook list that cannot be paged (it
    # answers its first page whatever `after` asks)
    server, url = jira
    server.issues = fixture_issues(2)
    await pg.execute("INSERT INTO ap_jira_task (issue_id, issue_key, version) VALUES (60001, 'OLD-1', 1)")
    serve_an_unpageable_failed_webhook_list(server)
    # WHEN reconcile runs
    code, out, err = await jiralake("--log-json", "reconcile", env=cli_env(url, queues, database_url))
    # THEN the delete it enqueued is reported, then why the failed-webhook step stopped, and it exits 1
    assert code == 1, err
    lines = out.splitlines()
    assert "  1 delete events enqueued" in lines
    assert lines[-1].startswith(
        "failed webhooks: stopped: Jira's failed-webhook list, asked for failures after"
    )
    assert err.splitlines()[-1].startswith("jiralake: replaying Jira's failed webhooks stopped: Jira's ")
    assert len(await drain(aws_settings, queues.queue_url)) >= 1  # the delete (and the first page's replays)
