"""The receiver's aiohttp application: ``POST /webhooks/jira``, ``GET /healthz``, ``GET /readyz``.

``build_app(settings, sqs)`` makes the whole app around an SQS client the caller owns; on startup the
app learns how large a message the queue takes and starts its micro-batcher, and on cleanup it flushes
the batcher, so tests run it with aiohttp's ``TestServer`` and ``main()`` with an ``AppRunner``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler

from receiver.batcher import BatcherClosed, BatcherUnavailable, SqsBatcher
from receiver.intake import IntakeRules, admit, check_headers
from receiver.message_size import MessageLimits
from receiver.outcomes import Answer, Outcome, Rejected
from receiver.readiness import QueueReadiness
from receiver.settings import ReceiverSettings
from receiver.signature import MATCHED_PREVIOUS
from shared import http_server
from shared.admin_server import add_health_routes
from shared.envelope import Envelope
from shared.jira_event import Ignored
from shared.metrics import (
    RECEIVER_JIRA_USERS_DELETED,
    RECEIVER_PREVIOUS_SECRET_MATCHES,
    RECEIVER_REQUEST_SECONDS,
    RECEIVER_REQUESTS,
    SQS_CALLS,
    sqs_label_sets,
    start_at_zero,
)
from shared.provision import MAX_MESSAGE_BYTES
from shared.queue_limits import queue_message_limit

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()

WEBHOOK_PATH = "/webhooks/jira"
# Log event names.
LOG_WEBHOOK = "webhook"
LOG_QUEUED = "webhook_queued"
LOG_NOT_ROUTED = "request_not_routed"
LOG_MESSAGE_LIMITS = "receiver_message_limits"
# The event type shared.jira_event gives Jira's user_deleted webhook (the bare {accountId, username}
# body included): a Jira account was deleted, so an erasure (`jiralake forget-user`) may be due.
USER_DELETED = "user_deleted"


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Receiver:
    """What the handlers share: settings, the SQS client, the batcher and the readiness check."""

    settings: ReceiverSettings
    sqs: SQSClient
    rules: IntakeRules
    batcher: SqsBatcher
    readiness: QueueReadiness
    clock_ms: Callable[[], int]
    stopping: bool = False
    # Requests reading their bodies now (bounded by settings.max_bodies_reading).
    reading: int = 0
    # Webhook requests being handled now, and set whenever there are none: shutdown waits for them.
    handling: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def problem(self) -> str | None:
        """Why the receiver should not get traffic now (checked before asking SQS), or None."""
        return "shutting down" if self.stopping else self.batcher.problem


RECEIVER = web.AppKey("receiver", Receiver)


def build_app(
    settings: ReceiverSettings, sqs: SQSClient, *, clock_ms: Callable[[], int] = _wall_clock_ms
) -> web.Application:
    start_at_zero(RECEIVER_REQUESTS, [(outcome.value,) for outcome in Outcome])
    start_at_zero(SQS_CALLS, sqs_label_sets("SendMessageBatch", "GetQueueAttributes"))
    batcher = SqsBatcher(
        sqs,
        settings.queue_url,
        max_wait_s=settings.batch_max_wait_ms / 1000,
        max_pending=settings.max_pending_entries,
        max_inflight=settings.max_inflight_batches,
        timeout_s=settings.sqs_timeout_s,
    )
    readiness = QueueReadiness(
        sqs,
        settings.queue_url,
        cache_s=settings.readiness_cache_s,
        timeout_s=settings.sqs_timeout_s,
        problems=lambda: receiver.problem(),
    )
    receiver = Receiver(
        settings=settings,
        sqs=sqs,
        # The queue's own limit replaces SQS's largest at startup (_lifetime).
        rules=IntakeRules(
            limits=MessageLimits(max_body_bytes=settings.max_body_bytes),
            secrets=settings.secrets,
            accepted_event_prefixes=settings.accepted_event_prefixes,
            body_timeout_s=settings.body_timeout_s,
        ),
        batcher=batcher,
        readiness=readiness,
        clock_ms=clock_ms,
    )
    # Bodies are read in handle_webhook with their own limit; this only guards request.read().
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[RECEIVER] = receiver
    app.router.add_post(WEBHOOK_PATH, handle_webhook, expect_handler=expect_webhook)
    add_health_routes(app, readiness)
    # Last, so it only sees what no route above takes: a wrong URL or method registered in Jira.
    app.router.add_route("*", "/{tail:.*}", handle_unrouted)
    app.cleanup_ctx.append(_lifetime)
    app.on_shutdown.append(_stop_accepting)
    return app


def server_options(settings: ReceiverSettings) -> dict[str, Any]:
    """aiohttp's connection-level limits for the webhook port (shared.http_server.server_options)."""
    return http_server.server_options(idle_timeout_s=settings.idle_timeout_s, logger=HTTP_SERVER_LOG)


