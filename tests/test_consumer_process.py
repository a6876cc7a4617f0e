"""``jiralake consumer`` as a process (admin port, SIGTERM), and readiness while Postgres is down."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import structlog.testing
from aiohttp import web

from consumer.service import run_consumer
from consumer.settings import ConsumerSettings
from ops.local_aws import free_port
from shared.envelope import Envelope
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from tests.conftest import drain
from tests.jira_fixtures import make_event
from tests.test_consumer_helpers import (
    consumer_settings,
    enqueue,
    envelope_of,
    history_count,
    holds,
    queue_counts,
    wait_for,
)

CREATED = "mattermost-plugin-jira__webhook-issue-created.json"


async def _get(url: str) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status, await resp.text()
    except aiohttp.ClientError:
        return 0, ""


async def test_the_command_consumes_serves_admin_endpoints_and_exits_0_on_sigterm(
    pg: asyncpg.Connection, aws_settings: AwsSettings, queues: QueuePair, database_url: str
) -> None:
    # GIVEN three events on the queue and `jiralake consumer` as a child process
    await enqueue(
        aws_settings,
        queues.queue_url,
        [envelope_of(make_event(CREATED, issue_id=i, ts=1)) for i in (1, 2, 3)],
    )
    admin_port = free_port()
    env = dict(
        os.environ,  # AWS_ENDPOINT_URL and test credentials from the moto_server fixture
        DATABASE_URL=database_url,
        JIRALAKE_QUEUE_URL=queues.queue_url,
        JIRALAKE_DLQ_URL=queues.dlq_url,
        JIRALAKE_CONSUMER_WAIT_S="1",
        JIRALAKE_CONSUMER_QUEUE_STATS_S="1",
    )
    child = await _consumer_child(env, admin_port)
    try:
        base = f"http://127.0.0.1:{admin_port}"
        # WHEN it runs
        await wait_for(lambda: _history_is(pg, 3), timeout_s=30, what="the events applied by the child")
        # THEN the admin port answers, with the counts the test caused
        assert await _get(f"{base}/healthz") == (200, '{"status": "ok"}')
        assert await _get(f"{base}/readyz") == (200, '{"status": "ready"}')
        await wait_for(
            lambda: _metrics_show(
                f"{base}/metrics", 'jiralake_queue_messages{queue="main",state="visible"} 0.0'
            ),
            what="queue depth gauges",
        )
        _, metrics = await _get(f"{base}/metrics")
        assert 'jiralake_consumer_events_total{outcome="applied"} 3.0' in metrics
        assert "jiralake_consumer_batch_duration_seconds_count" in metrics
        assert "jiralake_consumer_circuit_open 0.0" in metrics
        # AND on SIGTERM it stops and exits 0
        child.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.wait(), timeout=20) == 0
        assert child.stderr is not None
        log = (await child.stderr.read()).decode()
        assert '"event": "signal_received"' in log and '"signal": "SIGTERM"' in log
        assert '"event": "consumer_stopped"' in log
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 0)


async def test_with_exit_when_idle_the_command_drains_the_queue_and_exits_0_by_itself(
    pg: asyncpg.Connection, aws_settings: AwsSettings, queues: QueuePair, database_url: str
) -> None:
    # GIVEN three events on the queue, and a fourth held back until the consumer has applied them
    await enqueue(aws_settings, queues.queue_url, [_created(i) for i in (1, 2, 3)])
    env = dict(
        os.environ,
        DATABASE_URL=database_url,
        JIRALAKE_QUEUE_URL=queues.queue_url,
        JIRALAKE_DLQ_URL=queues.dlq_url,
        JIRALAKE_CONSUMER_WAIT_S="1",
    )
    # WHEN `jiralake consumer --exit-when-idle 3` runs (no signal is ever sent to it)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "--log-json", "consumer", "--pollers", "1", "--admin-port", "0",
        "--exit-when-idle", "3", env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_for(lambda: _history_is(pg, 3), timeout_s=30, what="the first three events applied")
        # a message that arrives while it waits for the queue to stay empty is applied too
        await enqueue(aws_settings, queues.queue_url, [_created(4)])
        # THEN it exits 0 by itself once receives have found the queue empty for 3 s, every event applied
        assert await asyncio.wait_for(child.wait(), timeout=40) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.stderr is not None
    log = (await child.stderr.read()).decode()
    assert await history_count(pg) == 4
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 0)
    # AND its log says why it stopped
    assert '"event": "consumer_queue_idle"' in log and '"idle_s": 3.0' in log
    assert '"went_idle": true' in log and '"applied": 4' in log
    assert "signal_received" not in log


async def test_a_queue_that_does_not_exist_ends_every_poller_in_one_line(
    aws_settings: AwsSettings, queues: QueuePair, database_url: str
) -> None:
    # GIVEN a queue URL with a typo, and three pollers that each fail on their first receive
    env = dict(
        os.environ,  # AWS_ENDPOINT_URL and test credentials from the moto_server fixture
        DATABASE_URL=database_url,
        JIRALAKE_QUEUE_URL=queues.queue_url.replace(".fifo", "-typo.fifo"),
        JIRALAKE_DLQ_URL=queues.dlq_url,
        JIRALAKE_CONSUMER_QUEUE_STATS_S="0",
    )
    # WHEN the consumer starts
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "--log-json", "consumer", "--pollers", "3", "--admin-port", "0",
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(child.communicate(), timeout=60)
    # THEN it exits 1 with one line of its own after its log, and no traceback from the other pollers
    log = err.decode()
    assert child.returncode == 1, log
    assert "Traceback" not in log and "never retrieved" not in log, log
    assert log.splitlines()[-1].startswith("jiralake: QueueDoesNotExist: "), log
    # AND every poller that crashed is logged once (usually all three; one that had not reached its
    # receive when the first crash halted the others ends without an error, which is no crash)
    crashed = [line for line in log.splitlines() if '"event": "consumer_crashed"' in line]
    tasks = [json.loads(line)["task"] for line in crashed]
    assert 1 <= len(tasks) == len(set(tasks)) <= 3, log


class CredentialsEndpoint:
    """The ECS/EKS container credentials endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI), answering
    credentials that expire in 5 minutes, inside botocore's 10-minute mandatory refresh window: every
    AWS call asks it again. While ``failing`` it answers 500, as an endpoint having a bad moment."""

    def __init__(self) -> None:
        self.failing = False
        self.refused = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _credentials(self, _: web.Request) -> web.Response:
        if self.failing:
            self.refused += 1
            return web.Response(status=500, text="credentials endpoint unavailable")
        expires = datetime.now(UTC) + timedelta(minutes=5)
        return web.json_response(
            {
                "AccessKeyId": "testing",
                "SecretAccessKey": "testing",
                "Token": "testing-session-token",
                "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )

    async def __aenter__(self) -> CredentialsEndpoint:
        app = web.Application()
        app.router.add_get("/credentials", self._credentials)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/credentials"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_credentials_that_cannot_be_refreshed_for_a_while_are_waited_out(
    pg: asyncpg.Connection, aws_settings: AwsSettings, queues: QueuePair, database_url: str
) -> None:
    # GIVEN `jiralake consumer` taking its credentials from a container credentials endpoint (a task
    # or pod role), with one event applied
    async with CredentialsEndpoint() as credentials:
        env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        env.update(
            AWS_CONTAINER_CREDENTIALS_FULL_URI=credentials.url,
            DATABASE_URL=database_url,
            JIRALAKE_QUEUE_URL=queues.queue_url,
            JIRALAKE_DLQ_URL=queues.dlq_url,
            JIRALAKE_CONSUMER_WAIT_S="1",
            JIRALAKE_CONSUMER_UNAVAILABLE_BACKOFF_S="0.5",
        )
        child = await _consumer_child(env, free_port())
        try:
            await enqueue(aws_settings, queues.queue_url, [_created(1)])
            await wait_for(lambda: _history_is(pg, 1), timeout_s=30, what="the first event applied")
            # WHEN the endpoint fails for a while, and an event arrives meanwhile
            credentials.failing = True
            await wait_for(holds(lambda: credentials.refused >= 3), timeout_s=30, what="refused refreshes")
            await enqueue(aws_settings, queues.queue_url, [_created(2)])
            credentials.failing = False
            # THEN the consumer waited (it did not exit) and applies the event once it can
            await wait_for(lambda: _history_is(pg, 2), timeout_s=30, what="the second event applied")
            assert child.returncode is None
            child.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(child.wait(), timeout=20) == 0
            assert child.stderr is not None
            log = (await child.stderr.read()).decode()
            assert '"event": "dependency_unavailable"' in log
            assert '"error_class": "CredentialRetrievalError"' in log
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()


async def test_while_postgres_is_down_it_is_not_ready_and_receives_nothing(
    aws_settings: AwsSettings, queues: QueuePair, db_settings: DatabaseSettings
) -> None:
    # GIVEN an event on the queue and a consumer whose Postgres does not answer
    await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, ts=1))])
    dead_db = DatabaseSettings(url=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    settings: ConsumerSettings = replace(
        consumer_settings(aws_settings, queues, db_settings), database=dead_db, admin_port=free_port()
    )
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(run_consumer(settings, stop))
        try:
            # WHEN it has tried a few times
            await wait_for(
                holds(lambda: sum(e["event"] == "dependency_unavailable" for e in logs) >= 3),
                what="retries",
            )
            # THEN /readyz says why, /healthz is fine
            status, body = await _get(f"http://127.0.0.1:{settings.admin_port}/readyz")
            assert status == 503 and '"reason": "postgres: ' in body
            assert (await _get(f"http://127.0.0.1:{settings.admin_port}/healthz"))[0] == 200
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)
    # AND the event was never received (its receive count is untouched, nothing burnt toward the DLQ)
    (message,) = await drain(aws_settings, queues.queue_url)
    assert message["Attributes"]["ApproximateReceiveCount"] == "1"


async def _consumer_child(env: dict[str, str], admin_port: int) -> asyncio.subprocess.Process:
    """`jiralake consumer` with one poller as a child process, its JSON log on its stderr pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "--log-json", "consumer", "--pollers", "1",
        "--admin-port", str(admin_port), env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def _created(issue_id: int) -> Envelope:
    return envelope_of(make_event(CREATED, issue_id=issue_id, ts=1))


async def _history_is(pg: asyncpg.Connection, n: int) -> bool:
    return await history_count(pg) == n


async def _metrics_show(url: str, line: str) -> bool:
    return line in (await _get(url))[1]
