"""The queue-depth poller and ``queue stats`` when SQS refuses the dead-letter queue's peek (a role
without ``sqs:ReceiveMessage`` on the DLQ or left out of its KMS key's policy, or a throttled receive):
the counts it did read are still published, so ``JiralakeDeadLetterQueueNotEmpty`` still sees the
dead-lettered events; only the age is unknown. moto does not enforce IAM, so a proxy in front of it
answers ``ReceiveMessage`` the way SQS answers a role without that permission."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import structlog
from aiohttp import web
from prometheus_client import REGISTRY

from ops.queue_stats import Thresholds, exceeded, read_stats
from shared import aws
from shared.metrics import QUEUE_MESSAGES
from shared.provision import QueuePair
from shared.queue_depth import (
    DEAD_LETTER_QUEUE,
    DENIED_REPEEK_S,
    OldestAgeTracker,
    poll_queue_depths,
    queue_urls,
)
from shared.settings import AwsSettings, QueueSettings
from tests.fault_proxy import SqsFaultProxy


class DenyReceiveProxy(SqsFaultProxy):
    """Forwards every SQS call to moto except ``ReceiveMessage``, refused with ``AccessDenied``."""

    # The JSON error type, and SQS's query-compatible code header (None: not sent).
    error_type = "com.amazon.coral.service#AccessDeniedException"
    query_error: str | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Amz-Target", "").endswith(".ReceiveMessage"):
            await request.read()
            self.counts.requests["ReceiveMessage"] += 1
            headers = {"x-amzn-RequestId": str(uuid.uuid4())}
            if self.query_error is not None:
                headers["x-amzn-query-error"] = self.query_error
            return web.json_response(
                {"__type": self.error_type, "message": "not authorized"},
                status=400,
                content_type="application/x-amz-json-1.0",
                headers=headers,
            )
        return await super()._handle(request)


class DenyKeyProxy(DenyReceiveProxy):
    """``ReceiveMessage`` refused by the queue's KMS key (its policy leaves the role out), as SQS says it."""

    error_type = "com.amazonaws.sqs#KmsAccessDenied"
    query_error: str | None = "KMS.AccessDeniedException;Sender"


class DenyKeyNoHeaderProxy(DenyKeyProxy):
    query_error = None


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def dead_letter(aws_settings: AwsSettings, queues: QueuePair, count: int) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        for i in range(count):
            await sqs.send_message(
                QueueUrl=queues.dlq_url,
                MessageBody=f"m{i}",
                MessageGroupId=f"3000{i}",
                MessageDeduplicationId=f"denied-{i}",
            )


@pytest.mark.parametrize(
    ("deny", "code"),
    [
        (DenyReceiveProxy, "AccessDenied"),
        (DenyKeyProxy, "KMS.AccessDeniedException"),
        (DenyKeyNoHeaderProxy, "KmsAccessDenied"),
    ],
)
async def test_a_refused_peek_still_publishes_the_dead_letter_counts(
    aws_settings: AwsSettings, queues: QueuePair, deny: type[DenyReceiveProxy], code: str
) -> None:
    # GIVEN 2 events on the DLQ, and an SQS that refuses every ReceiveMessage (IAM, or the queue's key)
    await dead_letter(aws_settings, queues, 2)
    QUEUE_MESSAGES.labels(DEAD_LETTER_QUEUE, "visible").set(-1)  # whatever earlier tests left
    stop = asyncio.Event()
    async with deny(aws_settings.endpoint_url or "") as proxy:
        denied = AwsSettings(region=aws_settings.region, endpoint_url=proxy.url)
        urls = queue_urls(QueueSettings(queue_url=queues.queue_url, dlq_url=queues.dlq_url))
        with structlog.testing.capture_logs() as logs:
            # WHEN the poller runs for a few rounds
            task = asyncio.create_task(
                poll_queue_depths(denied, urls, interval_s=0.05, stop=stop), name="queue-depth-poller"
            )
            deadline = time.monotonic() + 10
            while proxy.counts.requests["GetQueueAttributes"] < 8:  # 4 rounds of 2 queues
                assert time.monotonic() < deadline, "the poller did not poll in time"
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.wait_for(task, timeout=10)

    # THEN the DLQ's counts are published, its age is unknown, and the refusal is logged
    assert gauge("jiralake_queue_messages", queue=DEAD_LETTER_QUEUE, state="visible") == 2
    assert gauge("jiralake_queue_oldest_message_age_seconds", queue=DEAD_LETTER_QUEUE) is None
    refused = [e for e in logs if e["event"] == "queue_oldest_age_unavailable"]
    assert [(e["queue"], e["asked_again_in_s"]) for e in refused] == [(DEAD_LETTER_QUEUE, DENIED_REPEEK_S)]
    assert code in refused[0]["error"]
    # AND the refused peek is not asked again round after round (each would count as a failed SQS
    # call toward JiralakeSqsErrors)
    assert proxy.counts.requests["ReceiveMessage"] == 1


async def test_a_refused_peek_is_asked_again_an_hour_later(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN an event on the DLQ, and a tracker whose peek SQS refused (a grant being restored: IAM
    # changes take a while to apply everywhere)
    await dead_letter(aws_settings, queues, 1)
    clock = [1_000_000.0]
    tracker = OldestAgeTracker(now_s=lambda: clock[0])
    async with DenyReceiveProxy(aws_settings.endpoint_url or "") as proxy:
        denied = AwsSettings(region=aws_settings.region, endpoint_url=proxy.url)
        async with aws.sqs_client(denied) as sqs:
            first = await tracker.depth(sqs, DEAD_LETTER_QUEUE, queues.dlq_url, peek=True)
            assert (first.visible, first.oldest_age_s) == (1, None)
            # WHEN it polls again within the hour, and then after it, the grant restored
            clock[0] += DENIED_REPEEK_S - 1
            await tracker.depth(sqs, DEAD_LETTER_QUEUE, queues.dlq_url, peek=True)
            assert proxy.counts.requests["ReceiveMessage"] == 1
    clock[0] += 1
    async with aws.sqs_client(aws_settings) as sqs:
        depth = await tracker.depth(sqs, DEAD_LETTER_QUEUE, queues.dlq_url, peek=True)
    # THEN the age is back
    assert depth.oldest_age_s is not None


async def test_queue_stats_still_checks_the_thresholds_when_the_peek_is_refused(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN 3 events on the DLQ, and an SQS that refuses every ReceiveMessage
    await dead_letter(aws_settings, queues, 3)
    async with DenyReceiveProxy(aws_settings.endpoint_url or "") as proxy:
        denied = AwsSettings(region=aws_settings.region, endpoint_url=proxy.url)
        with structlog.testing.capture_logs() as logs:
            # WHEN queue stats reads the queues (the cron check `queue stats --max-dlq 0`)
            settings = QueueSettings(queue_url=queues.queue_url, dlq_url=queues.dlq_url)
            depths = await read_stats(denied, settings)
        assert proxy.counts.requests["ReceiveMessage"] == 1

    # THEN the counts are there, the DLQ's age is unknown, the refusal is logged, and the check fires
    dlq = depths[1]
    assert (dlq.queue, dlq.visible, dlq.oldest_age_s) == (DEAD_LETTER_QUEUE, 3, None)
    assert exceeded(depths, Thresholds(max_visible=None, max_dlq=0)) == [
        "dead-letter queue holds 3 messages (max 0)"
    ]
    assert [e["queue"] for e in logs if e["event"] == "queue_oldest_age_unavailable"] == [DEAD_LETTER_QUEUE]
