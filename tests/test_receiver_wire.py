"""The receiver at the HTTP wire, over raw sockets: ``Expect: 100-continue`` is answered from the headers
before the body is asked for, and requests aiohttp cannot parse are logged without the request bytes
its errors quote."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from structlog.testing import capture_logs

from ops.local_aws import free_port
from receiver.signature import sign
from shared.admin_server import admin_app, start_admin_server
from shared.http_server import fault_text
from shared.provision import QueuePair
from shared.settings import AwsSettings
from tests.conftest import drain
from tests.test_hostile_input import SECRET, served_as_in_production, tracebacks_and_errors
from tests.test_receiver import ISSUE_BODY, metric

LIMIT = 1_048_576  # served_as_in_production's body limit (the default); its queue takes 1 MiB too


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The next response's head (status line and headers) and its body (by its Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def status_line(head: bytes) -> bytes:
    return head.split(b"\r\n", 1)[0]


def webhook_head(content_type: str, content_length: int, *extra: str) -> bytes:
    lines = [
        "POST /webhooks/jira HTTP/1.1",
        "Host: x",
        f"Content-Type: {content_type}",
        f"Content-Length: {content_length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- Expect: 100-continue ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "content_length", "status", "answer"),
    [
        (
            "application/json",
            LIMIT + 1,
            b"HTTP/1.1 413 Request Entity Too Large",
            b'{"status": "too_large", "reason": "body is larger than the limit of 1046528 bytes '
            b"(the queue's MaximumMessageSize of 1048576 bytes, less 2048 kept for dead-letter "
            b'attributes)"}',
        ),
        (
            "text/plain",
            100,
            b"HTTP/1.1 415 Unsupported Media Type",
            b'{"status": "unsupported_media_type", "reason": "Content-Type must be application/json, '
            b"got 'text/plain'\"}",
        ),
    ],
    ids=["declared-too-large", "not-json"],
)
async def test_expect_100_continue_is_refused_from_the_headers_before_100_continue(
    aws_settings: AwsSettings,
    queues: QueuePair,
    content_type: str,
    content_length: int,
    status: bytes,
    answer: bytes,
) -> None:
    async with served_as_in_production(aws_settings, queues.queue_url) as port:
        with capture_logs() as logs:
            # GIVEN a client that asks to go ahead before sending a body intake refuses from its headers
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(webhook_head(content_type, content_length, "Expect: 100-continue"))
            await writer.drain()
            # WHEN the receiver answers
            head, body = await read_response(reader)
            writer.close()
    # THEN the first answer is the refusal itself, not 100 Continue, and the connection is not kept
    assert status_line(head) == status
    assert b"\r\nConnection: close\r\n" in head
    assert body == answer
    # AND it is logged and counted as any refused webhook is
    [line] = [entry for entry in logs if entry["event"] == "webhook"]
    assert (line["log_level"], line["status"]) == ("warning", int(status.split()[1]))


async def test_expect_100_continue_while_every_body_slot_is_taken_gets_503_before_100_continue(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    async with served_as_in_production(aws_settings, queues.queue_url, max_bodies_reading=1) as port:
        # GIVEN a receiver reading as many bodies as it may (one here): a client that sent its headers
        # and the first byte of its body, then stalled
        _, stalled = await asyncio.open_connection("127.0.0.1", port)
        stalled.write(webhook_head("application/json", 100) + b"{")
        await stalled.drain()
        await asyncio.sleep(0.2)  # the server runs on this loop: its handler is reading by now
        # WHEN another client asks to go ahead before sending its body
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(webhook_head("application/json", len(ISSUE_BODY), "Expect: 100-continue"))
        await writer.drain()
        head, body = await read_response(reader)
        writer.close()
        stalled.close()
    # THEN its first answer is the 503 (Jira retries), not 100 Continue and a body sent for nothing
    assert status_line(head) == b"HTTP/1.1 503 Service Unavailable"
    assert b"\r\nConnection: close\r\n" in head
    assert body == (
        b'{"status": "unavailable", "reason": "too many requests are sending their bodies; retry later"}'
    )


async def test_expect_100_continue_for_an_acceptable_webhook_gets_100_continue_then_202(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    accepted_before = metric("jiralake_receiver_requests_total", {"outcome": "accepted"})
    async with served_as_in_production(aws_settings, queues.queue_url) as port:
        # GIVEN a client that asks to go ahead with a webhook intake takes
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        signature = f"X-Hub-Signature: {sign(SECRET, ISSUE_BODY)}"
        writer.write(webhook_head("application/json", len(ISSUE_BODY), "Expect: 100-continue", signature))
        await writer.drain()
        # WHEN it is told to go on, and sends the body
        go_ahead = await reader.readuntil(b"\r\n\r\n")
        writer.write(ISSUE_BODY)
        await writer.drain()
        head, _ = await read_response(reader)
        writer.close()
    # THEN it got 100 Continue, then 202, and the webhook is stored
    assert (go_ahead, status_line(head)) == (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 202 Accepted")
    assert metric("jiralake_receiver_requests_total", {"outcome": "accepted"}) - accepted_before == 1
    assert len(await drain(aws_settings, queues.queue_url)) == 1


# -- what aiohttp cannot parse ----------------------------------------------------------------


async def test_a_request_aiohttp_refuses_is_logged_without_the_bytes_its_error_quotes(
    aws_settings: AwsSettings, queues: QueuePair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with served_as_in_production(aws_settings, queues.queue_url) as port:
        with capture_logs() as logs:
            # GIVEN an HTTP/1.0 request without Content-Length: aiohttp takes its body for bytes
            # after the end of the request and refuses them, quoting them in its error
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /webhooks/jira HTTP/1.0\r\nContent-Type: application/json\r\n\r\n" + ISSUE_BODY
            )
            await writer.drain()
            answer = await reader.read()
            writer.close()
    # THEN the refusal is one WARNING line with the error's class and text, the bytes elided
    assert answer.startswith(b"HTTP/1.0 400 Bad Request"), answer[:100]
    [refusal] = [r for r in caplog.records if r.name == "aiohttp.server.receiver"]
    assert (refusal.levelno, refusal.getMessage()) == (
        logging.WARNING,
        "Error handling request from 127.0.0.1: BadHttpMessage: Data after `Connection: close`: "
        f"b'<{len(ISSUE_BODY)} bytes elided>'",
    )
    # AND nothing of the body is in any log line
    logged = [r.getMessage() for r in caplog.records] + [repr(entry) for entry in logs]
    assert [text for text in logged if "webhookEvent" in text] == []
    assert tracebacks_and_errors(caplog) == []


async def ready() -> None:
    return None


async def test_an_admin_port_refuses_what_aiohttp_cannot_parse_as_the_main_port_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    runner = await start_admin_server(admin_app(ready), "127.0.0.1", port)
    try:
        # GIVEN a scrape with a header name aiohttp cannot parse (a space in it)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX Secret-Token: s3cr3t\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
        writer.close()
    finally:
        await runner.cleanup()
    # THEN it gets 400, logged as one WARNING line of the admin port's logger with the quoted bytes
    # elided: no ERROR, no traceback, not the header's value
    assert answer.split(b"\r\n")[0] == b"HTTP/1.0 400 Bad Request", answer[:100]
    [refusal] = [r for r in caplog.records if r.name == "aiohttp.server.admin"]
    assert refusal.levelno == logging.WARNING
    assert refusal.getMessage().startswith("Error handling request from 127.0.0.1: BadHttpMessage: ")
    assert tracebacks_and_errors(caplog) == []
    assert [r for r in caplog.records if "s3cr3t" in r.getMessage()] == []


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (
            BadHttpMessage("Invalid header value char:\n\n  b'X-Token: s3cr3t\\x01'\n                ^"),
            "BadHttpMessage: Invalid header value char: b'<16 bytes elided>'",
        ),
        (
            BadHttpMessage("Data after `Connection: close`:\n\n  b\"{'quoted': 1}\"\n  ^"),
            "BadHttpMessage: Data after `Connection: close`: b'<13 bytes elided>'",
        ),
        (BadHttpMessage("Unexpected LF in chunk-extension: b'body \\'bytes\\' cut"), "BadHttpMessage: "
         "Unexpected LF in chunk-extension: b'<bytes elided>'"),
        (LineTooLong(b"secret line" + b"..." , 8190), "LineTooLong: Got more than 8190 bytes when reading: "
         "b'<14 bytes elided>'."),
        (BadHttpMessage("Can't decode: plain text, nothing quoted"), "BadHttpMessage: Can't decode: plain "
         "text, nothing quoted"),
    ],
    ids=["c-parser", "double-quoted", "cut-short", "line-too-long", "nothing-quoted"],
)  # fmt: skip
def test_fault_text_names_the_error_and_elides_the_request_bytes_it_quotes(
    error: Exception, text: str
) -> None:
    assert fault_text(error) == text
