"""Data Center ``startAt`` paging while Jira changes under the run, and 2xx answers that are not
Jira's (an SSO login page, a proxy's JSON): tests/jira_api_server.py, real Postgres, moto's SQS."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from backfill import state
from backfill.backfill import LAST_RUN, BackfillRequest, run_backfill
from backfill.jira_client import JiraError
from backfill.jql import build_jql
from shared.envelope import Envelope
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from tests.conftest import drain
from tests.jira_api_server import JiraApiServer, backfill_settings, fixture_issues, jira_time
from tests.test_backfill_command import cli_env, jiralake


async def queued_ids(aws_settings: AwsSettings, queues: QueuePair) -> list[str]:
    return sorted(Envelope.from_message(m).issue_id for m in await drain(aws_settings, queues.queue_url))


def ids(issues: list[dict[str, Any]]) -> list[str]:
    return sorted(i["id"] for i in issues)


def delete(*positions: int) -> Any:
    """A change for ``change_after_page``: the issues at these positions leave the result."""

    def change(issues: list[dict[str, Any]]) -> None:
        for position in sorted(positions, reverse=True):
            del issues[position]

    return change


# -- Data Center paging --


async def test_an_issue_deleted_from_a_page_already_read_does_not_skip_the_next_page_first_issue(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Data Center with 30 issues in pages of 10, and issue 30002 (on page one) deleted right
    # after page one was answered: every later issue moves up a place, 30010 to the end of page one
    server, url = jira
    server.issues = fixture_issues(30)
    everything = ids(server.issues)
    server.change_after_page = {0: delete(2)}
    settings = backfill_settings(
        url, queues, db_settings, aws_settings, deployment="datacenter", page_size=10
    )
    # WHEN the backfill runs
    summary = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN each page was asked once (pages two and three from 5 issues early), every issue went out
    # once, 30010 included, and the run stored its watermark
    assert dict(server.page_requests) == {0: 1, 1: 1, 2: 1}
    assert (summary.pages, summary.sent, summary.complete) == (3, 30, True)
    assert await queued_ids(aws_settings, queues) == everything
    assert summary.watermark is not None
    # AND the next --updated-since last-run has nothing left to bring
    again = await run_backfill(settings, BackfillRequest(updated_since=LAST_RUN), progress_tty=False)
    assert again.sent == 0


async def test_an_issue_edited_under_order_by_updated_does_not_skip_the_one_behind_it(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Data Center with 30 issues read ORDER BY updated in pages of 10, and issue 30002 edited
    # right after page one was answered: it moves to the end, the rest move up a place
    server, url = jira
    server.issues = fixture_issues(30)
    everything = ids(server.issues)

    def edit(issues: list[dict[str, Any]]) -> None:
        edited = issues.pop(2)
        edited["fields"]["updated"] = jira_time(datetime(2024, 6, 1, tzinfo=UTC))
        issues.append(edited)

    server.change_after_page = {0: edit}
    settings = backfill_settings(
        url, queues, db_settings, aws_settings, deployment="datacenter", page_size=10
    )
    # WHEN the backfill runs
    summary = await run_backfill(
        settings, BackfillRequest(jql="project = BF ORDER BY updated ASC"), progress_tty=False
    )
    # THEN every issue went out once: 30010 is not skipped, and 30002, met again at the end, is not
    # sent twice (its edit arrives by webhook)
    assert (summary.pages, summary.sent) == (3, 30)
    assert await queued_ids(aws_settings, queues) == everything


async def test_a_shift_larger_than_the_overlap_steps_back_until_the_page_starts_with_a_known_issue(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Data Center with 30 issues in pages of 10, and 8 issues of page one (more than the
    # overlap of 5) deleted right after it was answered
    server, url = jira
    server.issues = fixture_issues(30)
    everything = ids(server.issues)
    server.change_after_page = {0: delete(1, 2, 3, 4, 5, 6, 7, 8)}
    settings = backfill_settings(
        url, queues, db_settings, aws_settings, deployment="datacenter", page_size=10
    )
    # WHEN the backfill runs
    with capture_logs() as logs:
        summary = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN page two, asked from startAt 5, began with an unread issue (30013): the run stepped back
    # to startAt 0, then went on; no issue was skipped and none sent twice
    shifted = [e for e in logs if e["event"] == "jira_page_shifted"]
    assert [(e["start_at"], e["expected_at"], e["total"]) for e in shifted] == [(5, 10, 22)]
    assert dict(server.page_requests) == {0: 2, 1: 2}
    assert (summary.pages, summary.sent, summary.complete) == (3, 30, True)
    assert await queued_ids(aws_settings, queues) == everything


async def test_a_resumed_run_overlaps_the_last_saved_page_too(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a Data Center run (30 issues, pages of 10) that died after two pages
    server, url = jira
    server.issues = fixture_issues(30)
    everything = ids(server.issues)
    server.fail_from_page = 2
    settings = backfill_settings(
        url, queues, db_settings, aws_settings, deployment="datacenter", page_size=10, max_attempts=1
    )
    with pytest.raises(JiraError):
        await run_backfill(settings, BackfillRequest(), progress_tty=False)
    first = await queued_ids(aws_settings, queues)
    # AND, while it was stopped, issue 30003 was deleted in Jira
    server.fail_from_page = None
    del server.issues[3]
    # WHEN the same backfill runs again
    summary = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN it resumed with page three and sent exactly the ten issues the first run had not, 30020
    # included, although it moved up onto page two
    assert (summary.resumed_after_page, summary.pages, summary.sent) == (2, 1, 10)
    assert dict(server.page_requests) == {0: 1, 1: 1, 2: 2}
    assert sorted(first + await queued_ids(aws_settings, queues)) == everything
    assert summary.watermark is not None


async def test_a_plain_start_at_cursor_saved_before_pages_overlapped_still_resumes(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a run row saved by the version before overlapping pages: cursor "20" after two pages
    server, url = jira
    server.issues = fixture_issues(30)
    key = state.RunKey(jira_url=url, request_jql="", updated_since="", expand="")
    run = await state.start_run(
        pg, key, effective_jql=build_jql(None), covers_from=None, started_at=datetime.now(UTC)
    )
    await state.save_page(pg, key, next_cursor="20", pages_done=2, issues_sent=20, issues_refused=0)
    # AND issue 30003 deleted since
    del server.issues[3]
    settings = backfill_settings(
        url, queues, db_settings, aws_settings, deployment="datacenter", page_size=10
    )
    # WHEN the same backfill runs
    summary = await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN it read from 5 issues before startAt 20 and, remembering no ids, sent all it read:
    # 30016 to 30029, 30020 included, and completed with the watermark of the saved run
    assert (summary.resumed_after_page, summary.pages, summary.sent) == (2, 1, 14)
    assert await queued_ids(aws_settings, queues) == [str(30_000 + n) for n in range(16, 30)]
    assert summary.watermark == run.started_at


# -- answers that are not Jira's --

SSO_HEAD = "'<!DOCTYPE html> <html><head><title>Sign in - Example SSO</ti'"
HINT = "is JIRALAKE_JIRA_URL Jira itself, not a login page or proxy in front of it?"


@pytest.mark.parametrize(
    ("deployment", "path"), [("cloud", "rest/api/2/search/jql"), ("datacenter", "rest/api/2/search")]
)
async def test_a_login_page_instead_of_search_results_ends_the_run_without_a_watermark(
    deployment: str,
    path: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a Jira whose search redirects to an SSO login page (answered 200, HTML)
    server, url = jira
    server.issues = fixture_issues(5)
    server.login_redirect = {"search"}
    settings = backfill_settings(url, queues, db_settings, aws_settings, deployment=deployment)
    # WHEN the backfill runs
    with pytest.raises(JiraError) as caught:
        await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN it ends with one line naming what came back, enqueued nothing and stored no watermark
    assert str(caught.value) == (
        f"Jira answered HTTP 200 to /{path} with text/html that is not a search result "
        f"(starts {SSO_HEAD}): {HINT}"
    )
    assert await queued_ids(aws_settings, queues) == []
    assert await state.load_watermark(pg, url, "") is None


@pytest.mark.parametrize(
    ("impostor", "answer"),
    [
        ("login", f"text/html that is not a count (starts {SSO_HEAD})"),
        ("json", 'application/json that is not a count (starts \'{"status": "ok"}\')'),
    ],
)
async def test_a_cloud_count_that_is_not_jira_s_ends_the_run_before_any_page(
    impostor: str,
    answer: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN Jira Cloud whose approximate count answers a login page, or a proxy's JSON, with 200
    server, url = jira
    server.issues = fixture_issues(5)
    if impostor == "login":
        server.login_redirect = {"count"}
    else:
        server.foreign_json = {"count": {"status": "ok"}}
    settings = backfill_settings(url, queues, db_settings, aws_settings, deployment="cloud")
    # WHEN the backfill runs
    with pytest.raises(JiraError) as caught:
        await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN that is an error naming what came back (not a run without a total), before any page
    assert str(caught.value) == (
        f"Jira answered HTTP 200 to /rest/api/3/search/approximate-count with {answer}: {HINT}"
    )
    assert server.jqls == []
    assert await state.load_watermark(pg, url, "") is None


async def test_json_without_issues_is_not_an_empty_last_page(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a proxy answering Data Center's search with its own JSON
    server, url = jira
    server.issues = fixture_issues(5)
    server.foreign_json = {"search": {"status": "ok"}}
    settings = backfill_settings(url, queues, db_settings, aws_settings, deployment="datacenter")
    # WHEN the backfill runs
    with pytest.raises(JiraError) as caught:
        await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN that is an error, not a complete run of 0 issues
    assert str(caught.value) == (
        "Jira answered HTTP 200 to /rest/api/2/search with application/json that is not a search "
        f'result (starts \'{{"status": "ok"}}\'): {HINT}'
    )
    assert await state.load_watermark(pg, url, "") is None


@pytest.mark.parametrize(
    ("deployment", "path"), [("cloud", "rest/api/3/myself"), ("datacenter", "rest/api/2/myself")]
)
async def test_the_credentials_check_accepts_only_an_account(
    deployment: str,
    path: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a Jira answering /myself first with an account (Cloud: accountId; Data Center: name, key)
    server, url = jira
    server.issues = fixture_issues(3)
    settings = backfill_settings(url, queues, db_settings, aws_settings, deployment=deployment)
    assert (await run_backfill(settings, BackfillRequest(), progress_tty=False)).sent == 3
    # WHEN /myself answers a proxy's JSON without any account id instead
    server.foreign_json = {"myself": {"timeZone": "UTC"}}
    with pytest.raises(JiraError) as caught:
        await run_backfill(settings, BackfillRequest(restart=True), progress_tty=False)
    # THEN the credentials check fails before any search
    assert str(caught.value) == (
        f"Jira answered HTTP 200 to /{path} with application/json that is not an account "
        f'(starts \'{{"timeZone": "UTC"}}\'): {HINT}'
    )
    assert server.jqls == [server.jqls[0]]


async def test_the_command_behind_an_sso_login_page_exits_1_with_one_line(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    database_url: str,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a Jira URL where every request redirects to an SSO login page
    server, url = jira
    server.issues = fixture_issues(3)
    server.login_redirect = {"myself", "search"}
    # WHEN an operator runs a backfill
    code, out, err = await jiralake("--log-json", "backfill", env=cli_env(url, queues, database_url))
    # THEN it exits 1 with one line on stderr (no page saved: no resume hint), and no watermark
    assert (code, out, err) == (
        1,
        "",
        "jiralake: Jira answered HTTP 200 to /rest/api/3/myself with text/html that is not an account "
        f"(starts {SSO_HEAD}): {HINT}\n",
    )
    assert await state.load_watermark(pg, url, "") is None


# -- answers against Jira's own paging contract --


def _cloud_no_token(request: Any, body: dict[str, Any]) -> None:
    body.pop("nextPageToken", None)  # isLast stays false on the first page


def _cloud_is_last_text(request: Any, body: dict[str, Any]) -> None:
    body["isLast"] = str(body["isLast"]).lower()


def _cloud_same_token(request: Any, body: dict[str, Any]) -> None:
    if "nextPageToken" in request.query:
        body["nextPageToken"] = request.query["nextPageToken"]
        body["isLast"] = False


def _cloud_issue_not_an_object(request: Any, body: dict[str, Any]) -> None:
    body["issues"].append("30099")


def _dc_start_at_ignored(request: Any, body: dict[str, Any]) -> None:
    body["startAt"] = 0


def _dc_nothing_of_the_total(request: Any, body: dict[str, Any]) -> None:
    if request.query["startAt"] != "0":
        body["issues"] = []


def _nan_in_an_issue(request: Any, body: dict[str, Any]) -> None:
    body["issues"][0]["fields"]["customfield_10016"] = float("nan")


@pytest.mark.parametrize(
    ("deployment", "tamper", "message"),
    [
        (
            "cloud",
            _cloud_no_token,
            "Jira's search answer at /rest/api/2/search/jql says more pages follow (isLast false) but "
            "gives no nextPageToken to ask for them",
        ),
        (
            "cloud",
            _cloud_is_last_text,
            "Jira's search answer at /rest/api/2/search/jql has an isLast neither true nor false",
        ),
        (
            "cloud",
            _cloud_same_token,
            "Jira's search answer at /rest/api/2/search/jql gives the nextPageToken it was asked with: "
            "paging would never end",
        ),
        (
            "cloud",
            _cloud_issue_not_an_object,
            "Jira's search answer lists an issue that is not a JSON object",
        ),
        (
            "datacenter",
            _dc_start_at_ignored,
            "Jira answered startAt=0 to a search at /rest/api/2/search for startAt=5",
        ),
        (
            "datacenter",
            _dc_nothing_of_the_total,
            "Jira's search at /rest/api/2/search returned no issues from startAt=5 although its total is 25",
        ),
    ],
)
async def test_an_answer_against_the_paging_contract_ends_the_run_without_a_watermark(
    deployment: str,
    tamper: Any,
    message: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN 25 issues in pages of 10, and a Jira (or a proxy) whose search answers contradict its own
    # paging: more pages but no way to ask for them, the same token again, another startAt, nothing
    # of a total
    server, url = jira
    server.issues = fixture_issues(25)
    server.tamper = {"search": tamper}
    settings = backfill_settings(url, queues, db_settings, aws_settings, deployment=deployment, page_size=10)
    # WHEN the backfill runs
    with pytest.raises(JiraError) as caught:
        await run_backfill(settings, BackfillRequest(), progress_tty=False)
    # THEN it ends with one line saying what was wrong, not a complete run (or an endless one), and
    # stores no watermark
    assert str(caught.value) == message
    assert await state.load_watermark(pg, url, "") is None


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_a_search_answer_with_nan_is_no_search_result(
    deployment: str,
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a search answer holding NaN, which is no JSON (the consumer would dead-letter the snapshot)
    server, url = jira
    server.issues = fixture_issues(3)
    server.tamper = {"search": _nan_in_an_issue}
    settings = backfill_settings(url, queues, db_settings, aws_settings, deployment=deployment)
    # WHEN the backfill runs, THEN it is an error naming what came back, and nothing was enqueued
    with pytest.raises(JiraError, match="that is not a search result"):
        await run_backfill(settings, BackfillRequest(), progress_tty=False)
    assert await queued_ids(aws_settings, queues) == []
    assert await state.load_watermark(pg, url, "") is None
