"""Hostile input at the receiver: mutated real webhooks and random bytes (hypothesis), and the explicit
cases: huge bodies, deep nesting, invalid UTF-8, NUL characters and SQL-looking text end to end into
Postgres, slow and idle clients, oversized headers, a gzip bomb.

What must hold for every input: never a 5xx, the server keeps answering ``/healthz``, nothing is
queued without a valid signature, and a signed input is queued exactly when the full (slow) parsing
path accepts it. The number of inputs tried is printed in pytest's terminal summary.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from ops.local_aws import free_port
from receiver.app import build_app, server_options
from receiver.settings import WEBHOOK_EVENT_PREFIXES, ReceiverSettings
from receiver.signature import sign
from shared import aws
from shared.envelope import body_sha256
from shared.jira_event import Ignored, InvalidEvent, route
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from tests import fuzz_report, jira_fixtures
from tests.conftest import consume_all, drain
from tests.test_consumer_helpers import holds, wait_for
from tests.test_receiver import receiver_settings as receiver_test_settings
from tests.test_receiver import requests_counted

SECRET = "hostile-input-secret"
WRONG_SECRET = "not-the-secret"
JSON_TYPE = "application/json"
ISSUE_FIXTURE = "mattermost-plugin-jira__webhook-issue-created.json"
# Bounds only a wait that would otherwise hang (a server that never answers or never closes).
HANG_GUARD_S = 30.0
FUZZ = settings(
    max_examples=fuzz_report.FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Harness:
    """The receiver on aiohttp's test server (with the real connection limits) and what it queued."""

    client: TestClient[Any, Any]
    queue_url: str
    sqs: Any
    report: fuzz_report.FuzzReport
    # sha256 of every body answered 202 accepted: the queue must hold exactly these (no delivery
    # header, so the body's hash is the deduplication id).
    accepted: set[str] = field(default_factory=set)

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with self.client.post(
            "/webhooks/jira", data=body, headers=headers, skip_auto_headers=("Content-Type",)
        ) as response:
            return response.status, await response.json()

    async def queued(self) -> int:
        attrs = await self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
        values = attrs["Attributes"]
        return int(values["ApproximateNumberOfMessages"]) + int(
            values["ApproximateNumberOfMessagesNotVisible"]
        )

    async def assert_alive(self) -> None:
        async with self.client.get("/healthz") as response:
            assert response.status == 200


def receiver_settings(aws_settings: AwsSettings, queue_url: str, **overrides: Any) -> ReceiverSettings:
    """tests/test_receiver.py's settings with this file's secret and short client timeouts."""
    values: dict[str, Any] = {
        "webhook_secret": SECRET,
        "sqs_timeout_s": 10.0,
        "body_timeout_s": 1.0,
        "idle_timeout_s": 1.5,
    }
    return receiver_test_settings(aws_settings, queue_url, **{**values, **overrides})


