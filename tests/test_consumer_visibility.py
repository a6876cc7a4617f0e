"""docs/consumer.md, "Visibility": the extender that keeps a running batch hidden. A renewal SQS
refused is tried again soon, not a whole period later (when the timeout would already have run
out); and a renewal under way when the batch ends is finished before the batch is released for
retry, so it cannot undo the backoff (the extender alone, then the consumer's worker).

SQS is moto's server, reached through tests/s3_pause_proxy.py (a plain HTTP proxy: it holds or
refuses chosen requests); the extender's waits are injected, so nothing sleeps a period.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import asyncpg
from aiohttp import web
from structlog.testing import capture_logs

from consumer import sqs as sqs_calls
from consumer.apply import apply_envelopes
from consumer.service import run_consumer
from consumer.sqs import Message
from consumer.visibility import RETRY_RENEWAL_S, keep_visible, retry_delay_s
from shared import aws
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from tests.fault_proxy import SqsFaultProxy
from tests.jira_fixtures import make_event
from tests.s3_pause_proxy import S3PauseProxy
from tests.test_consumer_helpers import (
    consumer_settings,
    consumer_waiting_on_lock,
    enqueue,
    envelope_of,
    queue_counts,
    wait_for,
)

CREATED = "mattermost-plugin-jira__webhook-issue-created.json"
ASSIGNED = "mattermost-plugin-jira__webhook-issue-updated-assigned.json"
# botocore's attempts per request: the first and 3 retries (shared/aws.py).
SQS_ATTEMPTS = 4
TIMEOUT_S = 60


def renewal(request: web.Request) -> bool:
    return request.headers.get("X-Amz-Target", "").endswith("ChangeMessageVisibilityBatch")


class RecordedWaits:
    """The extender's waits: each is recorded and returns at once, "not stopped" until ``rounds``
    waits were made or ``stop`` is set."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.delays: list[float] = []

    async def __call__(self, stop: asyncio.Event, delay_s: float) -> bool:
        self.delays.append(delay_s)
        return stop.is_set() or len(self.delays) > self.rounds


async def received(aws_settings: AwsSettings, queues: QueuePair) -> list[Message]:
    await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, issue_id=7, ts=1))])
    async with aws.sqs_client(aws_settings) as sqs:
        return await sqs_calls.receive(
            sqs, queues.queue_url, max_messages=1, wait_time_s=1, visibility_timeout_s=TIMEOUT_S
        )


async def two_rounds(
    aws_settings: AwsSettings, queues: QueuePair, messages: list[Message]
) -> tuple[RecordedWaits, list[MutableMapping[str, Any]]]:
    """The extender's waits and log lines over two rounds of renewals through ``aws_settings``."""
    waits = RecordedWaits(rounds=2)
    async with aws.sqs_client(aws_settings) as sqs:
        with capture_logs() as logs:
            await keep_visible(
                sqs,
                queues.queue_url,
                messages,
                visibility_timeout_s=TIMEOUT_S,
                stop=asyncio.Event(),
                wait=waits,
            )
    return waits, logs


