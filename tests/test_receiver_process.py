"""``jiralake receiver`` as a process: graceful SIGTERM with a pending batch, refusing to start without
a secret, and ``serve()`` in-process with ``--insecure-no-signature`` semantics and with a body still
arriving when shutdown begins."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog.testing

from ops.local_aws import free_port
from receiver.main import serve
from receiver.settings import ReceiverSettings
from receiver.signature import sign
from shared.envelope import Envelope
from shared.provision import QueuePair
from shared.settings import AwsSettings
from tests import jira_fixtures
from tests.conftest import drain

SECRET = "process-test-secret"
DEADLINE_S = 20.0
# An hour: longer than any test runs, so a batch that leaves did not wait for this to run out. The
# SQS timeout must be at least twice as long (the receiver refuses to start otherwise).
BATCH_WAIT_MS = 3_600_000
SQS_TIMEOUT_S = 2 * BATCH_WAIT_MS // 1000


class LogLines:
    """Collects a child's JSON log lines from stderr and waits for one that matches."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(stream), name="child-log-reader")

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            text = line.decode("utf-8", "replace").rstrip()
            self.raw.append(text)
            try:
                self.lines.append(json.loads(text))
            except ValueError:
                pass
            self._changed.set()

    async def wait_for(self, event: str, deadline_s: float = DEADLINE_S) -> dict[str, Any]:
        async with asyncio.timeout(deadline_s):
            while True:
                for line in self.lines:
                    if line.get("event") == event:
                        return line
                if self._task.done():
                    raise AssertionError(f"child exited before logging {event!r}: {self.raw}")
                self._changed.clear()
                await self._changed.wait()

    def events(self) -> list[str]:
        return [str(line.get("event")) for line in self.lines]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on: its socket inodes, looked up in /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_admin_port_0_disables_the_admin_port(aws_settings: AwsSettings, queues: QueuePair) -> None:
    # GIVEN JIRALAKE_RECEIVER_ADMIN_PORT=0, as the consumer and the exporter take it
    port = free_port()
    async with receiver_child(queues, "--port", str(port)) as (child, logs):
        # WHEN it has started
        started = await logs.wait_for("receiver_started")
        # THEN it listens on the webhook port only (not on some random admin port), and says so
        assert started["admin_port"] is None
        assert listening_ports(child.pid) == {port}


async def test_port_0_listens_on_a_free_port_and_logs_which(queues: QueuePair) -> None:
    # GIVEN the receiver started with --port 0 (any free port)
    async with receiver_child(queues, "--port", "0") as (child, logs):
        # WHEN it has started
        started = await logs.wait_for("receiver_started")
        # THEN its start line names the port it listens on, and a webhook sent there is answered
        assert started["port"] != 0
        assert listening_ports(child.pid) == {started["port"]}
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{started['port']}/webhooks/jira"
            status, answer = await _post(http, url, b"{}", {"Content-Type": "application/json"})
    assert (status, answer["status"]) == (401, "unauthorized")