@pytest.fixture
async def harness(
    aws_settings: AwsSettings, queues: QueuePair, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    # A test may override settings: @pytest.mark.parametrize("harness", [{...}], indirect=True).
    settings = receiver_settings(aws_settings, queues.queue_url, **getattr(request, "param", {}))
    async with aws.sqs_client(aws_settings) as sqs:
        server = TestServer(build_app(settings, sqs))
        # Started here: TestServer drops keywords given to its constructor.
        await server.start_server(**server_options(settings))
        async with TestClient(server) as client:
            yield Harness(client, queues.queue_url, sqs, fuzz_report.report(request.config))


def signed(body: bytes, secret: str = SECRET, content_type: str | None = JSON_TYPE) -> dict[str, str]:
    headers = {"X-Hub-Signature": sign(secret, body)}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


def expected_outcome(body: bytes) -> str:
    """What the full parsing path (json.loads + the tolerant models) makes of a signed body, worked
    out independently of the receiver's fast path: accepted, ignored or bad_request."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "bad_request"

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        payload = json.loads(text, parse_constant=no_constants)
        routed = route(payload, WEBHOOK_EVENT_PREFIXES)
    except (ValueError, RecursionError, InvalidEvent):
        return "bad_request"
    if isinstance(routed, Ignored):
        return "ignored"
    # The event type travels as an SQS message attribute: only a plain name is taken (found by
    # `make soak`: a mutation to "comment_\x7freated" keeps an accepted prefix but is no such name).
    if not re.fullmatch(r"[A-Za-z0-9:_.\-]{1,128}", routed.event_type):
        return "bad_request"
    return "accepted"


# -- mutations of real payloads ---------------------------------------------------------------

ODD_VALUES: list[Any] = [
    None,
    0,
    -1,
    True,
    "",
    "x",
    [],
    {},
    1e308,
    10**30,
    "9" * 30,
    "\u0000",
    "\ud800",
    "'; DROP TABLE ap_jira_task; --",
    {"id": None},
    # A time, but one the consumer cannot store (as `updated`: the event is refused, never queued).
    "0001-01-01T00:00:00.000+1400",
]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON value (dict keys and list indexes)."""
    found: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, child in value.items():
            found.append((*prefix, key))
            found.extend(paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.append((*prefix, index))
            found.extend(paths(child, (*prefix, index)))
    return found


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A real webhook body with one or two mutations: byte flips, truncation, spliced bytes, a field
    deleted, or a field's value replaced by one of another type."""
    name = draw(st.sampled_from(jira_fixtures.names()))
    body = jira_fixtures.raw(name)
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "delete", "retype"]))
        if kind in ("delete", "retype"):
            try:
                payload = json.loads(body)
            except ValueError:
                kind = "flip"
            else:
                keys = paths(payload)
                if keys:
                    path = draw(st.sampled_from(keys))
                    changed = copy.deepcopy(payload)
                    parent = changed
                    for step in path[:-1]:
                        parent = parent[step]
                    if kind == "delete":
                        del parent[path[-1]]
                    else:
                        parent[path[-1]] = draw(st.sampled_from(ODD_VALUES))
                    body = json.dumps(changed).encode("utf-8")
                continue
        if not body:
            body = b"{"
        at = draw(st.integers(0, len(body) - 1))
        if kind == "flip":
            body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
        elif kind == "truncate":
            body = body[:at]
        else:
            body = body[:at] + draw(st.binary(min_size=1, max_size=16)) + body[at:]
    return body


async def check_signed(harness: Harness, body: bytes, kind: str) -> None:
    harness.report.counts[kind] += 1
    status, answer = await harness.post(body, signed(body))
    expected = expected_outcome(body)
    assert status < 500, (status, answer)
    assert answer["status"] == expected, (answer, body[:300])
    if expected == "accepted":
        assert status == 202
        harness.accepted.add(body_sha256(body))
    elif expected == "ignored":
        assert status == 202
    else:
        assert status == 400 and answer["reason"], answer
    # THEN the queue holds exactly the bodies accepted so far, and the server still answers
    assert await harness.queued() == len(harness.accepted)
    await harness.assert_alive()


async def check_unsigned(harness: Harness, body: bytes, headers: dict[str, str], kind: str) -> None:
    harness.report.counts[kind] += 1
    before = await harness.queued()
    status, answer = await harness.post(body, headers)
    assert status == 401, (status, answer)
    assert answer["reason"]
    assert await harness.queued() == before
    await harness.assert_alive()


# Found by `make soak`: an accepted prefix ("comment_") on a type no message attribute can carry.
_CONTROL_IN_EVENT_TYPE = jira_fixtures.raw("jira-to-matrix__comment_created.json").replace(
    b'"comment_created"', b'"comment_\x7freated"', 1
)


@FUZZ
@given(body=mutated_payloads())
@example(body=_CONTROL_IN_EVENT_TYPE)
async def test_signed_mutated_payloads_are_queued_exactly_when_valid(harness: Harness, body: bytes) -> None:
    await check_signed(harness, body, "mutated_signed")


