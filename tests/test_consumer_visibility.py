"""docs/consumer.md, "Visibility": the extender that keeps a running batch hidden. A renewal SQS
refused is tried again soon, not a whole period later (when the timeout would already have run
out); and a renewal under way when the batch ends is finished before the batch is released for
retry, so it cannot undo the backoff.

SQS is moto's server, reached through tests/s3_pause_proxy.py (a plain HTTP proxy: it holds or
refuses chosen requests); the extender's waits are injected, so nothing sleeps a period.
"""

from __future__ import annotations

import asyncio
import dataclasses

from aiohttp import web
from structlog.testing import capture_logs

from consumer import sqs as sqs_calls
from consumer.sqs import Message
from consumer.visibility import RETRY_RENEWAL_S, keep_visible
from shared import aws
from shared.provision import QueuePair
from shared.settings import AwsSettings
from tests.jira_fixtures import make_event
from tests.s3_pause_proxy import S3PauseProxy
from tests.test_consumer_helpers import enqueue, envelope_of

CREATED = "mattermost-plugin-jira__webhook-issue-created.json"
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
        waits = RecordedWaits(rounds=2)
        via_proxy = dataclasses.replace(aws_settings, endpoint_url=proxy.url)
        # WHEN the extender runs two rounds
        async with aws.sqs_client(via_proxy) as sqs:
            with capture_logs() as logs:
                await keep_visible(
                    sqs,
                    queues.queue_url,
                    messages,
                    visibility_timeout_s=TIMEOUT_S,
                    stop=asyncio.Event(),
                    wait=waits,
                )
    # THEN the round after the refused one came after RETRY_RENEWAL_S, and renewed the message; the
    # next waits a half period again
    assert waits.delays == [TIMEOUT_S / 2, RETRY_RENEWAL_S, TIMEOUT_S / 2]
    events = [(e["event"], e.get("retry_in_s"), e.get("failed")) for e in logs]
    assert events == [("visibility_extend_failed", RETRY_RENEWAL_S, None), ("visibility_extended", None, [])]


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