# aiohttp's request handler for the webhook port logs here.
HTTP_SERVER_LOG = http_server.server_logger("receiver")


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    receiver = app[RECEIVER]
    settings = receiver.settings
    queue_limit = await queue_message_limit(
        receiver.sqs, settings.queue_url, timeout_s=settings.sqs_timeout_s
    )
    limits = MessageLimits(
        max_body_bytes=settings.max_body_bytes,
        queue_max_message_bytes=queue_limit or MAX_MESSAGE_BYTES,
        queue_limit_read=queue_limit is not None,
    )
    limits.check_queue()
    receiver.rules = replace(receiver.rules, limits=limits)
    log.info(
        LOG_MESSAGE_LIMITS,
        queue_max_message_bytes=limits.queue_max_message_bytes,
        max_message_bytes=limits.max_entry_bytes,
        max_body_bytes=limits.body_limit_bytes,
    )
    receiver.batcher.start()
    yield
    # Runs after aiohttp let in-flight requests finish: send whatever still waits, then stop.
    await receiver.batcher.close(receiver.settings.shutdown_grace_s)


async def _stop_accepting(app: web.Application) -> None:
    # Shutdown began: new webhooks get 503 (Jira retries them elsewhere or later); those in flight
    # have their entries sent at once rather than after the batch wait.
    receiver = app[RECEIVER]
    if receiver.stopping:
        return  # finish_in_flight did this already; aiohttp's on_shutdown comes after it
    receiver.stopping = True
    receiver.batcher.drain()
    log.info("receiver_stopping_accepting_webhooks")


async def finish_in_flight(app: web.Application, timeout_s: float) -> None:
    """Shutdown's first step after the listening socket closes, before aiohttp's own shutdown: refuse
    new webhooks (503), send waiting entries at once, and wait up to ``timeout_s`` for the webhooks
    being handled to be answered. aiohttp's shutdown stops reading every connection at once, so a
    body still arriving then would be cut off and its request never answered, logged or counted."""
    receiver = app[RECEIVER]
    await _stop_accepting(app)
    try:
        async with asyncio.timeout(timeout_s):
            await receiver.idle.wait()
    except TimeoutError:
        log.warning("receiver_requests_still_running", requests=receiver.handling, grace_s=timeout_s)


async def expect_webhook(request: web.Request) -> web.Response | None:
    """A webhook sent with ``Expect: 100-continue`` waits for a go-ahead before sending its body: one
    refused from its headers alone (a Content-Type that is not JSON, a declared length over the
    limit) gets its 415/413 instead, and never sends the body. Any other gets aiohttp's own answer
    (100 Continue; 417 for an Expect it does not know), and the handler runs as usual."""
    started = time.perf_counter()
    receiver = request.app[RECEIVER]
    try:
        check_headers(request, receiver.rules)
    except Rejected as rejected:
        response = _answered(rejected.answer, started, {}).response()
        response.force_close()  # the body was never asked for: the connection cannot be reused
        return response
    refusal = _refusal_before_body(receiver)
    if refusal is not None:  # answered before the client sends a body the handler would not read
        response = _answered(refusal, started, {}).response()
        response.force_close()
        return response
    await _default_expect_handler(request)
    return None


