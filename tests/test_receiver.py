"""The receiver over HTTP (aiohttp's test server) against moto's SQS server: real fixtures in, exact
messages out; every rejection with its status and reason; SQS failures; micro-batching."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from consumer.event import parse_envelope
from ops.local_aws import free_port
from receiver.app import RECEIVER, build_app
from receiver.batcher import SqsBatcher
from receiver.readiness import QueueReadiness
from receiver.settings import ReceiverSettings
from receiver.signature import sign
from shared import aws
from shared.envelope import Envelope, body_sha256
from shared.jira_event import Routed, route
from shared.provision import QueuePair
from shared.queue_limits import DEAD_LETTER_ROOM_BYTES
from shared.settings import AwsSettings
from tests import jira_fixtures
from tests.conftest import drain
from tests.test_consumer_helpers import holds, wait_for

SECRET = "test-webhook-secret"
RECEIVED_AT_MS = 1_700_000_000_123
JSON_TYPE = "application/json; charset=UTF-8"


def receiver_settings(aws_settings: AwsSettings, queue_url: str, **overrides: Any) -> ReceiverSettings:
    values: dict[str, Any] = {
        "aws": aws_settings,
        "queue_url": queue_url,
        "webhook_secret": SECRET,
        "sqs_timeout_s": 5.0,
        "shutdown_grace_s": 5.0,
    }
    values.update(overrides)
    return ReceiverSettings(**values)


@asynccontextmanager
async def running(settings: ReceiverSettings) -> AsyncIterator[TestClient[Any, Any]]:
    """The receiver app on aiohttp's test server, its clock fixed at RECEIVED_AT_MS."""
    async with aws.sqs_client(settings.aws, timeout_s=settings.sqs_timeout_s) as sqs:
        app = build_app(settings, sqs, clock_ms=lambda: RECEIVED_AT_MS)
        async with TestClient(TestServer(app)) as client:
            yield client


def headers_for(
    body: bytes,
    *,
    secret: str | None = SECRET,
    delivery: str | None = None,
    retry: str | None = None,
    content_type: str | None = JSON_TYPE,
    content_encoding: str | None = None,
) -> dict[str, str]:
    headers: dict[str, str] = {}
    if content_encoding is not None:
        headers["Content-Encoding"] = content_encoding
    if secret is not None:
        headers["X-Hub-Signature"] = sign(secret, body)
    if delivery is not None:
        headers["X-Atlassian-Webhook-Identifier"] = delivery
    if retry is not None:
        headers["X-Atlassian-Webhook-Retry"] = retry
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