@FUZZ
@given(body=st.binary(max_size=2048))
async def test_signed_random_bytes_never_crash_the_receiver(harness: Harness, body: bytes) -> None:
    await check_signed(harness, body, "random_signed")


@FUZZ
@given(
    body=st.one_of(mutated_payloads(), st.binary(max_size=2048)),
    signature=st.one_of(
        st.none(),
        st.just("wrong-secret"),
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80),
    ),
    content_type=st.sampled_from([JSON_TYPE, None, "application/json; charset=UTF-8"]),
)
async def test_unsigned_or_mis_signed_inputs_never_reach_the_queue(
    harness: Harness, body: bytes, signature: str | None, content_type: str | None
) -> None:
    headers: dict[str, str] = {} if content_type is None else {"Content-Type": content_type}
    if signature == "wrong-secret":
        headers["X-Hub-Signature"] = sign(WRONG_SECRET, body)
    elif signature is not None:
        headers["X-Hub-Signature"] = signature
    await check_unsigned(harness, body, headers, "unsigned_or_mis_signed")


# -- explicit cases -----------------------------------------------------------------------------


async def test_a_body_over_the_limit_gets_413_and_nothing_is_queued(harness: Harness) -> None:
    # GIVEN a signed, otherwise valid issue event padded past JIRALAKE_MAX_BODY_BYTES (1 MiB)
    event = jira_fixtures.load(ISSUE_FIXTURE)
    event["padding"] = "x" * (1_048_576 + 10)
    body = json.dumps(event).encode()
    # WHEN it is sent with a Content-Length, and again chunked (no declared length)
    status, answer = await harness.post(body, signed(body))

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    async with harness.client.post("/webhooks/jira", data=chunks(), headers=signed(body)) as response:
        chunked = (response.status, (await response.json())["status"])
    # THEN both are 413, nothing is queued, and the server still answers
    assert (status, answer["status"]) == (413, "too_large")
    assert chunked == (413, "too_large")
    assert await harness.queued() == 0
    await harness.assert_alive()
    harness.report.counts["explicit"] += 2


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"a":' * 100_000,
        b'{"webhookEvent":"jira:issue_updated","issue":{"id":"1"},"x":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
    ],
    ids=["open-brackets", "open-objects", "balanced-inside-an-issue-event"],
)
async def test_deeply_nested_json_is_a_400_not_a_recursion_error(harness: Harness, body: bytes) -> None:
    status, answer = await harness.post(body, signed(body))
    assert (status, answer["status"]) == (400, "bad_request")
    assert "nested too deeply" in answer["reason"] or "not JSON" in answer["reason"], answer
    assert await harness.queued() == 0
    await harness.assert_alive()
    harness.report.counts["explicit"] += 1


async def test_digits_of_other_scripts_are_not_ids_or_times(harness: Harness) -> None:
    # str.isdigit() and \d take "²" and "١٢" (Arabic-Indic), which int() refuses (a 500) or SQS would
    # refuse as a MessageGroupId. A timestamp of them is no timestamp: the event is stamped with its
    # arrival. An issue id of them is no issue id: 400.
    odd_time = json.dumps({"webhookEvent": "jira:issue_updated", "timestamp": "²", "issue": {"id": 1}})
    odd_id = json.dumps({"webhookEvent": "jira:issue_updated", "timestamp": 1, "issue": {"id": "١٢"}})
    status, answer = await harness.post(odd_time.encode(), signed(odd_time.encode()))
    assert (status, answer["status"], answer["issue_id"]) == (202, "accepted", "1")
    status, answer = await harness.post(odd_id.encode(), signed(odd_id.encode()))
    assert (status, answer["status"]) == (400, "bad_request")
    assert answer["reason"] == "jira:issue_updated event has a non-numeric issue id '١٢'"
    assert await harness.queued() == 1
    await harness.assert_alive()
    harness.report.counts["explicit"] += 2