async def handle_webhook(request: web.Request) -> web.Response:
    receiver = request.app[RECEIVER]
    receiver.handling += 1
    receiver.idle.clear()
    try:
        response = await _handle_webhook(request, receiver)
    finally:
        receiver.handling -= 1
        if receiver.handling == 0:
            receiver.idle.set()
    if receiver.stopping:
        response.force_close()  # shutting down: no next request on this connection
    return response


async def _handle_webhook(request: web.Request, receiver: Receiver) -> web.Response:
    started = time.perf_counter()
    received_at_ms = receiver.clock_ms()
    fields: dict[str, object] = {}
    answer = _answered(await _answer(request, receiver, received_at_ms, fields), started, fields)
    response = answer.response()
    if request.content.exception() is not None:
        await _answer_and_close(request, response)
    elif answer.outcome in (Outcome.TOO_LARGE, Outcome.TIMED_OUT) or not request.content.at_eof():
        response.force_close()  # no keep-alive: the unread rest of the body is discarded, never stored
    return response


def _answered(answer: Answer, started: float, fields: dict[str, object]) -> Answer:
    """Count a webhook's answer and log its one line."""
    duration_s = time.perf_counter() - started
    RECEIVER_REQUESTS.labels(answer.outcome.value).inc()
    RECEIVER_REQUEST_SECONDS.observe(duration_s)
    if answer.reason is not None:
        fields["reason"] = answer.reason
    level = log.info if answer.outcome in (Outcome.ACCEPTED, Outcome.IGNORED) else log.warning
    level(
        LOG_WEBHOOK,
        outcome=answer.outcome.value,
        status=answer.status,
        duration_ms=round(duration_s * 1000, 1),
        **fields,
    )
    return answer