async def post(
    client: TestClient[Any, Any], body: bytes, **header_options: Any
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    headers = headers_for(body, **header_options)
    # aiohttp's client would add "Content-Type: application/octet-stream" to a request without one.
    skip = () if "Content-Type" in headers else ("Content-Type",)
    response: ClientResponse
    async with client.post("/webhooks/jira", data=body, headers=headers, skip_auto_headers=skip) as response:
        return response.status, await response.json(), response.headers


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def batch_calls() -> float:
    return metric("jiralake_sqs_requests_total", {"operation": "SendMessageBatch", "outcome": "ok"}) + metric(
        "jiralake_sqs_requests_total", {"operation": "SendMessageBatch", "outcome": "error"}
    )


def requests_counted(outcome: str) -> float:
    return metric("jiralake_receiver_requests_total", {"outcome": outcome})


def by_delivery(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["MessageAttributes"]["delivery_id"]["StringValue"]: m for m in messages}


# -- every real fixture -----------------------------------------------------------------------


async def test_every_real_issue_fixture_lands_on_the_queue_exactly_as_sent(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN every real fixture that concerns an issue; half carry Jira's delivery header, half don't
    names = jira_fixtures.issue_fixtures()
    assert len(names) == 50
    deliveries = {n: (f"delivery-{i}" if i % 2 == 0 else None) for i, n in enumerate(names)}
    retries = {n: (str(i % 3) if i % 2 == 0 else None) for i, n in enumerate(names)}
    # WHEN each is posted, signed, all at once
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        answers = await asyncio.gather(
            *(post(client, jira_fixtures.raw(n), delivery=deliveries[n], retry=retries[n]) for n in names)
        )
    # THEN each is answered 202 accepted with its issue id
    expected: dict[str, Envelope] = {}
    for name, (status, body, _) in zip(names, answers, strict=True):
        routed = route(jira_fixtures.load(name))
        assert isinstance(routed, Routed)
        raw = jira_fixtures.raw(name)
        delivery_id = deliveries[name] or "sha256:" + body_sha256(raw)
        assert (status, body) == (
            202,
            {
                "status": "accepted",
                "event_type": routed.event_type,
                "issue_id": routed.issue_id,
                "delivery_id": delivery_id,
            },
        ), name
        expected[delivery_id] = Envelope(
            body=raw.decode("utf-8"),
            event_type=routed.event_type,
            issue_id=routed.issue_id,
            event_ts_ms=routed.event_ts_ms if routed.event_ts_ms is not None else RECEIVED_AT_MS,
            received_at_ms=RECEIVED_AT_MS,
            delivery_id=delivery_id,
            retry_count=int(retries[name] or 0),
        )
    # AND exactly one message per fixture is on the queue: raw body, group = issue id, dedup = delivery
    messages = by_delivery(await drain(aws_settings, queues.queue_url))
    assert set(messages) == set(expected)
    for delivery_id, envelope in expected.items():
        message = messages[delivery_id]
        assert Envelope.from_message(message) == envelope
        assert message["Body"] == envelope.body
        assert message["Attributes"]["MessageGroupId"] == envelope.issue_id
        # the delivery id itself: "delivery-N", or "sha256:" and 64 hex digits, both valid SQS dedup ids
        assert message["Attributes"]["MessageDeduplicationId"] == delivery_id
    # AND the kinds the issue asks for are all among them
    kinds = {e.event_type.split(":")[-1].split("_")[0] for e in expected.values()}
    assert kinds == {"issue", "comment", "worklog", "attachment", "issuelink"}


@pytest.mark.parametrize(
    ("name", "issue_id", "event_ts_ms"),
    [
        # Server comment: no issue object, the id is in comment.self
        ("mattermost-plugin-jira__webhook-server-comment-created.json", "10013", 1559607317234),
        ("zulip__worklog_created.json", "10014", 1790102915652),  # worklog.issueId only
        ("pinpoint-jira__issuelink_created.json", "20192", 1594081854017),  # issueLink.sourceIssueId
        # jira-to-matrix captures hold a logger string as timestamp: the issue's `updated` is used...
        ("jira-to-matrix__epic_created.json", "13877", 1548866888263),
        # ... and with no issue object either, the time of arrival
        ("jira-to-matrix__issuelink_created.json", "11442", RECEIVED_AT_MS),
    ],
)
async def test_issue_id_and_event_time_come_from_where_each_event_keeps_them(
    aws_settings: AwsSettings, queues: QueuePair, name: str, issue_id: str, event_ts_ms: int
) -> None:
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        status, body, _ = await post(client, jira_fixtures.raw(name), delivery="d-1")
    assert (status, body["issue_id"]) == (202, issue_id)
    [message] = await drain(aws_settings, queues.queue_url)
    envelope = Envelope.from_message(message)
    assert (envelope.issue_id, envelope.event_ts_ms) == (issue_id, event_ts_ms)
    assert message["Attributes"]["MessageGroupId"] == issue_id


async def test_a_body_without_any_time_is_stamped_with_its_arrival(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    body = json.dumps({"webhookEvent": "jira:issue_deleted", "issue": {"id": 10001}}).encode()
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        assert (await post(client, body))[0] == 202
    [message] = await drain(aws_settings, queues.queue_url)
    assert Envelope.from_message(message).event_ts_ms == RECEIVED_AT_MS


async def test_non_issue_fixtures_and_the_bare_user_deleted_body_are_ignored_and_nothing_is_sent(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN every real fixture that concerns no issue (sprint, board, project, user, bare user_deleted)
    names = jira_fixtures.ignored_fixtures()
    assert "pinpoint-jira__user_deleted.json" in names and "zulip__example_anomalous_payload.json" in names
    calls_before, ignored_before = batch_calls(), requests_counted("ignored")
    # WHEN they are posted
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        answers = {n: await post(client, jira_fixtures.raw(n), delivery=f"d-{n}") for n in names}
    # THEN each is answered 202 ignored, counted, and no SQS call is made
    for name, (status, body, _) in answers.items():
        event = jira_fixtures.load(name).get("webhookEvent", "user_deleted")
        assert (status, body) == (202, {"status": "ignored", "event_type": event}), name
    assert requests_counted("ignored") - ignored_before == len(names) == 16
    assert batch_calls() == calls_before
    assert await drain(aws_settings, queues.queue_url) == []


def users_deleted() -> float:
    return metric("jiralake_receiver_jira_users_deleted_total")


async def test_a_signed_user_deleted_body_is_counted_and_flagged_without_the_person_s_ids(
    aws_settings: AwsSettings, queues: QueuePair, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN Jira's bare user_deleted body, and every ignored fixture that is no user_deleted
    name = "pinpoint-jira__user_deleted.json"
    user_deleted = jira_fixtures.raw(name)
    person = jira_fixtures.load(name)
    assert set(person) == {"accountId", "username"}
    others = [n for n in jira_fixtures.ignored_fixtures() if "webhookEvent" in jira_fixtures.load(n)]
    assert len(others) == 14 and "pinpoint-jira__user_created.json" in others
    before = users_deleted()
    caplog.set_level(logging.DEBUG)
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        with capture_logs() as logs:
            # WHEN the others arrive signed, and the user_deleted body unsigned
            for other in others:
                assert (await post(client, jira_fixtures.raw(other)))[1]["status"] == "ignored", other
            unsigned = await post(client, user_deleted, secret=None)
            # THEN none of them is counted
            assert users_deleted() == before
            # WHEN it arrives signed
            signed = await post(client, user_deleted)
    # THEN it is answered as before, counted once, and its log line is flagged
    assert unsigned[:2] == (401, {"status": "unauthorized", "reason": "missing X-Hub-Signature header"})
    assert signed[:2] == (202, {"status": "ignored", "event_type": "user_deleted"})
    assert users_deleted() == before + 1
    webhooks = [entry for entry in logs if entry["event"] == "webhook"]
    assert len(webhooks) == len(others) + 2
    assert [entry.get("user_deleted") for entry in webhooks] == [None] * (len(others) + 1) + [True]
    assert (webhooks[-1]["outcome"], webhooks[-1]["event_type"]) == ("ignored", "user_deleted")
    # AND the person's account id and username are nowhere in what was logged
    logged = repr(logs) + caplog.text
    for value in person.values():
        assert value not in logged
    assert await drain(aws_settings, queues.queue_url) == []


async def test_accepted_event_types_are_configurable(aws_settings: AwsSettings, queues: QueuePair) -> None:
    # GIVEN a receiver that takes only issue events, not comments
    settings = receiver_settings(aws_settings, queues.queue_url, accepted_event_prefixes=("jira:issue_",))
    async with running(settings) as client:
        comment = await post(client, jira_fixtures.raw("pinpoint-jira__comment_created.json"))
        issue = await post(client, jira_fixtures.raw("pinpoint-jira__jira_issue_created.json"))
    assert comment[:2] == (202, {"status": "ignored", "event_type": "comment_created"})
    assert issue[1]["status"] == "accepted"
    [message] = await drain(aws_settings, queues.queue_url)
    assert message["MessageAttributes"]["event_type"]["StringValue"] == "jira:issue_created"


async def test_a_webhook_posing_as_a_jiralake_internal_event_is_ignored(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a signed body claiming to be a reconciled delete, which only jiralake itself may enqueue
    body = json.dumps({"webhookEvent": "jiralake:issue_deleted", "issue": {"id": "10001"}}).encode()
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        status, answer, _ = await post(client, body)
    # THEN it is ignored, never queued
    assert (status, answer) == (202, {"status": "ignored", "event_type": "jiralake:issue_deleted"})
    assert await drain(aws_settings, queues.queue_url) == []


async def test_an_ignored_event_type_that_is_no_plain_name_is_neither_echoed_nor_logged(
    aws_settings: AwsSettings, queues: QueuePair, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a signed non-issue body whose webhookEvent is 20,000 characters with a forged log line in it
    odd = "sprint_" + "x" * 20_000 + "\nwebhook outcome=accepted"
    body = json.dumps({"webhookEvent": odd, "sprint": {"id": 1}}).encode()
    capsys.readouterr()
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        status, answer, _ = await post(client, body)
    # THEN it is ignored under a plain label: the value goes neither back to the caller nor to the log
    assert (status, answer) == (202, {"status": "ignored", "event_type": "unknown"})
    logged = capsys.readouterr()
    assert "x" * 100 not in logged.out + logged.err
    assert await drain(aws_settings, queues.queue_url) == []


# -- rejections -------------------------------------------------------------------------------

ISSUE_BODY = jira_fixtures.raw("pinpoint-jira__jira_issue_updated.description.json")


@pytest.mark.parametrize(
    ("body", "options", "status", "outcome", "reason"),
    [
        (ISSUE_BODY, {"secret": None}, 401, "unauthorized", "missing X-Hub-Signature header"),
        (ISSUE_BODY, {"secret": "not-the-secret"}, 401, "unauthorized",
         "X-Hub-Signature does not match the body"),
        (b"not json", {}, 400, "bad_request", "body is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"[1, 2]", {}, 400, "bad_request", "body must be a JSON object, got list"),
        (b'{"webhookEvent": "jira:issue_created", "x": "\xff"}', {}, 400, "bad_request",
         "body is not UTF-8 (invalid byte at offset 45)"),
        (b'{"webhookEvent": "jira:issue_created", "x": NaN}', {}, 400, "bad_request",
         "body is not JSON: NaN is not a JSON value"),
        (b"[" * 20_000 + b"]" * 20_000, {}, 400, "bad_request", "body is not JSON: nested too deeply"),
        (b'{"webhookEvent": "jira:issue_updated", "issue": {"key": "PROJ-1"}}', {}, 400, "bad_request",
         "jira:issue_updated event carries no issue id"),
        (b'{"webhookEvent": "jira:issue_updated", "issue": {"id": "PROJ-1"}}', {}, 400, "bad_request",
         "jira:issue_updated event has a non-numeric issue id 'PROJ-1'"),
        (b'{"webhookEvent": "jira:issue_updated x", "issue": {"id": "1"}}', {}, 400, "bad_request",
         "webhookEvent is not a valid event type name"),
        # Python's `$` also matches before a final newline: the name must end where the string ends
        (b'{"webhookEvent": "jira:issue_deleted\\n", "issue": {"id": "1"}}', {}, 400, "bad_request",
         "webhookEvent is not a valid event type name"),
        # A raw control character is no JSON, also beside U+FFFF (which alone would be escaped and queued)
        ('{"webhookEvent": "jira:issue_updated", "issue": {"id": "1"}, "x": "a\x01b\uffff"}'.encode(), {},
         400, "bad_request", "body is not JSON: Invalid control character at: line 1 column 69 (char 68)"),
        (ISSUE_BODY, {"delivery": "two words"}, 400, "bad_request",
         "X-Atlassian-Webhook-Identifier must be 1-512 visible ASCII characters, no spaces"),
        (ISSUE_BODY, {"content_type": "text/plain"}, 415, "unsupported_media_type",
         "Content-Type must be application/json, got 'text/plain'"),
        (ISSUE_BODY, {"content_type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type",
         "Content-Type must be application/json, got 'application/x-www-form-urlencoded'"),
        (b'{"pad": "' + b"x" * 70_000 + b'"}', {}, 413, "too_large",
         "body is larger than the limit of 65536 bytes"),
        # aiohttp decodes gzip and deflate; it would pass any other encoding on as if it were none
        (ISSUE_BODY, {"content_encoding": "compress"}, 415, "unsupported_media_type",
         "Content-Encoding must be gzip, deflate or identity, got 'compress'"),
        (ISSUE_BODY, {"content_encoding": "x-gzip"}, 415, "unsupported_media_type",
         "Content-Encoding must be gzip, deflate or identity, got 'x-gzip'"),
    ],
    ids=[
        "missing-signature", "wrong-signature", "not-json", "not-an-object", "not-utf8", "nan", "too-deep",
        "no-issue-id", "non-numeric-issue-id", "odd-event-type", "event-type-with-final-newline",
        "control-char-and-uffff",
        "bad-delivery-header",
        "text-plain", "form", "oversized-content-length", "compress-encoding", "x-gzip-encoding",
    ],
)  # fmt: skip
async def test_bad_requests_get_the_right_4xx_with_a_json_reason_and_nothing_is_queued(
    aws_settings: AwsSettings,
    queues: QueuePair,
    body: bytes,
    options: dict[str, Any],
    status: int,
    outcome: str,
    reason: str,
) -> None:
    settings = receiver_settings(aws_settings, queues.queue_url, max_body_bytes=65536)
    calls_before, counted_before = batch_calls(), requests_counted(outcome)
    async with running(settings) as client:
        answer = await post(client, body, **options)
    assert answer[:2] == (status, {"status": outcome, "reason": reason})
    assert requests_counted(outcome) - counted_before == 1
    assert batch_calls() == calls_before
    assert await drain(aws_settings, queues.queue_url) == []


def issue_event(issue: dict[str, Any], **body: Any) -> bytes:
    return json.dumps({"webhookEvent": "jira:issue_updated", **body, "issue": issue}).encode()


TOO_LATE = (
    "timestamp is more than 253402300799999 ms since the epoch (9999-12-31T23:59:59.999Z), the last "
    "time jiralake can store"
)
OUT_OF_RANGE = (
    "is outside the times jiralake can store (after 1970-01-01T00:00:00Z, up to 9999-12-31T23:59:59.999Z)"
)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (issue_event({"id": "9999999999999999999"}, timestamp=1_700_000_000_000),
         "jira:issue_updated event has issue id '9999999999999999999', beyond the largest one jiralake "
         "can store (9223372036854775807)"),
        (issue_event({"id": "1"}, timestamp=10**40), TOO_LATE),
        (issue_event({"id": "1"}, timestamp=10**200), TOO_LATE),
        (issue_event({"id": "1", "fields": {"updated": "0001-01-01T00:00:00.000+1400"}}),
         f"issue.fields.updated '0001-01-01T00:00:00.000+1400' {OUT_OF_RANGE}"),
        (issue_event({"id": "1", "fields": {"updated": "9999-12-31T23:59:59.999-1400"}}),
         f"issue.fields.updated '9999-12-31T23:59:59.999-1400' {OUT_OF_RANGE}"),
    ],
    ids=["issue-id-over-bigint", "timestamp-1e40", "timestamp-1e200", "updated-year-1", "updated-year-9999"],
)  # fmt: skip
async def test_an_event_the_consumer_could_never_apply_is_400_at_once_not_queued(
    aws_settings: AwsSettings, queues: QueuePair, body: bytes, reason: str
) -> None:
    # GIVEN a signed issue event whose issue id or time the consumer cannot store (it would dead-letter it)
    counted_before = requests_counted("bad_request")
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        answer = await post(client, body)
    # THEN Jira is told 400 with the reason, and nothing is queued
    assert answer[:2] == (400, {"status": "bad_request", "reason": reason})
    assert requests_counted("bad_request") - counted_before == 1
    assert await drain(aws_settings, queues.queue_url) == []


async def test_the_largest_issue_id_and_latest_time_are_accepted_and_the_consumer_takes_them(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN events at the bounds: the largest bigint issue id, the last storable millisecond, and an
    # updated time just after the epoch (no timestamp)
    bodies = [
        issue_event({"id": str(2**63 - 1)}, timestamp=253_402_300_799_999),
        issue_event({"id": "2", "fields": {"updated": "1970-01-01T00:00:00.001Z"}}),
    ]
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        answers = [await post(client, body) for body in bodies]
    # THEN both are accepted, and the consumer parses both messages as they were queued
    assert [status for status, _, _ in answers] == [202, 202]
    events = sorted(
        (parse_envelope(Envelope.from_message(m)) for m in await drain(aws_settings, queues.queue_url)),
        key=lambda event: event.version,
    )
    assert [(event.issue_id, event.version) for event in events] == [(2, 1), (2**63 - 1, 253_402_300_799_999)]


NOT_FOUND = {"status": "not_found", "reason": "no such endpoint; Jira webhooks go to POST /webhooks/jira"}
NOT_ALLOWED = {"status": "method_not_allowed", "reason": "/webhooks/jira takes POST only"}


@pytest.mark.parametrize(
    ("method", "path", "status", "answer", "allow"),
    [
        ("POST", "/webhooks/jira/", 404, NOT_FOUND, None),
        ("POST", "/", 404, NOT_FOUND, None),
        ("GET", "/webhooks/jira", 405, NOT_ALLOWED, "POST"),
        ("PUT", "/webhooks/jira", 405, NOT_ALLOWED, "POST"),
        ("POST", "/webhooks%2Fjira", 404, NOT_FOUND, None),
    ],
    ids=["trailing-slash", "root", "get", "put", "encoded-slash"],
)  # fmt: skip
async def test_a_wrong_url_or_method_gets_a_json_reason_and_a_log_line(
    aws_settings: AwsSettings,
    queues: QueuePair,
    capsys: pytest.CaptureFixture[str],
    method: str,
    path: str,
    status: int,
    answer: dict[str, str],
    allow: str | None,
) -> None:
    # GIVEN a webhook registered in Jira with a wrong URL, or someone opening the URL in a browser
    capsys.readouterr()
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        # WHEN it is called, signed, with a query string holding a secret-looking value
        async with client.request(
            method, path + "?token=hunter2", data=ISSUE_BODY, headers=headers_for(ISSUE_BODY)
        ) as response:
            got = (response.status, await response.json(), response.headers.get("Allow"))
        # AND the health routes still answer
        assert (await client.get("/healthz")).status == 200
    # THEN the answer says where webhooks go, in JSON, and the log shows method and path, not the query
    assert got == (status, answer, allow)
    logged = capsys.readouterr().out
    [line] = [line for line in logged.splitlines() if "request_not_routed" in line]
    assert method in line and str(status) in line and path in line
    assert "hunter2" not in logged
    assert await drain(aws_settings, queues.queue_url) == []


async def test_a_chunked_body_over_the_limit_is_refused_before_it_is_all_sent(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a client streaming a chunked body (no Content-Length) of up to 64 MiB
    chunk, chunks = b"x" * 65536, 1024
    sent = 0

    async def endless_body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(chunks):
            yield chunk
            sent += len(chunk)

    settings = receiver_settings(aws_settings, queues.queue_url, max_body_bytes=65536)
    async with running(settings) as client:
        headers = {"Content-Type": "application/json", "X-Hub-Signature": sign(SECRET, b"")}
        async with client.post("/webhooks/jira", data=endless_body(), headers=headers) as response:
            # WHEN the receiver answers
            status, body = response.status, await response.json()
            sent_when_answered = sent
    # THEN it said 413 long before the body ended: it did not read the body whole
    assert (status, body) == (
        413,
        {"status": "too_large", "reason": "body is larger than the limit of 65536 bytes"},
    )
    assert sent_when_answered < len(chunk) * chunks // 4
    assert await drain(aws_settings, queues.queue_url) == []


async def stalled_body(release: asyncio.Event, rest: bytes = b"") -> AsyncIterator[bytes]:
    """A body that sends its first byte, then nothing until ``release`` is set, then ``rest``."""
    yield b"{"
    await release.wait()
    if rest:
        yield rest


async def test_a_declared_length_over_the_limit_is_refused_without_reading_the_body(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a client that declares 100 MB but sends one byte and then nothing
    release = asyncio.Event()
    settings = receiver_settings(aws_settings, queues.queue_url, max_body_bytes=65536)
    async with running(settings) as client:
        headers = {"Content-Type": "application/json", "Content-Length": str(100_000_000)}
        async with client.post("/webhooks/jira", data=stalled_body(release), headers=headers) as response:
            # THEN the answer comes from the header alone
            assert response.status == 413
            assert await response.json() == {
                "status": "too_large",
                "reason": "body is larger than the limit of 65536 bytes",
            }
        release.set()


async def test_senders_trickling_bodies_cannot_hold_more_than_the_limit_of_buffers(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a receiver that reads at most two bodies at once, and two unsigned senders that declare a
    # body and then trickle it (each would hold up to max_body_bytes before its signature is checked)
    release = asyncio.Event()

    settings = receiver_settings(aws_settings, queues.queue_url, max_bodies_reading=2)
    async with running(settings) as client:
        headers = {"Content-Type": "application/json", "Content-Length": "2"}
        stalled = [
            asyncio.create_task(
                client.post("/webhooks/jira", data=stalled_body(release, rest=b"}"), headers=headers)
            )
            for _ in range(2)
        ]
        receiver = client.app[RECEIVER]
        await wait_for(holds(lambda: receiver.reading == 2), what="two bodies being read")
        # WHEN a third request comes
        status, answer, answer_headers = await post(client, ISSUE_BODY, delivery="d-third")
        # THEN it is told to retry later, and its connection is not kept
        connection = answer_headers.get("Connection")
        assert (status, answer_headers["Retry-After"], connection) == (503, "10", "close")
        assert answer == {
            "status": "unavailable",
            "reason": "too many requests are sending their bodies; retry later",
        }
        # AND once the slow bodies are in (unsigned: 401), a request is read again
        release.set()
        assert [(await r).status for r in stalled] == [401, 401]
        assert receiver.reading == 0
        status, _, fourth_headers = await post(client, ISSUE_BODY, delivery="d-fourth")
        assert (status, fourth_headers.get("Connection")) == (202, None)  # a body read in full: kept alive


async def test_a_body_holding_characters_sqs_refuses_is_queued_with_their_escapes(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a webhook whose summary holds U+FFFE and U+FFFF raw (valid JSON; Jira's serializer does
    # not escape them), which SQS refuses in a message body
    payload = json.loads(ISSUE_BODY)
    payload["issue"]["fields"]["summary"] = "odd \ufffe and \uffff, café"
    body = json.dumps(payload, ensure_ascii=False).encode()
    # WHEN it is posted
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        status, answer, _ = await post(client, body)
    # THEN it is accepted, its delivery id from the bytes as sent, and queued with those two
    # characters as JSON escapes: the same JSON value
    assert (status, answer["delivery_id"]) == (202, "sha256:" + body_sha256(body))
    [message] = await drain(aws_settings, queues.queue_url)
    assert "odd \\ufffe and \\uffff, café" in message["Body"]
    assert json.loads(message["Body"]) == payload


@pytest.mark.parametrize("content_type", [None, "application/json", "Application/JSON; charset=utf-8"])
async def test_json_content_types_and_a_missing_one_are_accepted(
    aws_settings: AwsSettings, queues: QueuePair, content_type: str | None
) -> None:
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        status, body, _ = await post(client, ISSUE_BODY, content_type=content_type)
    assert (status, body["status"]) == (202, "accepted")


async def test_without_a_secret_unsigned_webhooks_are_accepted(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    settings = receiver_settings(aws_settings, queues.queue_url, webhook_secret=None)
    async with running(settings) as client:
        status, body, _ = await post(client, ISSUE_BODY, secret=None)
    assert (status, body["status"]) == (202, "accepted")
    assert len(await drain(aws_settings, queues.queue_url)) == 1


async def test_a_message_that_would_not_fit_sqs_with_its_attributes_is_413(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a queue that takes 1 MiB, and a body just within the body limit (1 MiB less the room kept
    # for dead-letter attributes) whose message (body + attributes) exceeds that
    max_entry_bytes = 1_048_576 - DEAD_LETTER_ROOM_BYTES
    body = json.dumps({"webhookEvent": "jira:issue_created", "issue": {"id": "1"}, "pad": ""}).encode()
    body = body[:-2] + b"x" * (max_entry_bytes - len(body)) + b'"}'
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        status, answer, _ = await post(client, body)
    assert status == 413
    assert answer["reason"].startswith("the message would be ") and answer["reason"].endswith(
        f"bytes with its attributes; at most {max_entry_bytes} fit (the queue's MaximumMessageSize of "
        f"1048576 bytes, less {DEAD_LETTER_ROOM_BYTES} kept for dead-letter attributes)"
    )
    assert await drain(aws_settings, queues.queue_url) == []


# -- SQS failures and Jira's retries ----------------------------------------------------------


@asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A TCP endpoint that accepts connections and never answers: an SQS that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("failure", ["closed-port", "unknown-queue", "hanging"])
async def test_sqs_down_is_503_with_retry_after_and_jiras_retry_is_stored_once(
    aws_settings: AwsSettings, queues: QueuePair, failure: str
) -> None:
    body = jira_fixtures.raw("pinpoint-jira__jira_issue_created.json")
    # GIVEN a receiver whose SQS fails (refused connection, missing queue, or no answer at all)
    async with silent_server() as hanging_url:
        broken_aws = {
            "closed-port": AwsSettings(aws_settings.region, f"http://127.0.0.1:{free_port()}"),
            "unknown-queue": aws_settings,
            "hanging": AwsSettings(aws_settings.region, hanging_url),
        }[failure]
        queue_url = queues.queue_url.replace(".fifo", "-missing.fifo")
        broken = receiver_settings(broken_aws, queue_url, sqs_timeout_s=0.5)
        unavailable_before = requests_counted("unavailable")
        # WHEN Jira delivers an event
        async with running(broken) as client:
            status, answer, headers = await post(client, body, delivery="delivery-42")
    # THEN it is told 503 with Retry-After: not stored, try again
    assert status == 503
    assert headers["Retry-After"] == "10"
    assert answer["status"] == "unavailable"
    assert answer["reason"] in {
        "SQS did not store the message; retry later",
        "SQS did not confirm within 0.5s; retry later",
    }
    assert requests_counted("unavailable") - unavailable_before == 1
    # WHEN Jira retries the same delivery twice against a receiver whose SQS works
    async with running(receiver_settings(aws_settings, queues.queue_url)) as client:
        first = await post(client, body, delivery="delivery-42", retry="1")
        second = await post(client, body, delivery="delivery-42", retry="2")
    # THEN both retries are acknowledged and the queue holds the event once
    assert (first[0], second[0]) == (202, 202)
    [message] = await drain(aws_settings, queues.queue_url)
    envelope = Envelope.from_message(message)
    assert (envelope.delivery_id, envelope.retry_count, envelope.issue_id) == ("delivery-42", 1, "20942")


async def test_an_entry_sqs_refuses_is_503_so_that_jira_retries_it(aws_settings: AwsSettings) -> None:
    # GIVEN an SQS that refuses every entry as a sender fault (its queue's KMS key is disabled)
    refused: list[str] = []

    async def sqs_api(request: web.Request) -> web.Response:
        entries = (await request.json())["Entries"]
        refused.extend(e["MessageDeduplicationId"] for e in entries)
        failed = [
            {"Id": e["Id"], "SenderFault": True, "Code": "KMS.DisabledException", "Message": "key disabled"}
            for e in entries
        ]
        return web.json_response(
            {"Successful": [], "Failed": failed}, content_type="application/x-amz-json-1.0"
        )

    app = web.Application()
    app.router.add_post("/", sqs_api)
    async with TestServer(app, host="127.0.0.1") as sqs_server:
        endpoint = AwsSettings(aws_settings.region, str(sqs_server.make_url("/")))
        unavailable_before = requests_counted("unavailable")
        # WHEN Jira delivers an event
        async with running(receiver_settings(endpoint, "http://sqs/1/q.fifo")) as client:
            status, answer, headers = await post(
                client, jira_fixtures.raw("pinpoint-jira__jira_issue_created.json"), delivery="d-kms"
            )
    # THEN SQS was asked, and Jira is told to retry (a 4xx would make it drop the event)
    assert refused == ["d-kms"]
    assert (status, headers["Retry-After"]) == (503, "10")
    assert answer == {
        "status": "unavailable",
        "reason": "SQS refused the message; retry later",
        "event_type": "jira:issue_created",
        "issue_id": "20942",
        "delivery_id": "d-kms",
    }
    assert requests_counted("unavailable") - unavailable_before == 1


async def test_readyz_reports_sqs_reachability_and_caches_it(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    ok = receiver_settings(aws_settings, queues.queue_url)
    missing = receiver_settings(aws_settings, queues.queue_url.replace(".fifo", "-gone.fifo"))
    calls = "jiralake_sqs_requests_total"
    ok_labels = {"operation": "GetQueueAttributes", "outcome": "ok"}
    async with running(ok) as client:
        before = metric(calls, ok_labels)
        answers = [await (await client.get("/readyz")).json() for _ in range(3)]
        assert answers == [{"status": "ready"}] * 3
        assert metric(calls, ok_labels) - before == 1  # cached
        health = await client.get("/healthz")
        assert (health.status, await health.json()) == (200, {"status": "ok"})
    async with running(missing) as client:
        response = await client.get("/readyz")
        assert (response.status, await response.json()) == (
            503,
            {
                "status": "unavailable",
                "reason": "SQS queue not reachable (AWS.SimpleQueueService.NonExistentQueue)",
            },
        )


async def test_readyz_reuses_the_sqs_answer_for_the_cache_period_then_asks_again(
    aws_settings: AwsSettings, queues: QueuePair, unique_name: str
) -> None:
    # GIVEN the readiness check of a queue that does not exist yet, with a 5 s cache, on a clock the
    # test moves (the lambda reads `now` at each call)
    queue_url = queues.queue_url.rsplit("/", 1)[0] + "/" + unique_name
    missing = "SQS queue not reachable (AWS.SimpleQueueService.NonExistentQueue)"
    calls = "jiralake_sqs_requests_total"
    errors = {"operation": "GetQueueAttributes", "outcome": "error"}
    oks = {"operation": "GetQueueAttributes", "outcome": "ok"}
    now = 100.0
    async with aws.sqs_client(aws_settings) as sqs:
        readiness = QueueReadiness(sqs, queue_url, cache_s=5.0, timeout_s=10.0, clock=lambda: now)
        errors_before, oks_before = metric(calls, errors), metric(calls, oks)
        first = await readiness()
        # WHEN the queue is created, and the check is asked again inside the cache period
        created = await sqs.create_queue(QueueName=unique_name)
        try:
            assert created["QueueUrl"] == queue_url
            now = 104.75
            within = await readiness()
            # AND again once the period has run out, and once more inside the next period
            now = 105.0
            after = await readiness()
            now = 109.75
            within_next = await readiness()
        finally:
            await sqs.delete_queue(QueueUrl=queue_url)
    # THEN inside the period the first answer is reused: still not ready, though the queue exists
    assert (first, within) == (missing, missing)
    # AND once it ran out SQS is asked again (ready), and that answer is reused in turn
    assert (after, within_next) == (None, None)
    # AND SQS was asked exactly twice: once refused, once answered
    assert (metric(calls, errors) - errors_before, metric(calls, oks) - oks_before) == (1, 1)


# -- micro-batching ---------------------------------------------------------------------------


async def test_a_burst_of_concurrent_webhooks_is_sent_in_batches(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN 50 distinct events for 50 issues
    bodies = [
        json.dumps(
            jira_fixtures.make_event("pinpoint-jira__jira_issue_created.json", issue_id=30000 + i)
        ).encode()
        for i in range(50)
    ]
    settings = receiver_settings(aws_settings, queues.queue_url, batch_max_wait_ms=20)
    calls_before = batch_calls()
    sizes_before = metric("jiralake_receiver_batch_entries_sum")
    # WHEN they arrive at once
    async with running(settings) as client:
        answers = await asyncio.gather(
            *(post(client, b, delivery=f"burst-{i}") for i, b in enumerate(bodies))
        )
    # THEN every one is acknowledged after SQS stored it, at most 0.2 SQS calls per event
    assert [a[0] for a in answers] == [202] * 50
    calls = batch_calls() - calls_before
    assert calls <= 10, f"{calls} SendMessageBatch calls for 50 events"
    assert metric("jiralake_receiver_batch_entries_sum") - sizes_before == 50
    messages = await drain(aws_settings, queues.queue_url)
    assert sorted(m["Attributes"]["MessageGroupId"] for m in messages) == [str(30000 + i) for i in range(50)]


async def test_one_entry_refused_by_sqs_fails_only_its_own_request(
    aws_settings: AwsSettings, unique_name: str
) -> None:
    # GIVEN a batcher and a standard queue, which refuses an entry with an invalid delay, entry by entry
    async with aws.sqs_client(aws_settings) as sqs:
        queue_url = (await sqs.create_queue(QueueName=unique_name))["QueueUrl"]
        try:
            batcher = SqsBatcher(
                sqs, queue_url, max_wait_s=0.05, max_pending=100, max_inflight=2, timeout_s=5
            )
            batcher.start()
            # WHEN three requests share one batch and SQS refuses the middle one
            futures = [
                batcher.submit({"MessageBody": "first", "MessageAttributes": {}}),
                batcher.submit({"MessageBody": "refused", "MessageAttributes": {}, "DelaySeconds": 901}),
                batcher.submit({"MessageBody": "third", "MessageAttributes": {}}),
            ]
            results = await asyncio.gather(*futures)
            await batcher.close(grace_s=5)
            # THEN only that request fails, as not retryable; the other two were stored
            assert [(r.ok, r.retryable) for r in results] == [(True, False), (False, False), (True, False)]
            assert results[1].error is not None and results[1].error.startswith("InvalidParameterValue")
            received = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)
            assert sorted(m["Body"] for m in received["Messages"]) == ["first", "third"]
        finally:
            await sqs.delete_queue(QueueUrl=queue_url)