async def test_a_refused_renewal_is_tried_again_soon_not_a_period_later(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a received message, and SQS refusing the first renewal (503 to each of botocore's attempts)
    messages = await received(aws_settings, queues)
    assert len(messages) == 1
    async with S3PauseProxy(aws_settings.endpoint_url or "") as proxy:
        for attempt in range(SQS_ATTEMPTS):
            proxy.hold(f"renewal, attempt {attempt + 1}", renewal)
        proxy.release()
        # WHEN the extender runs two rounds
        waits, logs = await two_rounds(
            dataclasses.replace(aws_settings, endpoint_url=proxy.url), queues, messages
        )
    # THEN the round after the refused one came after RETRY_RENEWAL_S, and renewed the message; the
    # next waits a half period again
    assert waits.delays == [TIMEOUT_S / 2, RETRY_RENEWAL_S, TIMEOUT_S / 2]
    events = [(e["event"], e.get("retry_in_s"), e.get("failed")) for e in logs]
    assert events == [
        ("visibility_extend_failed", RETRY_RENEWAL_S, None),
        ("visibility_extended", None, None),
    ]


class RefuseRenewalEntriesProxy(SqsFaultProxy):
    """Answers the first ChangeMessageVisibilityBatch with every entry failed (SQS's per-entry
    InternalError), without forwarding it; later calls pass through."""

    def __init__(self, target_url: str) -> None:
        super().__init__(target_url)
        self.refused = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if renewal(request) and not self.refused:
            self.refused += 1
            entries = json.loads(await request.read())["Entries"]
            failed = [
                {"Id": e["Id"], "SenderFault": False, "Code": "InternalError", "Message": "injected"}
                for e in entries
            ]
            return web.json_response(
                {"Successful": [], "Failed": failed}, content_type="application/x-amz-json-1.0"
            )
        return await super()._handle(request)


async def test_a_renewal_whose_entries_sqs_refused_is_tried_again_soon_and_said_loudly(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a received message, and SQS answering the first renewal with its entry failed
    messages = await received(aws_settings, queues)
    assert len(messages) == 1
    async with RefuseRenewalEntriesProxy(aws_settings.endpoint_url or "") as proxy:
        # WHEN the extender runs two rounds
        waits, logs = await two_rounds(
            dataclasses.replace(aws_settings, endpoint_url=proxy.url), queues, messages
        )
    # THEN the refusal is a warning naming SQS's reason, and the next round comes after RETRY_RENEWAL_S,
    # as after a call that failed as a whole, and renews the message
    assert waits.delays == [TIMEOUT_S / 2, RETRY_RENEWAL_S, TIMEOUT_S / 2]
    events = [(e["event"], e["log_level"], e.get("failed")) for e in logs]
    assert events == [
        ("visibility_extend_failed", "warning", ["InternalError: injected"]),
        ("visibility_extended", "info", None),
    ]


async def test_a_renewal_under_way_is_finished_before_the_extender_stops(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a received message and its extender, whose first renewal SQS has not answered yet
    messages = await received(aws_settings, queues)
    stop = asyncio.Event()
    async with S3PauseProxy(aws_settings.endpoint_url or "") as proxy:
        held = proxy.hold("renewal", renewal, then_forward=True)
        via_proxy = dataclasses.replace(aws_settings, endpoint_url=proxy.url)
        async with aws.sqs_client(via_proxy) as sqs:
            with capture_logs() as logs:
                extender = asyncio.create_task(
                    keep_visible(
                        sqs,
                        queues.queue_url,
                        messages,
                        visibility_timeout_s=TIMEOUT_S,
                        stop=stop,
                        wait=RecordedWaits(rounds=5),
                    )  # fmt: skip
                )
                await asyncio.wait_for(held.reached.wait(), timeout=30)
                # WHEN the batch ends (stop set) while that renewal is under way
                stop.set()
                await asyncio.wait({extender}, timeout=0.5)
                # THEN the extender waits for it (a release sent now would be overtaken by it) ...
                assert not extender.done()
                proxy.release()
                await asyncio.wait_for(extender, timeout=30)
    # ... and returns once SQS answered it, renewing nothing more
    assert [e["event"] for e in logs] == ["visibility_extended"]


async def test_a_batch_released_for_retry_waits_for_its_renewal_under_way(
    pg: asyncpg.Connection, aws_settings: AwsSettings, queues: QueuePair, db_settings: DatabaseSettings
) -> None:
    # GIVEN an issue whose row a session keeps locked, so a batch updating it times out on the lock
    await apply_envelopes(pg, [envelope_of(make_event(CREATED, issue_id=1, ts=1000))])
    async with S3PauseProxy(aws_settings.endpoint_url or "") as proxy:
        # AND SQS holding the batch's first visibility renewal (sent after 1 s; forwarded on release)
        held = proxy.hold("renewal", renewal, then_forward=True)
        settings = consumer_settings(
            dataclasses.replace(aws_settings, endpoint_url=proxy.url),
            queues,
            db_settings,
            visibility_timeout_s=2,
            statement_timeout_s=3.0,
            retry_in_place_s=0,
            retry_base_s=0,  # a retried batch is visible again at once
        )
        stop = asyncio.Event()
        async with pg.transaction():
            await pg.execute("SELECT 1 FROM ap_jira_task WHERE issue_id = 1 FOR UPDATE")
            await enqueue(
                aws_settings, queues.queue_url, [envelope_of(make_event(ASSIGNED, issue_id=1, ts=2000))]
            )
            consumer = asyncio.create_task(run_consumer(settings, stop))
            await asyncio.wait_for(held.reached.wait(), timeout=30)
            # WHEN the statement times out while that renewal is under way, and the consumer is
            # asked to stop (so nothing receives the batch again)
            await wait_for(not_waiting_on_lock(pg), what="the batch's statement to time out")
            stop.set()
            proxy.release()
            stats = await asyncio.wait_for(consumer, timeout=30)
    # THEN the release came after the renewal, and is what holds: the message is visible now (a
    # renewal landing after it would have hidden it for another 2 s)
    assert stats.retried == 1
    assert await queue_counts(aws_settings, queues.queue_url) == (1, 0)


def not_waiting_on_lock(pg: asyncpg.Connection) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not await consumer_waiting_on_lock(pg)

    return check


async def test_a_receive_reads_the_receive_count_the_retry_backoff_grows_with(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN one message on the queue
    await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, issue_id=1, ts=1000))])
    counts = []
    # WHEN the consumer's receive gets it twice (visibility 0: back at once)
    async with aws.sqs_client(aws_settings) as sqs:
        for _ in range(2):
            messages = await sqs_calls.receive(
                sqs, queues.queue_url, max_messages=10, wait_time_s=1, visibility_timeout_s=0
            )
            counts.append([sqs_calls.receive_count(m) for m in messages])
    # THEN each receipt carries SQS's count, from which a retry's backoff doubles (5 s, then 10 s)
    assert counts == [[1], [2]]
    assert retry_delay_s(counts[-1][0], base_s=5, max_s=60) == 10