async def test_invalid_utf8_and_raw_control_characters_are_400(harness: Harness) -> None:
    event = jira_fixtures.raw(ISSUE_FIXTURE)
    cases = {
        b"\xff\xfe" + event: "body is not UTF-8 (invalid byte at offset 0)",
        event.replace(b'"summary": "', b'"summary": "\xc3\x28', 1): "body is not UTF-8",
        event.replace(b'"summary": "', b'"summary": "\x00', 1): "body is not JSON: Invalid control character",
        event + b"\x00": "body is not JSON: Extra data",
    }
    for body, reason in cases.items():
        assert body != event
        status, answer = await harness.post(body, signed(body))
        assert (status, answer["status"]) == (400, "bad_request")
        assert answer["reason"].startswith(reason), answer
    assert await harness.queued() == 0
    await harness.assert_alive()
    harness.report.counts["explicit"] += len(cases)


async def test_a_gzip_bomb_is_cut_off_at_the_body_limit(harness: Harness) -> None:
    # GIVEN 64 MiB of zeros gzipped to ~64 KiB, declared as Content-Encoding: gzip
    bomb = gzip.compress(b"0" * (64 * 1_048_576), compresslevel=9)
    headers = {"Content-Type": JSON_TYPE, "Content-Encoding": "gzip", "X-Hub-Signature": sign(SECRET, bomb)}
    status, answer = await harness.post(bomb, headers)
    # THEN reading stops at the limit (413); garbage declared as gzip is a 400, not a 500
    assert (status, answer["status"]) == (413, "too_large")
    garbage = b"not gzip at all" * 10
    status, answer = await harness.post(garbage, {**headers, "X-Hub-Signature": sign(SECRET, garbage)})
    assert status == 400 and answer["reason"].startswith("the body could not be read"), answer
    assert await harness.queued() == 0
    await harness.assert_alive()
    harness.report.counts["explicit"] += 2


async def test_oversized_headers_get_a_4xx(harness: Harness) -> None:
    body = jira_fixtures.raw(ISSUE_FIXTURE)
    host, port = harness.client.host, harness.client.server.port
    assert port is not None
    cases = {
        "long header value": {"X-Atlassian-Webhook-Identifier": "a" * 9000},
        "many headers": {f"X-Filler-{i}": "x" for i in range(150)},
    }
    for label, extra in cases.items():
        status = await raw_request(host, port, "/webhooks/jira", body, {**signed(body), **extra})
        assert 400 <= status < 500, label
    status = await raw_request(host, port, "/webhooks/jira?" + "q" * 9000, body, signed(body))
    assert 400 <= status < 500
    assert await harness.queued() == 0
    await harness.assert_alive()
    harness.report.counts["explicit"] += 3


