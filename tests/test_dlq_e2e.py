"""Dead-letter replay end to end with the real consumer: replayed events are applied, obey the version
guard (an older event never regresses the row), and a duplicate left by an interrupted replay changes
nothing."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from consumer.deadletter import Rejected, dead_letter
from ops import dlq
from shared import aws
from shared.envelope import Envelope
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings, QueueSettings
from shared.sqs_batch import send_entries
from tests.conftest import consume_all, drain
from tests.jira_fixtures import make_event

ISSUE = "31337"
T0 = 1_700_000_000_000
UPDATED = "mattermost-plugin-jira__webhook-issue-updated-labels.json"


def event(ts_ms: int, summary: str) -> Envelope:
    body = make_event(UPDATED, issue_id=ISSUE, ts=ts_ms)
    body["issue"]["fields"]["summary"] = summary
    return Envelope(
        body=json.dumps(body),
        event_type=body["webhookEvent"],
        issue_id=ISSUE,
        event_ts_ms=ts_ms,
        received_at_ms=ts_ms + 5,
        delivery_id=f"delivery-{ts_ms}",
    )


async def enqueue(aws_settings: AwsSettings, queue_url: str, envelopes: list[Envelope]) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        results = await send_entries(sqs, queue_url, [e.send_entry(str(i)) for i, e in enumerate(envelopes)])
    assert all(r.ok for r in results)


async def dead_letter_through_the_consumer(
    aws_settings: AwsSettings, queues: QueuePair, envelopes: list[Envelope]
) -> None:
    """Enqueue, then dead-letter with the consumer's own code, as it does with events it rejects."""
    await enqueue(aws_settings, queues.queue_url, envelopes)
    async with aws.sqs_client(aws_settings) as sqs:
        resp = await sqs.receive_message(
            QueueUrl=queues.queue_url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            WaitTimeSeconds=0,
        )
        messages: list[Any] = resp["Messages"]
        assert len(messages) == len(envelopes)
        rejected = [Rejected(m, "DataError", "simulated bad deploy") for m in messages]
        stored = await dead_letter(sqs, queues.dlq_url, rejected)
        assert len(stored) == len(envelopes)
        for m in stored:
            await sqs.delete_message(QueueUrl=queues.queue_url, ReceiptHandle=m["ReceiptHandle"])


async def row(pg: asyncpg.Connection) -> tuple[str, int]:
    r = await pg.fetchrow("SELECT summary, version FROM ap_jira_task WHERE issue_id = $1", int(ISSUE))
    assert r is not None
    return r["summary"], r["version"]


async def test_replayed_events_are_applied_and_obey_the_version_guard(
    aws_settings: AwsSettings, queues: QueuePair, db_settings: DatabaseSettings, pg: asyncpg.Connection
) -> None:
    settings = QueueSettings(queue_url=queues.queue_url, dlq_url=queues.dlq_url)
    # GIVEN the row at version T0+2000 ("v2"), and an older ("v1") and a newer ("v3") event of the same
    # issue in the dead-letter queue
    await enqueue(aws_settings, queues.queue_url, [event(T0 + 2000, "v2")])
    await consume_all(aws_settings, queues, db_settings, timeout_s=30)
    assert await row(pg) == ("v2", T0 + 2000)
    await dead_letter_through_the_consumer(
        aws_settings, queues, [event(T0 + 1000, "v1"), event(T0 + 3000, "v3")]
    )

    # WHEN they are replayed and consumed
    async with aws.sqs_client(aws_settings) as sqs:
        summary = await dlq.replay_dead_letters(sqs, settings)
    stats = await consume_all(aws_settings, queues, db_settings, timeout_s=30)

    # THEN the newer one is applied, the older one is a stale no-op, and the DLQ is empty
    assert (summary.replayed, summary.failed) == (2, 0)
    assert (stats.applied, stats.skipped_stale, stats.dead_lettered) == (1, 1, 0)
    assert await row(pg) == ("v3", T0 + 3000)
    assert await drain(aws_settings, queues.dlq_url) == []
    deliveries = await pg.fetchval("SELECT count(*) FROM ap_jira_task_event WHERE issue_id = $1", int(ISSUE))
    assert deliveries == 3

    # WHEN an interrupted replay left a copy of "v3" in the DLQ and it is replayed again
    await dead_letter_through_the_consumer(aws_settings, queues, [event(T0 + 3000, "v3")])
    async with aws.sqs_client(aws_settings) as sqs:
        again = await dlq.replay_dead_letters(sqs, settings)
    stats = await consume_all(aws_settings, queues, db_settings, timeout_s=30)

    # THEN the duplicate changes nothing
    assert again.replayed == 1
    assert (stats.applied, stats.dead_lettered) == (0, 0)
    assert stats.duplicate == 1  # the same delivery id was already recorded
    assert await row(pg) == ("v3", T0 + 3000)
    assert await pg.fetchval("SELECT count(*) FROM ap_jira_task_event WHERE issue_id = $1", int(ISSUE)) == 3
