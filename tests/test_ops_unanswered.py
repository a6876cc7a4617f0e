"""``jiralake queue stats``, ``setup``, ``backfill`` and ``reconcile`` against an SQS (or S3) that takes
one call and never answers it: each call is given up after PROMPT_CALL_TIMEOUT_S (botocore alone: over
2 minutes a call), the command says in one line which call went unanswered and what that means, and
nothing is recorded as done that may not have been.

As in tests/test_dlq_unanswered.py, the command tests run ``cli.main`` in this thread with the bound
made 1 s (the constant as the command's module reads it) and the proxy in a thread of its own; the
backfill and reconcile tests run the command's coroutine in the test's loop, beside the Jira server;
the signal tests run the real command, with the real bound, in a child process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import structlog
from aiohttp import web

from backfill import backfill as backfill_module
from backfill import reconcile as reconcile_module
from backfill.backfill import BackfillRequest, run_backfill
from backfill.enqueue import QueueUnavailable, send_envelopes
from backfill.reconcile import ReconcileRequest, run_reconcile
from jiralake import cli
from ops import queue_stats
from ops import setup as setup_command
from ops.queue_stats import Thresholds, watch
from shared import aws
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings, QueueSettings
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S
from tests.cli_in_process import in_thread, run_timed
from tests.conftest import drain
from tests.fault_proxy import LoseAnswerProxy, SilentProxy, SqsFaultProxy
from tests.jira_api_server import JiraApiServer, backfill_settings, fixture_issues
from tests.s3_pause_proxy import S3PauseProxy
from tests.test_consumer_helpers import queue_counts
from tests.test_dlq import events_of

TEST_CALL_TIMEOUT_S = 1.0
# Well under botocore's own wait for a call that is never answered (30 s a try, and retries), over the
# bound and the calls that are answered.
FAST_ENOUGH_S = TEST_CALL_TIMEOUT_S + 9
RESENT_IS_HARMLESS = (
    "sending them again is harmless (each keeps its deduplication id: SQS drops a second copy within "
    "5 minutes, the consumer skips it after)"
)


class SilentAfter(SilentProxy):
    """A :class:`SilentProxy` that passes the first ``answered`` calls of its operation to SQS."""

    def __init__(self, target_url: str, operation: str, *, answered: int) -> None:
        super().__init__(target_url, operation)
        self.answered = answered

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Amz-Target", "").endswith(f".{self.operation}") and self.answered > 0:
            self.answered -= 1
            return await SqsFaultProxy._handle(self, request)
        return await super()._handle(request)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``cli.main`` configures structlog for the captured stderr; put the suite's setup back after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


async def put(sqs: Any, url: str, n: int) -> None:
    for i in range(n):
        await sqs.send_message(
            QueueUrl=url, MessageBody=f"m{i}", MessageGroupId=f"g{i}", MessageDeduplicationId=f"d{i}"
        )


# -- queue stats --


@pytest.fixture
def stats_env(queues: QueuePair, monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    monkeypatch.setenv("JIRALAKE_QUEUE_URL", queues.queue_url)
    monkeypatch.setenv("JIRALAKE_DLQ_URL", queues.dlq_url)
    monkeypatch.setattr(queue_stats, "PROMPT_CALL_TIMEOUT_S", TEST_CALL_TIMEOUT_S)


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("stats_env")
def test_a_count_sqs_never_answers_ends_the_check_in_seconds_with_exit_1(
    aws_settings: AwsSettings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a cron check of the queues, and an SQS that takes GetQueueAttributes and never answers
    with in_thread(SilentProxy(aws_settings.endpoint_url or "", "GetQueueAttributes")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # WHEN the check runs
        code, elapsed = run_timed(["queue", "stats", "--max-visible", "10", "--max-dlq", "0"])
    # THEN it gives the first count up after the bound and exits 1 ("could not check", never 3), saying
    # which call SQS left unanswered
    assert code == 1
    assert TEST_CALL_TIMEOUT_S <= elapsed < FAST_ENOUGH_S
    assert proxy.calls == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == (
        "jiralake: cannot read the queues: no answer from SQS within 1 s to GetQueueAttributes"
    )


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("stats_env")
def test_a_peek_sqs_never_answers_leaves_the_age_unknown_and_the_check_still_decides(
    aws_settings: AwsSettings,
    queues: QueuePair,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN one message in the DLQ, and an SQS that answers the counts but never the DLQ's peek
    async def fill() -> None:
        async with aws.sqs_client(aws_settings) as sqs:
            await put(sqs, queues.dlq_url, 1)

    asyncio.run(fill())
    with in_thread(SilentProxy(aws_settings.endpoint_url or "", "ReceiveMessage")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # WHEN the check runs with a DLQ threshold
        code, elapsed = run_timed(["queue", "stats", "--json", "--max-dlq", "0"])
    # THEN the peek is given up after the bound, the age is unknown, and the threshold still decides
    assert code == 3
    assert TEST_CALL_TIMEOUT_S <= elapsed < FAST_ENOUGH_S
    assert proxy.calls == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [(q["queue"], q["visible"], q["oldest_age_s"]) for q in report["queues"]] == [
        ("main", 0, 0.0),
        ("dlq", 1, None),
    ]
    assert captured.err.splitlines()[-1] == (
        "jiralake: threshold exceeded: dead-letter queue holds 1 messages (max 0)"
    )
    assert (
        '"error": "no answer from SQS within 1 s to ReceiveMessage", "event": "queue_oldest_age_unavailable"'
        in captured.err
    )
    # AND the message stays in the DLQ, visible (the peek never reached SQS)
    assert asyncio.run(queue_counts(aws_settings, queues.dlq_url)) == (1, 0)


@pytest.mark.timeout(30)
async def test_a_watch_shows_each_unanswered_round_and_goes_on(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a watch, and an SQS that takes GetQueueAttributes and never answers
    out_json, out_lines = io.StringIO(), io.StringIO()
    async with SilentProxy(aws_settings.endpoint_url or "", "GetQueueAttributes") as proxy:
        silent = replace(aws_settings, endpoint_url=proxy.url)
        settings = QueueSettings(queue_url=queues.queue_url, dlq_url=queues.dlq_url)
        at = datetime(2026, 12, 7, 10, tzinfo=UTC)
        stamp = "2026-12-07T10:00:00Z"
        started = time.monotonic()
        # WHEN it runs two rounds as JSON and one as lines
        for style, out, rounds in (("json", out_json, 2), ("lines", out_lines, 1)):
            await watch(
                silent,
                settings,
                Thresholds(),
                interval_s=1,
                style=style,
                rounds=rounds,
                out=out,
                now=lambda: at,
                call_timeout_s=TEST_CALL_TIMEOUT_S,
            )
        elapsed = time.monotonic() - started
    # THEN each round ends after the bound, says so on screen, and the watch goes on to the next
    assert proxy.calls == 3
    assert elapsed < 3 * TEST_CALL_TIMEOUT_S + 1 + 9
    assert [json.loads(line) for line in out_json.getvalue().splitlines()] == [
        {"time": stamp, "error": "no answer from SQS within 1 s to GetQueueAttributes"}
    ] * 2
    assert out_lines.getvalue().splitlines() == [
        f"time={stamp} SQS unavailable: no answer from SQS within 1 s to GetQueueAttributes; "
        "trying again in 1s"
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM)])
async def test_a_signal_ends_a_watch_waiting_on_an_unanswered_call_at_once(
    aws_settings: AwsSettings, queues: QueuePair, sig: signal.Signals, code: int
) -> None:
    # GIVEN `queue stats --watch` (the real bound) waiting on a GetQueueAttributes SQS never answers
    async with SilentProxy(aws_settings.endpoint_url or "", "GetQueueAttributes") as proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JIRALAKE_")}
        env.update(
            AWS_ENDPOINT_URL=proxy.url, JIRALAKE_QUEUE_URL=queues.queue_url, JIRALAKE_DLQ_URL=queues.dlq_url
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jiralake", "queue", "stats", "--watch", "5",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(proxy.arrived.wait(), timeout=30)
        # WHEN Ctrl-C or SIGTERM comes while that call waits
        signalled = time.monotonic()
        child.send_signal(sig)
        out, err = await asyncio.wait_for(child.communicate(), timeout=PROMPT_CALL_TIMEOUT_S + 30)
        elapsed = time.monotonic() - signalled
    # THEN the watch ends at once (Ctrl-C: 0, as --help says; SIGTERM: killed by it), printing nothing
    assert (child.returncode, out, err) == (code, b"", b"")
    assert elapsed < 8


# -- setup --


@pytest.fixture
def setup_env(
    unique_name: str, database_url: str, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> str:
    """setup's environment for queues named after the test; returns the name."""
    monkeypatch.setenv("JIRALAKE_QUEUE_URL", f"http://sqs.local/123456789012/{unique_name}.fifo")
    monkeypatch.setenv("JIRALAKE_DLQ_URL", f"http://sqs.local/123456789012/{unique_name}-dlq.fifo")
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.delenv("JIRALAKE_BUCKET", raising=False)
    monkeypatch.setattr(setup_command, "PROMPT_CALL_TIMEOUT_S", TEST_CALL_TIMEOUT_S)
    return unique_name