async def raw_request(host: str, port: int, target: str, body: bytes, headers: dict[str, str]) -> int:
    """Send one request over a plain socket (aiohttp's client refuses oversized headers); its status."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        return int(status_line.split()[1])
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> None:
    """Wait until the server closes the connection: EOF, or a reset when it closed with bytes of ours
    still unread. The bound only turns a server that never closes into a failure instead of a hang
    (HANG_GUARD_S, far beyond any timeout configured here); it is not a claim about speed."""
    try:
        await asyncio.wait_for(reader.read(), HANG_GUARD_S)
    except ConnectionResetError:
        pass


# A body timeout of 5 s, not 1: the other client's webhook must be answered within it, and its answer
# waits for moto, which a loaded machine can stall for a second.
@pytest.mark.parametrize("harness", [{"body_timeout_s": 5.0}], indirect=True)
async def test_slow_and_idle_clients_are_cut_off_while_others_are_served(harness: Harness) -> None:
    host, port = harness.client.host, harness.client.port
    body = jira_fixtures.raw(ISSUE_FIXTURE)
    assert len(body) * 0.05 > 60  # the trickle takes more than a minute
    # GIVEN 100 idle connections, one that trickles its headers, and one that sends its headers but
    # trickles its body a byte at a time and never stops while its connection is open: the whole body
    # would take minutes (body_timeout_s=5, idle_timeout_s=1.5, a byte every 0.05 s)
    idle = [await asyncio.open_connection(host, port) for _ in range(100)]
    slow_headers = await asyncio.open_connection(host, port)
    slow_headers[1].write(b"POST /webhooks/jira HTTP/1.1\r\nHost: x\r\n")
    slow_body = await asyncio.open_connection(host, port)
    head = f"POST /webhooks/jira HTTP/1.1\r\nHost: x\r\nContent-Type: {JSON_TYPE}\r\n"
    head += f"X-Hub-Signature: {sign(SECRET, body)}\r\nContent-Length: {len(body)}\r\n\r\n"
    slow_body[1].write(head.encode() + body[:10])
    trickled = 10  # bytes of the body sent so far

    async def trickle() -> None:
        # The pace of a slow client (what is under test), not a wait for anything.
        nonlocal trickled
        for byte in body[10:]:
            await asyncio.sleep(0.05)
            if slow_body[1].is_closing():
                return
            slow_body[1].write(bytes([byte]))
            trickled += 1

    trickling = asyncio.create_task(trickle(), name="slow-body-trickle")
    try:
        slow_answer = asyncio.create_task(slow_body[0].readline())
        # WHEN another client sends a webhook meanwhile
        status, answer = await harness.post(body, signed(body))
        # THEN it is served while the slow clients still hold their connections: before the slow
        # body gets its answer (an order of events, not a speed: a server that served one request
        # at a time would answer it only after cutting the slow body off)
        assert (status, answer["status"]) == (202, "accepted")
        assert not slow_answer.done()
        # AND the slow body gets 408 while its client is still sending: the timeout runs from the
        # start of the body, it is not reset by each byte that arrives (a server that waited for a
        # pause, or for the whole body, could not answer before the trickle ends)
        status_line = await asyncio.wait_for(slow_answer, HANG_GUARD_S)
        trickled_at_answer = trickled
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        assert not trickling.done()
        assert 10 < trickled_at_answer < len(body)
        # AND its connection is closed although the client keeps sending: aiohttp reads and discards
        # the rest for at most LINGER_S (so the client sees the answer), it does not linger for as
        # long as bytes keep coming
        await closed_by_server(slow_body[0])
        assert trickled < len(body)
        # AND the idle connections and the one with unfinished headers are closed (idle_timeout_s)
        await closed_by_server(slow_headers[0])
        for reader, _ in idle:
            await closed_by_server(reader)
    finally:
        trickling.cancel()
        for _, writer in [*idle, slow_headers, slow_body]:
            writer.close()
    await harness.assert_alive()
    harness.report.counts["explicit"] += 102


# -- clients that hang up, bodies that do not decode: answered, logged once, never a traceback ----


@asynccontextmanager
async def served_as_in_production(
    aws_settings: AwsSettings, queue_url: str, **overrides: Any
) -> AsyncIterator[int]:
    """The receiver on an AppRunner as receiver.main serves it; yields its port. aiohttp's TestServer
    cancels a handler whose client went away, which a production server does not."""
    settings = receiver_settings(aws_settings, queue_url, **overrides)
    async with aws.sqs_client(aws_settings) as sqs:
        runner = web.AppRunner(build_app(settings, sqs), access_log=None, **server_options(settings))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield port
        finally:
            await runner.cleanup()


def request_head(**headers: str | int) -> bytes:
    lines = ["POST /webhooks/jira HTTP/1.1", "Host: x", f"Content-Type: {JSON_TYPE}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def tracebacks_and_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("how", ["close", "close-at-once", "reset"])
async def test_a_client_that_hangs_up_mid_body_is_logged_once_without_a_traceback(
    aws_settings: AwsSettings, queues: QueuePair, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.WARNING)
    before = requests_counted("client_closed")
    # A body timeout far longer than the hang-up's 0.3 s: a stalled test process must not turn it into
    # a 408 (what is under test is the hang-up).
    async with served_as_in_production(aws_settings, queues.queue_url, body_timeout_s=30.0) as port:
        with capture_logs() as logs:
            # GIVEN a client that declares 500 bytes, sends 5, and hangs up (a FIN, at once or while
            # the body is being read, or a reset)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_head(Content_Length=500) + b'{"a":')
            await writer.drain()
            if how != "close-at-once":
                await asyncio.sleep(0.3)
            if how == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            # THEN its request is logged once, as client_closed, and counted
            webhooks = holds(lambda: any(entry["event"] == "webhook" for entry in logs))
            await wait_for(webhooks, timeout_s=5, what="the webhook log line")
            await asyncio.sleep(0.2)  # anything aiohttp logs after the handler
    [line] = [entry for entry in logs if entry["event"] == "webhook"]
    assert (line["outcome"], line["log_level"]) == ("client_closed", "warning"), line
    assert line["reason"] == "the client closed the connection before the whole body arrived"
    assert requests_counted("client_closed") - before == 1
    # AND nothing is logged at ERROR, and no traceback at all
    assert tracebacks_and_errors(caplog) == []
    assert await drain(aws_settings, queues.queue_url) == []


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        # curl -H 'Content-Encoding: gzip' --data-binary '{"a":1}'
        ({"Content_Encoding": "gzip"}, b'{"a":1}'),
        ({"Content_Encoding": "gzip"}, b"\x1f\x8b" + b"not the rest of a gzip stream"),
        ({"Content_Encoding": "deflate"}, b'{"a":1}'),
        ({"Content_Encoding": "br"}, b'{"a":1}'),
        ({"Transfer_Encoding": "chunked"}, b"zz\r\nabc\r\n0\r\n\r\n"),
    ],
    ids=["gzip-plain-json", "gzip-broken-stream", "deflate-plain-json", "brotli", "chunked-bad-size"],
)
async def test_a_body_that_does_not_decode_is_400_without_a_traceback(
    aws_settings: AwsSettings,
    queues: QueuePair,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
    body: bytes,
) -> None:
    caplog.set_level(logging.WARNING)
    if "Transfer_Encoding" not in headers:
        headers = {**headers, "Content_Length": str(len(body))}
    async with served_as_in_production(aws_settings, queues.queue_url) as port:
        with capture_logs() as logs:
            # WHEN it is sent; the answer is read until the server closes the connection
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_head(**headers) + body)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
    # THEN it gets 400 from the handler (a webhook line with the reason) or, for what aiohttp
    # refuses before the handler runs, from aiohttp (one WARNING line naming the error)
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    webhooks = [entry for entry in logs if entry["event"] == "webhook"]
    refusals = [r for r in caplog.records if r.name == "aiohttp.server.receiver"]
    assert len(webhooks) + len(refusals) == 1, (webhooks, [r.getMessage() for r in refusals])
    for entry in webhooks:
        assert entry["outcome"] == "bad_request"
        assert entry["reason"].startswith("the body could not be read: ") and "\n" not in entry["reason"]
    for record in refusals:
        assert record.levelno == logging.WARNING and "Error" in record.getMessage()
    # AND nothing is logged at ERROR, and no traceback at all
    assert tracebacks_and_errors(caplog) == []
    assert await drain(aws_settings, queues.queue_url) == []


# -- end to end through the consumer into Postgres ----------------------------------------------


def issue_event(issue_id: int, ts: int, **fields: Any) -> bytes:
    event = jira_fixtures.make_event(ISSUE_FIXTURE, issue_id=issue_id, ts=ts)
    event["issue"]["fields"].update(fields)
    return json.dumps(event).encode()


async def test_nul_and_sql_looking_text_end_to_end(
    harness: Harness,
    aws_settings: AwsSettings,
    queues: QueuePair,
    db_settings: DatabaseSettings,
    pg: asyncpg.Connection,
) -> None:
    # GIVEN signed webhooks carrying: SQL-looking text in the summary and labels; a NUL (the JSON
    # escape \u0000) outside what the consumer stores; a NUL in the summary, which jsonb and text
    # columns cannot hold; and an ordinary event after it in the same issue's message group
    injection = "'; DROP TABLE ap_jira_task; --"
    sql_event = issue_event(9101, 1_700_000_000_000, summary=injection, labels=[injection, "$1", "%s"])
    outside = json.loads(issue_event(9102, 1_700_000_000_000))
    outside["extraField"] = {"note": "nul \u0000 here"}
    nul_outside = json.dumps(outside).encode()
    nul_summary = issue_event(9103, 1_700_000_000_000, summary="bad \u0000 summary")
    after_nul = issue_event(9103, 1_700_000_001_000, summary="fixed summary")
    assert b"\\u0000" in nul_outside and b"\\u0000" in nul_summary
    # WHEN the receiver takes them (it forwards bodies unchanged: a NUL escape is valid JSON) and
    # the consumer runs until the queue is idle; then the next event of the NUL's issue comes
    for body in (sql_event, nul_outside, nul_summary):
        status, answer = await harness.post(body, signed(body))
        assert (status, answer["status"]) == (202, "accepted"), answer
    stats = await consume_all(aws_settings, queues, db_settings)
    status, answer = await harness.post(after_nul, signed(after_nul))
    assert (status, answer["status"]) == (202, "accepted"), answer
    later = await consume_all(aws_settings, queues, db_settings)
    # THEN the SQL-looking text is stored verbatim, and the table is still there
    row = await pg.fetchrow("SELECT summary, labels FROM ap_jira_task WHERE issue_id = 9101")
    assert row is not None and (row["summary"], list(row["labels"])) == (injection, [injection, "$1", "%s"])
    # AND a NUL outside the stored fields does not stop the event
    assert await pg.fetchval("SELECT count(*) FROM ap_jira_task WHERE issue_id = 9102") == 1
    # AND the NUL summary is dead-lettered at its first receive, with Postgres's reason (no poison
    # loop: it is not retried), and the issue's next event applies normally
    assert (stats.applied, stats.dead_lettered, stats.retried) == (2, 1, 0), stats
    assert (later.applied, later.dead_lettered, later.retried) == (1, 0, 0), later
    assert await pg.fetchval("SELECT summary FROM ap_jira_task WHERE issue_id = 9103") == "fixed summary"
    [dead] = await drain(aws_settings, queues.dlq_url)
    assert dead["Body"] == nul_summary.decode()
    attrs = {k: v["StringValue"] for k, v in dead["MessageAttributes"].items()}
    assert attrs["error_message"] == 'invalid byte sequence for encoding "UTF8": 0x00', attrs
    assert await drain(aws_settings, queues.queue_url) == []
    harness.report.counts["explicit"] += 4


async def test_the_receiver_stays_up_under_a_burst_of_hostile_connections(harness: Harness) -> None:
    # GIVEN 50 connections that each send garbage and hang up mid-request, all at once
    host, port = harness.client.host, harness.client.port

    async def garbage(i: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /webhooks/jira HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + bytes([i]) * 10)
        await writer.drain()
        writer.close()

    await asyncio.gather(*(garbage(i) for i in range(50)))
    # THEN a proper webhook is still accepted
    body = jira_fixtures.raw(ISSUE_FIXTURE)
    status, _ = await harness.post(body, signed(body))
    assert status == 202
    await harness.assert_alive()
    harness.report.counts["explicit"] += 50


async def test_a_real_client_session_sees_the_same_answers(harness: Harness) -> None:
    # The test client and a plain aiohttp session agree (no test-only path in between).
    body = b"{}"
    async with ClientSession() as session:
        url = f"http://{harness.client.host}:{harness.client.port}/webhooks/jira"
        async with session.post(url, data=body, headers=signed(body)) as response:
            assert (response.status, (await response.json())["status"]) == (202, "ignored")
    harness.report.counts["explicit"] += 1