async def test_the_insecure_flag_is_ignored_with_a_warning_when_the_secret_is_set(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN the receiver started with JIRALAKE_WEBHOOK_SECRET set and --insecure-no-signature (a local
    # habit carried into a real deployment)
    port = free_port()
    async with receiver_child(queues, "--port", str(port), "--insecure-no-signature") as (_, logs):
        started = await logs.wait_for("receiver_started")
        # WHEN an unsigned webhook arrives
        body = jira_fixtures.raw("pinpoint-jira__jira_issue_created.json")
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/webhooks/jira"
            status, answer = await _post(http, url, body, {"Content-Type": "application/json"})
    # THEN signatures are still required: it is refused, and the start said the flag was ignored
    assert (status, answer["status"]) == (401, "unauthorized")
    assert started["unsigned_webhooks_accepted"] is False
    [ignored] = [line for line in logs.lines if line.get("event") == "insecure_flag_ignored"]
    assert ignored["level"] == "warning"
    assert await drain(aws_settings, queues.queue_url) == []


@contextlib.asynccontextmanager
async def receiver_child(
    queues: QueuePair, *args: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, LogLines]]:
    """`jiralake receiver --host 127.0.0.1 *args` as a child process with a secret, sending to ``queues``
    and without an admin port, stopped by SIGTERM (exit 0) on exit."""
    env = dict(
        os.environ,
        JIRALAKE_QUEUE_URL=queues.queue_url,
        JIRALAKE_WEBHOOK_SECRET=SECRET,
        JIRALAKE_RECEIVER_ADMIN_PORT="0",
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "receiver", "--host", "127.0.0.1", *args,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert child.stderr is not None
    logs = LogLines(child.stderr)
    try:
        yield child, logs
        child.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.wait(), DEADLINE_S) == 0, logs.raw
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_sigterm_flushes_the_pending_batch_answers_202_and_exits_0(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN `jiralake receiver` as a child process whose batches wait an hour to fill: an entry leaves
    # early only because of the shutdown, never because its wait ran out while the test runs
    port, admin_port = free_port(), free_port()
    env = dict(
        os.environ,  # AWS_ENDPOINT_URL and test credentials from the moto_server fixture
        JIRALAKE_QUEUE_URL=queues.queue_url,
        JIRALAKE_WEBHOOK_SECRET=SECRET,
        JIRALAKE_RECEIVER_ADMIN_PORT=str(admin_port),
        JIRALAKE_RECEIVER_BATCH_MAX_WAIT_MS=str(BATCH_WAIT_MS),
        JIRALAKE_RECEIVER_SQS_TIMEOUT_S=str(SQS_TIMEOUT_S),
        # Well below DEADLINE_S, so that an entry left for the final flush (after aiohttp's grace
        # for in-flight requests) still gets there while the test waits, and shows in the logs.
        JIRALAKE_RECEIVER_SHUTDOWN_GRACE_S="5",
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "--log-level", "DEBUG", "receiver",
        "--host", "127.0.0.1", "--port", str(port),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert child.stderr is not None
    logs = LogLines(child.stderr)
    try:
        started = await logs.wait_for("receiver_started")
        assert (started["port"], started["admin_port"], started["unsigned_webhooks_accepted"]) == (
            port,
            admin_port,
            False,
        )
        body = jira_fixtures.raw("zulip__issue_created_with_unicode.json")
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature": sign(SECRET, body),
            "X-Atlassian-Webhook-Identifier": "sigterm-1",
        }
        async with aiohttp.ClientSession() as http:
            admin = f"http://127.0.0.1:{admin_port}"
            async with http.get(f"{admin}/readyz") as ready:
                assert (ready.status, await ready.json()) == (200, {"status": "ready"})
            url = f"http://127.0.0.1:{port}/webhooks/jira"
            # AND /metrics counts what this test caused: one refused (unsigned) webhook
            assert (await _post(http, url, body, {"Content-Type": "application/json"}))[0] == 401
            async with http.get(f"{admin}/metrics") as metrics:
                exposed = await metrics.text()
            assert 'jiralake_receiver_requests_total{outcome="unauthorized"} 1.0' in exposed
            assert "jiralake_receiver_request_duration_seconds_count 1.0" in exposed
            # WHEN a webhook waits in a batch and the process gets SIGTERM
            posting = asyncio.create_task(_post(http, url, body, headers))
            await logs.wait_for("webhook_queued")
            assert not posting.done()
            child.send_signal(signal.SIGTERM)
            status, answer = await asyncio.wait_for(posting, DEADLINE_S)
        code = await asyncio.wait_for(child.wait(), DEADLINE_S)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    # THEN the pending entry was acknowledged and the exit is clean
    assert (status, answer["status"], answer["delivery_id"]) == (202, "accepted", "sigterm-1")
    assert code == 0, logs.raw
    # AND it was sent when shutdown began (drained while its request was in flight), not left for the
    # final flush after the grace period: one batch, sent between the signal and the batcher's close,
    # and nothing left for the close to flush
    events = logs.events()
    assert events.count("sqs_batch_sent") == 1
    assert (
        events.index("signal_received")
        < events.index("receiver_stopping_accepting_webhooks")
        < events.index("sqs_batch_sent")
        < events.index("sqs_batcher_closed")
        < events.index("receiver_stopped")
    ), events
    closed = [line for line in logs.lines if line.get("event") == "sqs_batcher_closed"]
    assert [line["flushed_entries"] for line in closed] == [0]
    [message] = await drain(aws_settings, queues.queue_url)
    assert Envelope.from_message(message).delivery_id == "sigterm-1"
    assert message["Body"] == body.decode("utf-8")
    assert SECRET not in "\n".join(logs.raw)


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


def test_starting_without_a_secret_is_refused_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k != "JIRALAKE_WEBHOOK_SECRET"}
    env["JIRALAKE_QUEUE_URL"] = "http://127.0.0.1:1/000000000000/never-used.fifo"
    result = subprocess.run(
        [sys.executable, "-m", "jiralake", "receiver", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "jiralake: configuration error: JIRALAKE_WEBHOOK_SECRET is not set; set it to the webhook's "
        "secret in Jira, or pass --insecure-no-signature to accept unsigned webhooks (local use only)"
    )


def test_starting_with_a_batch_wait_over_half_the_sqs_timeout_is_refused_in_one_line() -> None:
    env = dict(
        os.environ,
        JIRALAKE_QUEUE_URL="http://127.0.0.1:1/000000000000/never-used.fifo",
        JIRALAKE_WEBHOOK_SECRET=SECRET,
        JIRALAKE_RECEIVER_BATCH_MAX_WAIT_MS="6000",
        JIRALAKE_RECEIVER_SQS_TIMEOUT_S="5",
    )
    result = subprocess.run(
        [sys.executable, "-m", "jiralake", "receiver", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip() == (
        "jiralake: configuration error: JIRALAKE_RECEIVER_BATCH_MAX_WAIT_MS (6000 ms) must be at most "
        "half of JIRALAKE_RECEIVER_SQS_TIMEOUT_S (5 s), so that SQS has time to confirm a batch before "
        "its requests stop waiting"
    )


async def test_serve_without_a_secret_warns_accepts_unsigned_and_restores_signal_handlers(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN settings as `--insecure-no-signature` makes them, with no secret in the environment
    env = {"JIRALAKE_QUEUE_URL": queues.queue_url, "JIRALAKE_RECEIVER_ADMIN_PORT": str(free_port())}
    env |= {"AWS_ENDPOINT_URL": aws_settings.endpoint_url or "", "AWS_REGION": aws_settings.region}
    settings = ReceiverSettings.from_env(env, allow_unsigned=True).with_ports(
        host="127.0.0.1", port=free_port()
    )
    assert settings.webhook_secret is None
    handler_before = signal.getsignal(signal.SIGTERM)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(serve(settings, stop=stop))
        await _until(lambda: any(e["event"] == "receiver_started" for e in logs), task)
        # WHEN an unsigned webhook arrives
        body = jira_fixtures.raw("pinpoint-jira__jira_issue_created.json")
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{settings.port}/webhooks/jira"
            status, answer = await _post(http, url, body, {"Content-Type": "application/json"})
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
    # THEN it is accepted, the start was logged as a warning, and SIGTERM's handler is as before
    assert (status, answer["status"]) == (202, "accepted")
    [warning] = [e for e in logs if e["event"] == "webhook_signatures_disabled"]
    assert warning["log_level"] == "warning"
    assert signal.getsignal(signal.SIGTERM) == handler_before
    assert len(await drain(aws_settings, queues.queue_url)) == 1


async def _until(condition: Callable[[], bool], task: asyncio.Task[None]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not condition():
            if task.done():
                task.result()
                raise AssertionError("serve() returned before it started")
            await asyncio.sleep(0.01)


async def test_a_body_still_arriving_at_shutdown_is_read_answered_and_queued(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a receiver serving in-process, with a grace period longer than the test waits for the answer,
    # AND a webhook whose handler runs (the go-ahead came) and whose body has partly arrived
    settings = _settings_with_grace(aws_settings, queues, grace_s=2 * DEADLINE_S)
    async with _half_sent_webhook(settings, "mid-body") as sent:
        # WHEN the receiver is told to stop, and the rest of the body arrives after that
        sent.stop.set()
        await _until(
            lambda: any(e["event"] == "receiver_stopping_accepting_webhooks" for e in sent.logs), sent.serving
        )
        sent.writer.write(sent.body[_FIRST_BYTES:])
        await sent.writer.drain()
        answer = await asyncio.wait_for(sent.reader.read(), DEADLINE_S)  # until the receiver closes
    # THEN the request got its real answer, on a connection closed after it, and the event is queued
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 202 Accepted", answer
    assert b"Connection: close" in rest.split(b"\r\n\r\n")[0]
    assert [(e["outcome"], e["delivery_id"]) for e in sent.logs if e["event"] == "webhook"] == [
        ("accepted", "mid-body")
    ]
    [message] = await drain(aws_settings, queues.queue_url)
    assert Envelope.from_message(message).delivery_id == "mid-body"


async def test_a_body_that_never_finishes_holds_shutdown_for_the_grace_period_only(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a receiver with a 1 s grace period and a webhook whose body stops arriving halfway
    settings = _settings_with_grace(aws_settings, queues, grace_s=1.0)
    async with _half_sent_webhook(settings, "never-finished") as sent:
        # WHEN the receiver is told to stop
        sent.stop.set()
        answer = await asyncio.wait_for(sent.reader.read(), DEADLINE_S)
    # THEN it stopped after the grace period, named what it left, and closed the connection unanswered
    assert answer == b""
    [still] = [e for e in sent.logs if e["event"] == "receiver_requests_still_running"]
    assert (still["requests"], still["grace_s"], still["log_level"]) == (1, 1.0, "warning")
    assert sent.logs[-1]["event"] == "receiver_stopped"
    assert await drain(aws_settings, queues.queue_url) == []


_FIRST_BYTES = 1000


@dataclass
class _HalfSent:
    body: bytes
    stop: asyncio.Event
    serving: asyncio.Task[None]
    logs: list[MutableMapping[str, Any]]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@contextlib.asynccontextmanager
async def _half_sent_webhook(settings: ReceiverSettings, delivery_id: str) -> AsyncIterator[_HalfSent]:
    """serve() running in-process, and one connection whose signed webhook's handler runs (it sent the
    headers with ``Expect: 100-continue`` and got the go-ahead) with the first bytes of its body sent.
    On exit, serve() is waited for (the test stops it)."""
    body = jira_fixtures.raw("pinpoint-jira__jira_issue_created.json")
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        serving = asyncio.create_task(serve(settings, stop=stop))
        await _until(lambda: any(e["event"] == "receiver_started" for e in logs), serving)
        reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
        try:
            writer.write(
                (
                    "POST /webhooks/jira HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nX-Hub-Signature: {sign(SECRET, body)}\r\n"
                    f"X-Atlassian-Webhook-Identifier: {delivery_id}\r\nExpect: 100-continue\r\n\r\n"
                ).encode()
            )
            go_ahead = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
            assert go_ahead == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body[:_FIRST_BYTES])
            await writer.drain()
            yield _HalfSent(body, stop, serving, logs, reader, writer)
        finally:
            writer.close()
        await asyncio.wait_for(serving, DEADLINE_S)


def _settings_with_grace(aws_settings: AwsSettings, queues: QueuePair, *, grace_s: float) -> ReceiverSettings:
    env = {
        "JIRALAKE_QUEUE_URL": queues.queue_url,
        "JIRALAKE_WEBHOOK_SECRET": SECRET,
        "JIRALAKE_RECEIVER_ADMIN_PORT": str(free_port()),
        "JIRALAKE_RECEIVER_SHUTDOWN_GRACE_S": str(grace_s),
        "AWS_ENDPOINT_URL": aws_settings.endpoint_url or "",
        "AWS_REGION": aws_settings.region,
    }
    return ReceiverSettings.from_env(env).with_ports(host="127.0.0.1", port=free_port())


def max_open_files(pid: int) -> tuple[int, int]:
    """Process ``pid``'s soft and hard limits on open files, from /proc."""
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    [line] = [line for line in limits if line.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def open_files_limit(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn that starts the child with these limits on open files."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def start_receiver(queue_url: str, port: int, limits: Callable[[], None]) -> tuple[Any, LogLines]:
    env = dict(
        os.environ,
        JIRALAKE_QUEUE_URL=queue_url,
        JIRALAKE_WEBHOOK_SECRET=SECRET,
        JIRALAKE_RECEIVER_ADMIN_PORT="0",
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "receiver", "--host", "127.0.0.1", "--port", str(port),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limits,
    )  # fmt: skip
    assert child.stderr is not None
    return child, LogLines(child.stderr)


async def stop(child: Any, logs: LogLines) -> None:
    if child.returncode is None:
        child.send_signal(signal.SIGTERM)
        try:
            assert await asyncio.wait_for(child.wait(), DEADLINE_S) == 0, logs.raw
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()


async def test_the_soft_limit_on_open_files_is_raised_to_the_hard_one(queues: QueuePair) -> None:
    # GIVEN a container runtime's usual start: a soft limit of 256 open files under a hard one of 4096
    child, logs = await start_receiver(queues.queue_url, free_port(), open_files_limit(256, 4096))
    try:
        # WHEN the receiver starts
        started = await logs.wait_for("receiver_started")
        # THEN it runs with the hard limit, and says so
        assert max_open_files(child.pid) == (4096, 4096)
        assert started["open_files_limit"] == 4096
    finally:
        await stop(child, logs)


async def test_running_out_of_file_descriptors_is_one_warning_then_it_serves_again(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a receiver that may open 64 files, no more
    port = free_port()
    child, logs = await start_receiver(queues.queue_url, port, open_files_limit(64, 64))
    try:
        await logs.wait_for("receiver_started")
        # WHEN 120 clients connect and stay idle, so accept() fails for lack of descriptors for a while
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(120)]
        warning = await logs.wait_for("receiver_cannot_accept_connections")
        await asyncio.sleep(3)  # asyncio retries accept() every second
        # THEN that is one WARNING line (per 10 s) naming the error, not an ERROR with a traceback per try
        assert (warning["level"], warning["error"]) == ("warning", "OSError: Too many open files")
        assert logs.events().count("receiver_cannot_accept_connections") == 1
        assert [line for line in logs.lines if line.get("level") in ("error", "critical")] == []
        assert not any("Traceback" in line for line in logs.raw)
        # AND once the idle clients go, a webhook is accepted again
        for _, writer in idle:
            writer.close()
        body = jira_fixtures.raw("zulip__issue_created_with_unicode.json")
        headers = {"Content-Type": "application/json", "X-Hub-Signature": sign(SECRET, body)}
        async with aiohttp.ClientSession() as http:
            status, _ = await _post(http, f"http://127.0.0.1:{port}/webhooks/jira", body, headers)
        assert status == 202
    finally:
        await stop(child, logs)
    assert len(await drain(aws_settings, queues.queue_url)) == 1