def queue_names(aws_settings: AwsSettings, prefix: str) -> list[str]:
    async def read() -> list[str]:
        async with aws.sqs_client(aws_settings) as sqs:
            urls = (await sqs.list_queues(QueueNamePrefix=prefix)).get("QueueUrls", [])
        return sorted(url.rsplit("/", 1)[-1] for url in urls)

    return asyncio.run(read())


@pytest.mark.timeout(30)
def test_a_queue_creation_sqs_never_answers_ends_setup_in_seconds(
    aws_settings: AwsSettings,
    setup_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN an SQS that takes CreateQueue and never answers
    with in_thread(SilentProxy(aws_settings.endpoint_url or "", "CreateQueue")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # WHEN setup creates the queues
        code, elapsed = run_timed(["setup", "--skip-db"])
    # THEN it gives the first call up after the bound, with exit 1 and one line naming it
    assert code == 1
    assert TEST_CALL_TIMEOUT_S <= elapsed < FAST_ENOUGH_S
    assert proxy.calls == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == (
        "jiralake: setup stopped: no answer from SQS within 1 s to CreateQueue; whether that call took "
        "effect is unknown: run setup again (it changes nothing that is already right)"
    )
    # AND (the call never reached SQS) no queue exists; a second setup, SQS answering, makes both
    assert queue_names(aws_settings, setup_env) == []
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_settings.endpoint_url or "")
    assert cli.main(["setup", "--skip-db"]) == 0
    assert queue_names(aws_settings, setup_env) == [f"{setup_env}-dlq.fifo", f"{setup_env}.fifo"]


@pytest.mark.timeout(30)
def test_sigterm_while_the_queues_are_made_does_not_claim_a_migration_was_rolled_back(
    aws_settings: AwsSettings,
    setup_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN setup waiting (within its real 10 s bound) on a CreateQueue SQS never answers, no migration
    # started yet
    monkeypatch.setattr(setup_command, "PROMPT_CALL_TIMEOUT_S", PROMPT_CALL_TIMEOUT_S)

    def terminate_once_waiting(proxy: SilentProxy) -> None:
        deadline = time.monotonic() + 5
        while proxy.calls < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        if proxy.calls >= 1:  # setup's handlers are installed by then: it is inside stop_on_signals
            os.kill(os.getpid(), signal.SIGTERM)

    # A signal arriving after setup put its handlers back must not end the whole test run.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with in_thread(SilentProxy(aws_settings.endpoint_url or "", "CreateQueue")) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            killer = threading.Thread(target=terminate_once_waiting, args=(proxy,), name="sigterm-setup")
            killer.start()
            # WHEN SIGTERM comes while that call waits
            code, elapsed = run_timed(["setup"])
            killer.join(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    # THEN it stops at once with 143, and its line claims no rollback of a migration that never began
    assert code == 143
    assert elapsed < PROMPT_CALL_TIMEOUT_S
    assert capsys.readouterr().err.splitlines()[-1] == (
        "jiralake: setup stopped by SIGTERM before it finished (a migration in progress, if any, was rolled "
        "back); run setup again: it changes nothing that is already right"
    )


@pytest.mark.timeout(30)
def test_a_bucket_creation_s3_never_answers_ends_setup_in_seconds_before_the_migrations(
    aws_settings: AwsSettings,
    setup_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a local endpoint whose S3 takes CreateBucket and never answers
    bucket = setup_env
    monkeypatch.setenv("JIRALAKE_BUCKET", bucket)
    proxy = S3PauseProxy(aws_settings.endpoint_url or "")
    held = proxy.hold("CreateBucket", lambda r: r.method == "PUT" and r.path.rstrip("/") == f"/{bucket}")
    with in_thread(proxy):
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # WHEN setup runs (queues, bucket, migrations)
        code, elapsed = run_timed(["setup"])
    # THEN it gives CreateBucket up after the bound, with exit 1 and one line saying the migrations
    # were not applied
    assert code == 1
    assert held.reached.is_set()
    assert TEST_CALL_TIMEOUT_S <= elapsed < FAST_ENOUGH_S
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == (
        "jiralake: setup stopped: no answer from S3 within 1 s to CreateBucket; whether that call took "
        "effect is unknown; the migrations were not applied: run setup again (it changes nothing that is "
        "already right)"
    )


# -- backfill and reconcile --


@pytest.mark.timeout(30)
async def test_a_send_sqs_never_answers_stops_backfill_in_seconds_with_that_page_not_saved(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN 150 issues (pages of 100: 10 calls of 10 each, then 5), and an SQS that stores page one's
    # ten calls and takes page two's first without ever answering
    server, url = jira
    server.issues = fixture_issues(150)
    monkeypatch.setattr(backfill_module, "PROMPT_CALL_TIMEOUT_S", TEST_CALL_TIMEOUT_S)
    async with SilentAfter(aws_settings.endpoint_url or "", "SendMessageBatch", answered=10) as proxy:
        settings = backfill_settings(url, queues, db_settings, replace(aws_settings, endpoint_url=proxy.url))
        # WHEN the backfill runs
        started = time.monotonic()
        with pytest.raises(QueueUnavailable) as stopped:
            await run_backfill(settings, BackfillRequest())
        elapsed = time.monotonic() - started
        # THEN it gives that call up after the bound and stops, without retrying it
        assert proxy.calls == 1
    assert elapsed < FAST_ENOUGH_S
    # AND says what that means, and that the saved page makes a rerun resume (the command's one line
    # is the text and its notes)
    assert str(stopped.value) == (
        "SQS did not answer SendMessageBatch (no answer from SQS within 1 s): whether it stored the 10 "
        f"message(s) it carried is unknown, so they do not count as sent; {RESENT_IS_HARMLESS}"
    )
    assert stopped.value.__notes__ == ["1 page(s) already enqueued are saved: run the same command to resume"]
    # AND only page one is recorded as done: page two's cursor is not saved
    run = await pg.fetchrow("SELECT pages_done, issues_sent, next_cursor FROM jiralake_backfill_run")
    assert run is not None
    assert (run["pages_done"], run["issues_sent"], run["next_cursor"] is not None) == (1, 100, True)
    assert len(await drain(aws_settings, queues.queue_url)) == 100
    # WHEN the same backfill runs again, SQS answering
    summary = await run_backfill(backfill_settings(url, queues, db_settings, aws_settings), BackfillRequest())
    # THEN it resumes at page two and sends all of it
    assert (summary.complete, summary.resumed_after_page, summary.sent, summary.issues_sent_total) == (
        True,
        1,
        50,
        150,
    )
    assert len(await drain(aws_settings, queues.queue_url)) == 50


@pytest.mark.timeout(30)
async def test_a_delete_send_sqs_never_answers_stops_reconcile_in_seconds_and_a_rerun_sends_it(
    jira: tuple[JiraApiServer, str],
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a live row Jira answers 404 for, and an SQS that takes SendMessageBatch and never answers
    server, url = jira
    server.issues = fixture_issues(2)
    await pg.execute("INSERT INTO ap_jira_task (issue_id, issue_key, version) VALUES (50001, 'OLD-1', 7)")
    monkeypatch.setattr(reconcile_module, "PROMPT_CALL_TIMEOUT_S", TEST_CALL_TIMEOUT_S)
    request = ReconcileRequest(replay_failed_webhooks=False)
    async with SilentProxy(aws_settings.endpoint_url or "", "SendMessageBatch") as proxy:
        settings = backfill_settings(url, queues, db_settings, replace(aws_settings, endpoint_url=proxy.url))
        # WHEN reconcile runs
        started = time.monotonic()
        with pytest.raises(QueueUnavailable) as stopped:
            await run_reconcile(settings, request)
        elapsed = time.monotonic() - started
        # THEN it gives the send up after the bound and stops, without retrying it
        assert proxy.calls == 1
    assert elapsed < FAST_ENOUGH_S
    assert str(stopped.value) == (
        "SQS did not answer SendMessageBatch (no answer from SQS within 1 s): whether it stored the 1 "
        f"message(s) it carried is unknown, so they do not count as sent; {RESENT_IS_HARMLESS}"
    )
    # WHEN it runs again, SQS answering
    summary = await run_reconcile(backfill_settings(url, queues, db_settings, aws_settings), request)
    # THEN the delete goes out, with the deduplication id the unanswered one carried
    assert summary.deletes_enqueued == 1
    messages = await drain(aws_settings, queues.queue_url)
    assert [m["Attributes"]["MessageDeduplicationId"] for m in messages] == ["reconcile:deleted:50001:7"]


@pytest.mark.timeout(60)
async def test_sends_whose_answers_are_lost_are_not_reported_as_refused(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN an SQS that stores every SendMessageBatch while the connection is reset before its answer
    async with LoseAnswerProxy(aws_settings.endpoint_url or "", "SendMessageBatch") as proxy:
        async with aws.sqs_client(replace(aws_settings, endpoint_url=proxy.url)) as sqs:
            # WHEN backfill's sender sends two envelopes, twice
            with pytest.raises(QueueUnavailable) as stopped:
                await send_envelopes(sqs, queues.queue_url, events_of("10001", 2), attempts=2, sleep=no_sleep)
    # THEN it does not say SQS did not accept them: it may have stored them, and it did
    assert str(stopped.value).startswith(
        "SQS did not confirm 2 messages after 2 attempts (ConnectionClosedError: "
    )
    assert str(stopped.value).endswith(
        "); it may have stored 2 of them (its answer was lost), so they do not count as sent; "
        f"{RESENT_IS_HARMLESS}"
    )
    assert len(await drain(aws_settings, queues.queue_url)) == 2


async def no_sleep(_: float) -> None:
    return None