async def _answer_and_close(request: web.Request, response: web.Response) -> None:
    """Answer a request whose body failed to read (it did not decode, or the client went away), then
    close the connection. After a handler returns, aiohttp reads whatever is left of the body before
    closing (its lingering close); reading a failed body raises its error again, which aiohttp would
    log as an "Unhandled exception" with a traceback. A failed body has nothing left to read."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        return  # the client is gone: aiohttp sees that too, and closes without reading on
    request.protocol.force_close()  # the answer is written: close once it is sent, skip the lingering


async def handle_unrouted(request: web.Request) -> web.Response:
    """Any other path or method on the main port. aiohttp's own 404/405 are plain text and leave no
    trace, so a webhook registered in Jira with a wrong URL (a trailing slash, a missing path) would
    fail unseen: answer in JSON naming the endpoint, and log the method and path (never the query).

    The path is compared and logged as sent (``raw_path``), as the router matched it: a POST to
    ``/webhooks%2Fjira`` (a proxy that encoded the slash) is another path, 404, not a 405 that says
    to use POST."""
    path = request.rel_url.raw_path
    if path == WEBHOOK_PATH and request.method != "POST":
        status, label, reason = 405, "method_not_allowed", f"{WEBHOOK_PATH} takes POST only"
        headers: dict[str, str] | None = {"Allow": "POST"}
    else:
        status, label, reason = 404, "not_found", f"no such endpoint; Jira webhooks go to POST {WEBHOOK_PATH}"
        headers = None
    log.warning(LOG_NOT_ROUTED, method=request.method[:16], path=path[:200], status=status)
    return web.json_response({"status": label, "reason": reason}, status=status, headers=headers)


async def _answer(
    request: web.Request, receiver: Receiver, received_at_ms: int, fields: dict[str, object]
) -> Answer:
    """Everything a webhook request can lead to, mapped to one :class:`Answer`."""
    refusal = _refusal_before_body(receiver)
    if refusal is not None:
        return refusal
    receiver.reading += 1
    try:
        admission = await admit(request, receiver.rules, received_at_ms=received_at_ms)
    except Rejected as rejected:
        return rejected.answer
    finally:
        receiver.reading -= 1
    if admission.signed_with is not None:
        # Which secret matched ("current"/"previous"), never the secret: shows when a rotation is done.
        fields["signed_with"] = admission.signed_with
        if admission.signed_with == MATCHED_PREVIOUS:
            RECEIVER_PREVIOUS_SECRET_MATCHES.inc()
    admitted = admission.result
    if isinstance(admitted, Ignored):
        fields["event_type"] = admitted.event_type
        if admitted.event_type == USER_DELETED and admission.signed_with is not None:
            # Counted and flagged for on-call; the account id and username are never kept or logged.
            fields["user_deleted"] = True
            RECEIVER_JIRA_USERS_DELETED.inc()
        return Answer(Outcome.IGNORED, details={"event_type": admitted.event_type})
    fields.update(
        event_type=admitted.event_type,
        issue_id=admitted.issue_id,
        delivery_id=admitted.delivery_id,
        retry_count=admitted.retry_count,
    )
    assert admission.entry is not None  # intake makes the entry of every envelope
    with structlog.contextvars.bound_contextvars(
        issue_id=admitted.issue_id, delivery_id=admitted.delivery_id
    ):
        return await _enqueue(receiver, admitted, admission.entry, admission.entry_bytes)


def _refusal_before_body(receiver: Receiver) -> Answer | None:
    """The 503 a webhook gets before its body is read (also before ``100 Continue``), or None."""
    if receiver.stopping:
        return Answer(Outcome.UNAVAILABLE, "the receiver is shutting down; retry later")
    if receiver.reading >= receiver.settings.max_bodies_reading:
        # Every body is buffered (up to max_body_bytes) before its signature can be checked: bound
        # how many at once, so unsigned senders trickling large bodies cannot exhaust memory.
        log.warning("receiver_overloaded", detail=f"{receiver.reading} request bodies being read")
        return Answer(Outcome.UNAVAILABLE, "too many requests are sending their bodies; retry later")
    return None


async def _enqueue(receiver: Receiver, envelope: Envelope, entry: dict[str, Any], entry_bytes: int) -> Answer:
    details = {
        "event_type": envelope.event_type,
        "issue_id": envelope.issue_id,
        "delivery_id": envelope.delivery_id,
    }
    try:
        future = receiver.batcher.submit(entry, size_bytes=entry_bytes)
    except BatcherClosed:
        return Answer(Outcome.UNAVAILABLE, "the receiver is shutting down; retry later", details)
    except BatcherUnavailable as exc:
        log.warning("receiver_overloaded", detail=str(exc))
        return Answer(Outcome.UNAVAILABLE, "the receiver is overloaded; retry later", details)
    log.debug(LOG_QUEUED, issue_id=envelope.issue_id, delivery_id=envelope.delivery_id)
    timeout_s = receiver.settings.sqs_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            result = await future
    except TimeoutError:
        return Answer(Outcome.UNAVAILABLE, f"SQS did not confirm within {timeout_s:g}s; retry later", details)
    if result.ok:
        return Answer(Outcome.ACCEPTED, details=details)
    if result.retryable:
        log.warning("sqs_entry_failed", error=result.error, retryable=True, maybe_stored=result.maybe_stored)
        # Its answer lost, SQS may have stored it: Jira's retry is then a duplicate SQS or the consumer drops.
        stored = "did not confirm it stored" if result.maybe_stored else "did not store"
        return Answer(Outcome.UNAVAILABLE, f"SQS {stored} the message; retry later", details)
    # Intake already refused what SQS would refuse for its content, so a refused entry means the
    # queue's setup (a disabled or forbidden KMS key, a queue policy): an operator's problem. 503, so
    # Jira retries the delivery once it is fixed; a 4xx would make Jira drop it for good.
    log.error("sqs_entry_failed", error=result.error, retryable=False)
    return Answer(Outcome.UNAVAILABLE, "SQS refused the message; retry later", details)
