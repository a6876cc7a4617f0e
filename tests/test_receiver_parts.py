"""The receiver's parts on their own: settings, the signature check, header parsing, and the
micro-batcher's limits and shutdown against moto's SQS."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.exceptions import ClientError
from prometheus_client import REGISTRY

from receiver.batcher import BatcherClosed, BatcherFull, SqsBatcher
from receiver.intake import retry_count
from receiver.main import SQS_USER_AGENT, BatcherStopped, until_stopped
from receiver.settings import WEBHOOK_EVENT_PREFIXES, ReceiverSettings, parse_accepted_events
from receiver.signature import MATCHED_CURRENT, BadSignature, WebhookSecrets, sign, verify
from shared import aws
from shared.envelope import Envelope
from shared.provision import QueuePair
from shared.settings import AwsSettings, ConfigError
from shared.sqs_batch import EntryResult, entry_bytes
from tests.conftest import drain

# -- settings ---------------------------------------------------------------------------------


def test_settings_from_a_minimal_environment_take_the_documented_defaults() -> None:
    env = {"JIRALAKE_QUEUE_URL": "http://q/1/jira.fifo", "JIRALAKE_WEBHOOK_SECRET": " s3cret\n"}
    settings = ReceiverSettings.from_env(env)
    assert settings.webhook_secret == "s3cret"
    assert (settings.host, settings.port, settings.admin_port) == ("0.0.0.0", 8080, 9090)
    assert settings.max_body_bytes == 1_048_576
    assert (settings.batch_max_wait_ms, settings.sqs_timeout_s) == (5.0, 5.0)
    assert settings.accepted_event_prefixes == (
        "jira:issue_",
        "jira:worklog_",
        "comment_",
        "worklog_",
        "attachment_",
        "issuelink_",
    )
    assert "s3cret" not in repr(settings)


def test_settings_read_every_receiver_variable() -> None:
    env = {
        "JIRALAKE_QUEUE_URL": "http://q/1/jira.fifo",
        "JIRALAKE_WEBHOOK_SECRET": "x",
        "JIRALAKE_RECEIVER_HOST": "127.0.0.1",
        "JIRALAKE_RECEIVER_PORT": "8000",
        "JIRALAKE_RECEIVER_ADMIN_PORT": "9000",
        "JIRALAKE_MAX_BODY_BYTES": "262144",
        "JIRALAKE_ACCEPTED_EVENTS": "jira:issue_, comment_created",
        "JIRALAKE_RECEIVER_BATCH_MAX_WAIT_MS": "2.5",
        "JIRALAKE_RECEIVER_MAX_PENDING": "50",
        "JIRALAKE_RECEIVER_MAX_BODIES_READING": "16",
        "JIRALAKE_RECEIVER_MAX_INFLIGHT_BATCHES": "3",
        "JIRALAKE_RECEIVER_SQS_TIMEOUT_S": "2",
        "JIRALAKE_RECEIVER_SHUTDOWN_GRACE_S": "7",
    }
    s = ReceiverSettings.from_env(env).with_ports(port=8001)
    assert (s.host, s.port, s.admin_port, s.max_body_bytes) == ("127.0.0.1", 8001, 9000, 262144)
    assert s.accepted_event_prefixes == ("jira:issue_", "comment_created")
    assert (s.batch_max_wait_ms, s.max_pending_entries, s.max_inflight_batches) == (2.5, 50, 3)
    assert s.max_bodies_reading == 16
    assert (s.sqs_timeout_s, s.shutdown_grace_s) == (2.0, 7.0)


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        (
            "JIRALAKE_RECEIVER_PORT",
            "70000",
            "JIRALAKE_RECEIVER_PORT must be a port number, 0..65535, got 70000",
        ),
        ("JIRALAKE_RECEIVER_ADMIN_PORT", "65536", "must be a port number, 0..65535, got 65536"),
        ("JIRALAKE_RECEIVER_SQS_TIMEOUT_S", "nan", "JIRALAKE_RECEIVER_SQS_TIMEOUT_S must be a finite number"),
        ("JIRALAKE_RECEIVER_SHUTDOWN_GRACE_S", "inf", "must be a finite number, got 'inf'"),
    ],
)
def test_out_of_range_ports_and_non_finite_numbers_are_config_errors(
    name: str, raw: str, message: str
) -> None:
    # A port above 65535 crashed the server at bind time (a traceback); nan and inf passed every
    # minimum check (nan compares false) and made timeouts that never or always fire.
    env = {"JIRALAKE_QUEUE_URL": "http://q/1/jira.fifo", "JIRALAKE_WEBHOOK_SECRET": "x", name: raw}
    with pytest.raises(ConfigError, match=re.escape(message)):
        ReceiverSettings.from_env(env)


def test_a_missing_secret_is_refused_unless_unsigned_webhooks_are_allowed() -> None:
    env = {"JIRALAKE_QUEUE_URL": "http://q/1/jira.fifo"}
    with pytest.raises(ConfigError, match="^JIRALAKE_WEBHOOK_SECRET is not set;"):
        ReceiverSettings.from_env(env)
    assert ReceiverSettings.from_env(env, allow_unsigned=True).webhook_secret is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("sprint_", "JIRALAKE_ACCEPTED_EVENTS: 'sprint_' does not concern an issue; each entry must start "
         "with one of jira:issue_, jira:worklog_, comment_, worklog_, attachment_, issuelink_"),
        ("jira:issue_, jiralake:issue_", "JIRALAKE_ACCEPTED_EVENTS: 'jiralake:issue_' is an event jiralake "
         "makes itself; webhooks cannot send it"),
        (" , ", "JIRALAKE_ACCEPTED_EVENTS lists no event types"),
    ],
)  # fmt: skip
def test_accepted_events_must_concern_issues_and_come_from_jira(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_accepted_events(raw)
    assert str(err.value) == message


def test_the_webhook_and_admin_ports_must_differ() -> None:
    env = {"JIRALAKE_QUEUE_URL": "http://q/1/jira.fifo", "JIRALAKE_WEBHOOK_SECRET": "x"}
    with pytest.raises(ConfigError, match="the receiver port and JIRALAKE_RECEIVER_ADMIN_PORT are both 9090"):
        ReceiverSettings.from_env(env).with_ports(port=9090)


def batching_env(wait_ms: str, timeout_s: str) -> dict[str, str]:
    return {
        "JIRALAKE_QUEUE_URL": "http://q/1/jira.fifo",
        "JIRALAKE_WEBHOOK_SECRET": "x",
        "JIRALAKE_RECEIVER_BATCH_MAX_WAIT_MS": wait_ms,
        "JIRALAKE_RECEIVER_SQS_TIMEOUT_S": timeout_s,
    }


@pytest.mark.parametrize(("wait_ms", "timeout_s"), [("6000", "5"), ("2501", "5"), ("51", "0.1")])
def test_a_batch_wait_over_half_the_sqs_timeout_is_refused_naming_both_variables(
    wait_ms: str, timeout_s: str
) -> None:
    # A batch that waits as long as the SQS timeout answers every webhook at low traffic 503 unstored.
    with pytest.raises(ConfigError) as err:
        ReceiverSettings.from_env(batching_env(wait_ms, timeout_s))
    assert str(err.value) == (
        f"JIRALAKE_RECEIVER_BATCH_MAX_WAIT_MS ({wait_ms} ms) must be at most half of "
        f"JIRALAKE_RECEIVER_SQS_TIMEOUT_S ({timeout_s} s), so that SQS has time to confirm a "
        "batch before its requests stop waiting"
    )


@pytest.mark.parametrize(("wait_ms", "timeout_s"), [("2500", "5"), ("50", "0.1"), ("0", "0.1")])
def test_a_batch_wait_up_to_half_the_sqs_timeout_is_accepted(wait_ms: str, timeout_s: str) -> None:
    settings = ReceiverSettings.from_env(batching_env(wait_ms, timeout_s))
    assert (settings.batch_max_wait_ms, settings.sqs_timeout_s) == (float(wait_ms), float(timeout_s))


def test_internal_events_are_not_accepted_from_webhooks_by_default() -> None:
    assert not any(p.startswith("jiralake:") for p in WEBHOOK_EVENT_PREFIXES)


# -- signature and headers --------------------------------------------------------------------


def test_signature_matches_the_published_hmac_sha256_vector() -> None:
    # RFC 4231-style known answer (the "quick brown fox" HMAC-SHA256 example)
    body = b"The quick brown fox jumps over the lazy dog"
    assert sign("key", body) == "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    assert verify(WebhookSecrets("key"), body, sign("key", body)) == MATCHED_CURRENT
    upper = sign("key", body).upper().replace("SHA256=", "sha256=")
    assert verify(WebhookSecrets("key"), body, upper) == MATCHED_CURRENT


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (None, "missing X-Hub-Signature header"),
        ("  ", "missing X-Hub-Signature header"),
        ("sha1=" + "0" * 40, "X-Hub-Signature must be sha256=<64 hex digits>"),
        ("sha256=xyz", "X-Hub-Signature must be sha256=<64 hex digits>"),
        ("sha256=" + "0" * 64, "X-Hub-Signature does not match the body"),
    ],
)
def test_signature_problems_are_named_without_echoing_values(header: str | None, problem: str) -> None:
    with pytest.raises(BadSignature) as refused:
        verify(WebhookSecrets("key"), b"{}", header)
    assert str(refused.value) == problem


@pytest.mark.parametrize(
    ("header", "count"),
    [(None, 0), ("0", 0), ("3", 3), (" 2 ", 2), ("-1", 0), ("abc", 0), ("\uff11", 0), ("9999999999", 0)],
)
def test_retry_count_reads_plain_counts_only(header: str | None, count: int) -> None:
    assert retry_count(header) == count


def test_message_size_counts_the_body_and_every_attribute_in_utf8_bytes() -> None:
    envelope = Envelope('{"a":"é"}', "jira:issue_created", "10001", 1, 2, "d-1", 0)
    entry = envelope.send_entry("0")
    attributes = sum(
        len(name) + len(a["DataType"]) + len(a["StringValue"])
        for name, a in entry["MessageAttributes"].items()
    )
    assert entry_bytes(entry) == 10 + attributes


# -- the batcher against moto ------------------------------------------------------------------


def entry(queue_body: str, n: int, issue_id: str = "10001") -> dict[str, Any]:
    envelope = Envelope(queue_body, "jira:issue_updated", issue_id, n, n, f"delivery-{n}", 0)
    return envelope.send_entry("0")


def batch_calls() -> float:
    return sum(
        REGISTRY.get_sample_value(
            "jiralake_sqs_requests_total", {"operation": "SendMessageBatch", "outcome": outcome}
        )
        or 0.0
        for outcome in ("ok", "error")
    )


@asynccontextmanager
async def batcher_on(aws_settings: AwsSettings, queue_url: str, **options: Any) -> AsyncIterator[SqsBatcher]:
    values: dict[str, Any] = {"max_wait_s": 0.005, "max_pending": 100, "max_inflight": 4, "timeout_s": 5.0}
    values.update(options)
    async with aws.sqs_client(aws_settings) as sqs:
        batcher = SqsBatcher(sqs, queue_url, **values)
        batcher.start()
        try:
            yield batcher
        finally:
            await batcher.close(grace_s=5)


async def test_batches_are_split_to_stay_under_sqs_payload_limit(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN three entries of ~400 KB each (SQS takes at most 1 MiB per SendMessageBatch call)
    bodies = [json.dumps({"n": n, "pad": "x" * 400_000}) for n in range(3)]
    before = batch_calls()
    # WHEN they are submitted together
    async with batcher_on(aws_settings, queues.queue_url, max_wait_s=0.05) as batcher:
        results = await asyncio.gather(*(batcher.submit(entry(b, n)) for n, b in enumerate(bodies)))
    # THEN two calls carry them (2 + 1) and all three are stored
    assert [r.ok for r in results] == [True, True, True]
    assert batch_calls() - before == 2
    assert sorted(m["Body"] for m in await drain(aws_settings, queues.queue_url)) == sorted(bodies)


async def test_beyond_max_pending_entries_are_refused_and_close_flushes_the_waiting_ones(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a batcher that waits up to 60 s for a fuller batch and holds at most 2 entries
    async with batcher_on(aws_settings, queues.queue_url, max_wait_s=60, max_pending=2) as batcher:
        waiting = [batcher.submit(entry("{}", 1, "1")), batcher.submit(entry("{}", 2, "2"))]
        # WHEN a third arrives, it is refused at once (the receiver answers 503)
        with pytest.raises(BatcherFull):
            batcher.submit(entry("{}", 3, "3"))
        assert not any(f.done() for f in waiting)
        # WHEN the batcher closes, the waiting entries are sent at once, not after 60 s
        async with asyncio.timeout(10):
            await batcher.close(grace_s=5)
        assert [f.result().ok for f in waiting] == [True, True]
        with pytest.raises(BatcherClosed):
            batcher.submit(entry("{}", 4, "4"))
    assert len(await drain(aws_settings, queues.queue_url)) == 2


async def test_close_gives_up_after_the_grace_period_and_fails_what_sqs_never_confirmed(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN an SQS endpoint that accepts connections and never answers
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    hanging = AwsSettings(aws_settings.region, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        async with aws.sqs_client(hanging) as sqs:
            batcher = SqsBatcher(
                sqs, queues.queue_url, max_wait_s=0, max_pending=10, max_inflight=1, timeout_s=30
            )
            batcher.start()
            # AND one entry in a call that hangs, one waiting for the only call slot
            sent_before = batch_sizes_observed()
            in_flight = batcher.submit(entry("{}", 1))
            async with asyncio.timeout(5):
                while batch_sizes_observed() == sent_before:  # noqa: ASYNC110 (polling a metric, with a deadline)
                    await asyncio.sleep(0.005)
            waiting = batcher.submit(entry("{}", 2))
            # WHEN shutdown allows 0.2 s
            async with asyncio.timeout(5):
                await batcher.close(grace_s=0.2)
    finally:
        for writer in held:
            writer.close()
        server.close()
    # THEN both requests learn their entry was not confirmed (503, Jira retries); none waits forever.
    # The one whose call was under way may have been stored all the same; the waiting one was not.
    assert in_flight.result() == EntryResult(
        "-", False, "the send was cancelled at shutdown", retryable=True, maybe_stored=True
    )
    assert waiting.result() == EntryResult(
        "-", False, "the receiver shut down before SQS confirmed the message", retryable=True
    )


def batch_sizes_observed() -> float:
    return REGISTRY.get_sample_value("jiralake_receiver_batch_entries_count") or 0.0


# -- the receiver's SQS client settings ---------------------------------------------------------


async def test_the_receivers_client_settings_keep_retries_and_error_parsing(
    aws_settings: AwsSettings,
) -> None:
    # GIVEN an SQS endpoint that fails the first SendMessageBatch with a 500, then stores it, and
    # answers GetQueueAttributes with SQS's error for a missing queue
    seen: list[tuple[str, str]] = []

    async def sqs_api(request: web.Request) -> web.Response:
        target = request.headers["X-Amz-Target"]
        seen.append((target, request.headers["User-Agent"]))
        if target == "AmazonSQS.GetQueueAttributes":
            error = {"__type": "com.amazonaws.sqs#QueueDoesNotExist", "message": "no such queue"}
            return web.json_response(error, status=400, content_type="application/x-amz-json-1.0")
        if len(seen) == 1:
            error = {"__type": "com.amazonaws.sqs#InternalError", "message": "try again"}
            return web.json_response(error, status=500, content_type="application/x-amz-json-1.0")
        stored = {"Successful": [{"Id": "0", "MessageId": "m-1", "MD5OfMessageBody": "x"}], "Failed": []}
        return web.json_response(stored, content_type="application/x-amz-json-1.0")

    app = web.Application()
    app.router.add_post("/", sqs_api)
    async with TestServer(app, host="127.0.0.1") as server:
        endpoint = AwsSettings(aws_settings.region, str(server.make_url("/")))
        # WHEN the receiver's client (as receiver.main makes it) sends a batch and asks for attributes
        client = aws.sqs_client(endpoint, timeout_s=5, parameter_validation=False, user_agent=SQS_USER_AGENT)
        async with client as sqs:
            sent = await sqs.send_message_batch(
                QueueUrl="http://q/1/q.fifo",
                Entries=[
                    {"Id": "0", "MessageBody": "{}", "MessageGroupId": "1", "MessageDeduplicationId": "d"}
                ],
            )
            with pytest.raises(ClientError) as refused:
                await sqs.get_queue_attributes(QueueUrl="http://q/1/q.fifo", AttributeNames=["All"])
    # THEN the 500 was retried, SQS's error code is parsed, and every call carries the fixed User-Agent
    assert [target for target, _ in seen] == [
        "AmazonSQS.SendMessageBatch",
        "AmazonSQS.SendMessageBatch",
        "AmazonSQS.GetQueueAttributes",
    ]
    assert [ok["Id"] for ok in sent["Successful"]] == ["0"]
    assert refused.value.response["Error"]["Code"] == "QueueDoesNotExist"
    assert all(agent.startswith(SQS_USER_AGENT + " ") for _, agent in seen)


# -- the process stops when its batcher does ----------------------------------------------------


async def test_serving_ends_with_an_error_when_the_batcher_task_ends_first(aws_settings: AwsSettings) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        batcher = SqsBatcher(
            sqs, "http://q/1/q.fifo", max_wait_s=0.05, max_pending=10, max_inflight=1, timeout_s=5
        )
        batcher.start()
        # GIVEN a receiver serving: it waits for a stop signal
        stop = asyncio.Event()
        serving = asyncio.create_task(until_stopped(stop, batcher))
        await asyncio.sleep(0.05)
        assert not serving.done()
        # WHEN the batcher's task ends though nobody asked the receiver to stop
        await batcher.close(grace_s=1)
        # THEN serving ends with an error (the process exits non-zero and its supervisor restarts it)
        # rather than answering 503 forever while /healthz says ok
        with pytest.raises(BatcherStopped, match="the sqs-batcher task ended"):
            await asyncio.wait_for(serving, timeout=5)


async def test_a_stop_signal_ends_serving_and_leaves_the_batcher_to_the_shutdown(
    aws_settings: AwsSettings,
) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        batcher = SqsBatcher(
            sqs, "http://q/1/q.fifo", max_wait_s=0.05, max_pending=10, max_inflight=1, timeout_s=5
        )
        batcher.start()
        stop = asyncio.Event()
        serving = asyncio.create_task(until_stopped(stop, batcher))
        # WHEN the stop signal arrives THEN serving returns and the batcher still runs for the drain
        stop.set()
        await asyncio.wait_for(serving, timeout=5)
        assert batcher.problem is None
        await batcher.close(grace_s=1)
