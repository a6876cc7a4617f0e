"""``jiralake dlq list|replay|purge`` against moto's server: listing leaves the queue as it was,
replay restores events in order per issue and never loses one, purge needs --yes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import aioboto3
import pytest
import structlog
from aiobotocore.config import AioConfig
from aiohttp import web

from jiralake import cli
from ops import dlq, dlq_command
from ops.text_table import format_table
from shared import aws
from shared.envelope import ENVELOPE_ATTRIBUTES, Envelope, error_attributes
from shared.provision import QueuePair
from shared.settings import AwsSettings, QueueSettings
from tests.conftest import drain
from tests.fault_proxy import RefuseSendingProxy, SqsFaultProxy
from tests.jira_fixtures import make_event
from tests.tcp_proxy import TcpProxy

ISSUE_A = "10001"
ISSUE_B = "10002"
T0 = 1_700_000_000_000
# moto answers exactly, so most tests skip the 1 s long poll that guards real SQS's sampling.
NO_WAIT = 0
UPDATED = "mattermost-plugin-jira__webhook-issue-updated-labels.json"


def envelope(issue_id: str, ts_ms: int, *, name: str = UPDATED) -> Envelope:
    body = make_event(name, issue_id=issue_id, ts=ts_ms)
    return Envelope(
        body=json.dumps(body),
        event_type=body["webhookEvent"],
        issue_id=issue_id,
        event_ts_ms=ts_ms,
        received_at_ms=ts_ms + 7,
        delivery_id=f"delivery-{issue_id}-{ts_ms}",
    )


async def dead_letter(
    sqs: Any, dlq_url: str, env: Envelope, *, error: str = "InvalidEvent", dedup_id: str | None = None
) -> None:
    """Put an event on the DLQ the way the consumer does: envelope plus the 4 error attributes."""
    entry = env.send_entry("0")
    attributes = dict(entry["MessageAttributes"])
    attributes.update(
        error_attributes(
            error_class=error,
            error_message=f"cannot apply {env.delivery_id}",
            failed_at_iso="2026-01-02T03:04:05Z",
            original_group_id=env.group_id,
        )
    )
    await sqs.send_message(
        QueueUrl=dlq_url,
        MessageBody=entry["MessageBody"],
        MessageGroupId=entry["MessageGroupId"],
        MessageDeduplicationId=dedup_id or entry["MessageDeduplicationId"],
        MessageAttributes=attributes,
    )


async def dead_letter_all(sqs: Any, dlq_url: str, envs: Iterable[Envelope]) -> None:
    for env in envs:
        await dead_letter(sqs, dlq_url, env)


def events_of(issue_id: str, n: int) -> list[Envelope]:
    """``n`` events of one issue, 1 ms apart from T0."""
    return [envelope(issue_id, T0 + i) for i in range(n)]


async def exceed_max_receive_count(sqs: Any, queue_url: str, env: Envelope) -> None:
    """Send to the main queue and receive it until SQS itself moves it to the DLQ (maxReceiveCount 5)."""
    entry = env.send_entry("0")
    entry.pop("Id")
    await sqs.send_message(QueueUrl=queue_url, **entry)
    for _ in range(6):
        await sqs.receive_message(QueueUrl=queue_url, VisibilityTimeout=0, WaitTimeSeconds=0)


def settings(queues: QueuePair) -> QueueSettings:
    return QueueSettings(queue_url=queues.queue_url, dlq_url=queues.dlq_url)


async def counts(sqs: Any, url: str) -> tuple[int, int]:
    attrs = (
        await sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def by_group(messages: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Event times per message group, in the order the queue gave them."""
    groups: dict[str, list[int]] = {}
    for m in messages:
        groups.setdefault(m["Attributes"]["MessageGroupId"], []).append(
            int(m["MessageAttributes"]["event_ts_ms"]["StringValue"])
        )
    return groups


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``cli.main`` configures structlog for the captured stderr; put the suite's setup back after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


# -- list --


def put_in_dlq(aws_settings: AwsSettings, queues: QueuePair, envs: Iterable[Envelope]) -> None:
    """``envs`` on the DLQ as the consumer leaves them, from a test that runs ``cli.main`` (no loop)."""

    async def put() -> None:
        async with aws.sqs_client(aws_settings) as sqs:
            await dead_letter_all(sqs, queues.dlq_url, envs)

    asyncio.run(put())


def given_dead_lettered(
    aws_settings: AwsSettings, queues: QueuePair, monkeypatch: pytest.MonkeyPatch, *envs: Envelope
) -> None:
    """``envs`` on the DLQ, and both queues in the environment for ``cli.main``."""
    put_in_dlq(aws_settings, queues, envs)
    monkeypatch.setenv("JIRALAKE_QUEUE_URL", queues.queue_url)
    monkeypatch.setenv("JIRALAKE_DLQ_URL", queues.dlq_url)


async def test_list_shows_what_is_there_and_leaves_it(aws_settings: AwsSettings, queues: QueuePair) -> None:
    # GIVEN two dead-lettered events of one issue, one event SQS moved by itself, one foreign message
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter(sqs, queues.dlq_url, envelope(ISSUE_A, T0 + 1))
        await dead_letter(sqs, queues.dlq_url, envelope(ISSUE_A, T0 + 2), error="DataError")
        await exceed_max_receive_count(sqs, queues.queue_url, envelope(ISSUE_B, T0 + 3))
        await sqs.send_message(
            QueueUrl=queues.dlq_url, MessageBody="not json", MessageGroupId="x", MessageDeduplicationId="x"
        )
        assert await counts(sqs, queues.dlq_url) == (4, 0)

        # WHEN it is listed twice
        first = await dlq.list_dead_letters(sqs, queues.dlq_url, limit=100, wait_s=NO_WAIT)
        second = await dlq.list_dead_letters(sqs, queues.dlq_url, limit=100, wait_s=NO_WAIT)

        # THEN both show exactly those messages, and they are all visible in the DLQ again
        seen = [(d.issue_id, d.event_type, d.event_ts_ms, d.reason) for d in first]
        assert sorted(seen, key=str) == sorted(
            [
                (
                    ISSUE_A,
                    "jira:issue_updated",
                    T0 + 1,
                    f"InvalidEvent: cannot apply delivery-{ISSUE_A}-{T0 + 1}",
                ),
                (
                    ISSUE_A,
                    "jira:issue_updated",
                    T0 + 2,
                    f"DataError: cannot apply delivery-{ISSUE_A}-{T0 + 2}",
                ),
                (ISSUE_B, "jira:issue_updated", T0 + 3, "exceeded maxReceiveCount"),
                (None, None, None, "not a jiralake envelope"),
            ],
            key=str,
        )
        assert [d.message_id for d in second] == [d.message_id for d in first]
        assert [d.receive_count for d in second] == [d.receive_count + 1 for d in first]
        moved = next(d for d in first if d.issue_id == ISSUE_B)
        assert moved.receive_count >= 6  # five receives in the main queue, then at least this listing
        assert await counts(sqs, queues.dlq_url) == (4, 0)


async def test_list_respects_the_limit(aws_settings: AwsSettings, queues: QueuePair) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, events_of(ISSUE_A, 3))
        listed = await dlq.list_dead_letters(sqs, queues.dlq_url, limit=2, wait_s=NO_WAIT)
        assert [d.event_ts_ms for d in listed] == [T0, T0 + 1]
        assert await counts(sqs, queues.dlq_url) == (3, 0)


async def test_a_stop_ends_the_listing_after_its_receive(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN one event each of 12 issues (two receives' worth), and a stop (SIGTERM) during the first
    stop = asyncio.Event()
    async with aws.sqs_client(aws_settings) as sqs:
        for i in range(12):
            await dead_letter(sqs, queues.dlq_url, envelope(str(20_000 + i), T0 + i))

        def stop_after_receive(**_: Any) -> None:
            stop.set()

        sqs.meta.events.register("after-call.sqs.ReceiveMessage", stop_after_receive)
        # WHEN listed
        listed = await dlq.list_dead_letters(sqs, queues.dlq_url, limit=100, wait_s=NO_WAIT, stop=stop)
        sqs.meta.events.unregister("after-call.sqs.ReceiveMessage", stop_after_receive)
        # THEN it returns the first receive's messages, and all 12 are visible again
        assert len(listed) == dlq.RECEIVE_BATCH
        assert await counts(sqs, queues.dlq_url) == (12, 0)


@pytest.mark.usefixtures("restore_logging")
def test_list_command_json_and_table(
    aws_settings: AwsSettings,
    queues: QueuePair,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN one dead-lettered event and the queues in the environment
    given_dead_lettered(aws_settings, queues, monkeypatch, envelope(ISSUE_A, T0))

    # WHEN listed as JSON and as text
    assert cli.main(["dlq", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert cli.main(["dlq", "list"]) == 0
    text = capsys.readouterr().out

    # THEN the JSON names the event and the error, and the text shows it in a row
    assert listed["approximate_messages"] == 1
    [message] = listed["messages"]
    assert {k: message[k] for k in ("issue_id", "event_type", "event_time", "error_class", "replayable")} == {
        "issue_id": ISSUE_A,
        "event_type": "jira:issue_updated",
        "event_time": "2023-11-14T22:13:20.000Z",
        "error_class": "InvalidEvent",
        "replayable": True,
    }
    lines = text.splitlines()
    assert lines[0].split() == ["ISSUE", "EVENT", "EVENT", "TIME", "SENT", "RECEIVES", "REASON"]
    assert lines[1].startswith(f"{ISSUE_A}  jira:issue_updated  2023-11-14T22:13:20.000Z")
    assert lines[1].endswith(f"InvalidEvent: cannot apply delivery-{ISSUE_A}-{T0}")
    assert lines[2].startswith("1 listed of about 1 in ")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("ts_ms", [10**40, -62_135_596_800_001])  # past datetime's range either way
def test_list_shows_an_event_time_that_is_no_time_as_its_number(
    aws_settings: AwsSettings,
    queues: QueuePair,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ts_ms: int,
) -> None:
    # GIVEN an event dead-lettered because its time is out of range
    given_dead_lettered(aws_settings, queues, monkeypatch, envelope(ISSUE_A, ts_ms))
    # WHEN listed, THEN the listing shows the number instead of failing
    assert cli.main(["dlq", "list", "--json"]) == 0
    [message] = json.loads(capsys.readouterr().out)["messages"]
    assert message["event_time"] == str(ts_ms)
    assert cli.main(["dlq", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"{ISSUE_A}  jira:issue_updated  {ts_ms}  ")


# -- replay --


async def test_replay_restores_events_in_order_per_issue_and_empties_the_dlq(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN three events of issue A and two of issue B dead-lettered, interleaved, one of them moved by SQS
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(
            sqs,
            queues.dlq_url,
            [
                envelope(ISSUE_A, T0 + 1),
                envelope(ISSUE_B, T0 + 2),
                envelope(ISSUE_A, T0 + 3),
                envelope(ISSUE_B, T0 + 4),
            ],
        )
        await exceed_max_receive_count(sqs, queues.queue_url, envelope(ISSUE_A, T0 + 5))
        originals = {m["MessageId"]: m for m in await _peek_all(sqs, queues.dlq_url)}

        # WHEN replayed
        summary = await dlq.replay_dead_letters(sqs, settings(queues))

    # THEN all five are back on the main queue, in their order per issue, with only the envelope
    # attributes and a new deduplication id, and the DLQ is empty
    assert (summary.replayed, summary.skipped, summary.failed) == (5, 0, 0)
    replayed = await drain(aws_settings, queues.queue_url)
    assert by_group(replayed) == {ISSUE_A: [T0 + 1, T0 + 3, T0 + 5], ISSUE_B: [T0 + 2, T0 + 4]}
    for m in replayed:
        assert sorted(m["MessageAttributes"]) == sorted(ENVELOPE_ATTRIBUTES)
        assert m["Attributes"]["MessageDeduplicationId"].startswith("replay-")
        source = originals[m["Attributes"]["MessageDeduplicationId"].removeprefix("replay-")]
        assert m["Body"] == source["Body"]
        assert m["Attributes"]["MessageDeduplicationId"] != source["Attributes"]["MessageDeduplicationId"]
    assert await drain(aws_settings, queues.dlq_url) == []


async def test_replay_is_not_swallowed_by_the_original_deduplication_id(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN the main queue still holds a message with the original deduplication id (inside SQS's
    # 5-minute window) and the DLQ a dead-lettered copy of the same delivery
    env = envelope(ISSUE_A, T0)
    async with aws.sqs_client(aws_settings) as sqs:
        entry = env.send_entry("0")
        entry.pop("Id")
        await sqs.send_message(QueueUrl=queues.queue_url, **entry)
        await dead_letter(sqs, queues.dlq_url, env)
        # WHEN replayed
        summary = await dlq.replay_dead_letters(sqs, settings(queues), wait_s=NO_WAIT)
    # THEN the replay was stored next to it, not deduplicated away
    assert summary.replayed == 1
    assert len(await drain(aws_settings, queues.queue_url)) == 2


async def test_replay_one_issue_leaves_the_others(aws_settings: AwsSettings, queues: QueuePair) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(
            sqs,
            queues.dlq_url,
            [envelope(ISSUE_A, T0 + 1), envelope(ISSUE_B, T0 + 2), envelope(ISSUE_A, T0 + 3)],
        )
        summary = await dlq.replay_dead_letters(sqs, settings(queues), issue_id=ISSUE_B, wait_s=NO_WAIT)
        assert (summary.replayed, summary.failed, summary.other_issues) == (1, 0, 2)
        # The other issue's events are visible in the DLQ again, in order.
        assert await counts(sqs, queues.dlq_url) == (2, 0)
        left = await dlq.list_dead_letters(sqs, queues.dlq_url, limit=10, wait_s=NO_WAIT)
    assert [(d.issue_id, d.event_ts_ms) for d in left] == [(ISSUE_A, T0 + 1), (ISSUE_A, T0 + 3)]
    assert by_group(await drain(aws_settings, queues.queue_url)) == {ISSUE_B: [T0 + 2]}


async def test_replay_one_issue_finds_its_events_an_older_receiver_stored_with_leading_zeros(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN an event of issue B whose attributes an older receiver wrote with leading zeros
    padded = replace(envelope(ISSUE_B, T0 + 2), issue_id=f"00{ISSUE_B}")
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, [envelope(ISSUE_A, T0 + 1), padded])
        # WHEN only issue B is replayed
        summary = await dlq.replay_dead_letters(sqs, settings(queues), issue_id=ISSUE_B, wait_s=NO_WAIT)
    # THEN that event is B's, and goes back as the body routes it
    assert (summary.replayed, summary.failed, summary.other_issues) == (1, 0, 1)
    assert by_group(await drain(aws_settings, queues.queue_url)) == {ISSUE_B: [T0 + 2]}


async def test_replay_dry_run_changes_nothing(aws_settings: AwsSettings, queues: QueuePair) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(
            sqs,
            queues.dlq_url,
            [envelope(ISSUE_A, T0 + 1), envelope(ISSUE_A, T0 + 2), envelope(ISSUE_B, T0 + 3)],
        )
        before = [
            d.message_id for d in await dlq.list_dead_letters(sqs, queues.dlq_url, limit=10, wait_s=NO_WAIT)
        ]

        summary = await dlq.replay_dead_letters(sqs, settings(queues), dry_run=True, wait_s=NO_WAIT)

        assert (summary.replayed, summary.failed) == (3, 0)
        assert {r.outcome for r in summary.results} == {"would_replay"}
        assert await counts(sqs, queues.queue_url) == (0, 0)
        assert await counts(sqs, queues.dlq_url) == (3, 0)
        after = [
            d.message_id for d in await dlq.list_dead_letters(sqs, queues.dlq_url, limit=10, wait_s=NO_WAIT)
        ]
    assert after == before


async def test_replay_limit_keeps_order_across_runs(aws_settings: AwsSettings, queues: QueuePair) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, events_of(ISSUE_A, 3))
        first = await dlq.replay_dead_letters(sqs, settings(queues), limit=2, wait_s=NO_WAIT)
        assert first.replayed == 2
        assert await counts(sqs, queues.dlq_url) == (1, 0)
        second = await dlq.replay_dead_letters(sqs, settings(queues), wait_s=NO_WAIT)
        assert second.replayed == 1
    assert by_group(await drain(aws_settings, queues.queue_url)) == {ISSUE_A: [T0, T0 + 1, T0 + 2]}


async def test_replay_sends_large_events_in_calls_sqs_accepts(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN three 400 KB events dead-lettered: together more than one SendMessageBatch may carry (1 MiB)
    async with aws.sqs_client(aws_settings) as sqs:
        for i, issue_id in enumerate((ISSUE_A, ISSUE_B, "10003")):
            body = make_event(UPDATED, issue_id=issue_id, ts=T0 + i)
            body["issue"]["fields"]["description"] = "x" * 400_000
            env = envelope(issue_id, T0 + i)
            await dead_letter(sqs, queues.dlq_url, replace(env, body=json.dumps(body)))
        # WHEN replayed
        summary = await dlq.replay_dead_letters(sqs, settings(queues), wait_s=NO_WAIT)
    # THEN all three are back on the main queue and the DLQ is empty
    assert (summary.replayed, summary.skipped, summary.failed) == (3, 0, 0)
    assert by_group(await drain(aws_settings, queues.queue_url)) == {
        ISSUE_A: [T0],
        ISSUE_B: [T0 + 1],
        "10003": [T0 + 2],
    }
    assert await drain(aws_settings, queues.dlq_url) == []


async def replay_refusing(
    aws_settings: AwsSettings, queues: QueuePair, letters: list[Envelope], refused: Envelope
) -> dlq.ReplaySummary:
    """Dead-letter ``letters`` as 600 KB events (two together are over 1 MiB: one SendMessageBatch call
    each), then replay them through an SQS that fails every call carrying ``refused``."""
    async with aws.sqs_client(aws_settings) as sqs:
        for env in letters:
            body = json.loads(env.body)
            body["issue"]["fields"]["description"] = "x" * 600_000
            await dead_letter(sqs, queues.dlq_url, replace(env, body=json.dumps(body)))
    async with RefuseSendingProxy(aws_settings.endpoint_url or "", refused.delivery_id) as proxy:
        refusing = AwsSettings(region=aws_settings.region, endpoint_url=proxy.url)
        async with aws.sqs_client(refusing) as sqs:
            summary = await dlq.replay_dead_letters(sqs, settings(queues), wait_s=NO_WAIT)
        assert proxy.counts.requests["refused"] >= 1
    return summary


async def test_a_failed_call_holds_back_the_issues_later_events(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN two 600 KB events of one issue in the DLQ, and an SQS that fails every call carrying the
    # first one
    first, second = envelope(ISSUE_A, T0), envelope(ISSUE_A, T0 + 1)
    # WHEN replayed
    summary = await replay_refusing(aws_settings, queues, [first, second], refused=first)
    # THEN the first failed and the second was never sent: both stay in the DLQ, in order
    assert [(r.outcome, r.reason) for r in summary.results] == [
        ("failed", summary.results[0].reason),
        ("skipped", dlq.EARLIER_FAILED_REASON),
    ]
    # (SQS answered 503, retried by botocore: SQS failed, which is not SQS saying it stored nothing)
    assert (summary.results[0].reason or "").startswith(
        "outcome unknown (ClientError: An error occurred (ServiceUnavailable)"
    )
    assert await drain(aws_settings, queues.queue_url) == []
    assert by_group(await drain(aws_settings, queues.dlq_url)) == {ISSUE_A: [T0, T0 + 1]}


async def test_a_step_where_one_call_fails_deletes_from_the_dlq_only_what_was_sent(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a 600 KB event of issue A and one of issue B in the DLQ (one step, two SendMessageBatch
    # calls), and an SQS that fails every call carrying A's event
    a, b = envelope(ISSUE_A, T0), envelope(ISSUE_B, T0)
    # WHEN replayed
    summary = await replay_refusing(aws_settings, queues, [a, b], refused=a)
    # THEN B is on the main queue and gone from the DLQ, and A, which was not sent, is still in the DLQ:
    # the DLQ deletes cover the sent calls' entries only
    assert sorted(r.outcome for r in summary.results) == ["failed", "replayed"]
    assert by_group(await drain(aws_settings, queues.queue_url)) == {ISSUE_B: [T0]}
    assert by_group(await drain(aws_settings, queues.dlq_url)) == {ISSUE_A: [T0]}


class LoseFirstAnswerProxy(SqsFaultProxy):
    """Forwards the first call of ``operation`` and answers it 500 anyway, as if SQS's answer were lost
    on the way (what SQS did stays done); records the request of every call of ``operation``."""

    def __init__(self, target_url: str, operation: str) -> None:
        super().__init__(target_url)
        self.operation = operation
        self.calls: list[dict[str, Any]] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Amz-Target", "").endswith(f".{self.operation}"):
            body = await request.read()
            self.calls.append(json.loads(body))
            if len(self.calls) == 1:
                await self._forward(request, body)
                return self._error()
        return await super()._handle(request)


async def test_a_receive_whose_answer_was_lost_is_asked_again_as_itself_and_what_it_hid_is_reported(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN three events in the DLQ, and an SQS that receives them but whose answer is lost
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, events_of(ISSUE_A, 3))
    async with LoseFirstAnswerProxy(aws_settings.endpoint_url or "", "ReceiveMessage") as proxy:
        lossy = AwsSettings(region=aws_settings.region, endpoint_url=proxy.url)
        # WHEN they are replayed
        summary, dlq_counts, _ = await dlq_command._replay(
            lossy, settings(queues), limit=None, issue_id=None, dry_run=False
        )
    # THEN botocore's retry asked for the same receive attempt, which real SQS answers with the same
    # messages (moto ignores the attempt id, so here they stay hidden)
    first, retry = [call.get("ReceiveRequestAttemptId") for call in proxy.calls[:2]]
    assert first and retry == first
    # AND what stayed hidden is reported, not taken for an empty dead-letter queue
    assert dlq_command.render_replay(summary, dlq_counts).splitlines() == [
        "replayed 0, skipped 0, failed 0",
        "the dead-letter queue still holds about 3 message(s) in flight, which this replay could not see: "
        "another reader holds them (a dlq list, another replay) or SQS's answer to a receive was lost; "
        "they are visible again within 5 minutes: run the same command again then",
    ]


async def test_replay_skips_messages_that_are_not_envelopes(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        await sqs.send_message(
            QueueUrl=queues.dlq_url, MessageBody="{}", MessageGroupId="g", MessageDeduplicationId="g"
        )
        await dead_letter(sqs, queues.dlq_url, envelope(ISSUE_A, T0))
        summary = await dlq.replay_dead_letters(sqs, settings(queues), wait_s=NO_WAIT)
        assert (summary.replayed, summary.skipped, summary.failed) == (1, 1, 0)
        assert [r.reason for r in summary.results if r.outcome == "skipped"] == ["not a jiralake envelope"]
        assert await counts(sqs, queues.dlq_url) == (1, 0)


async def test_replay_reads_the_routing_attributes_again_from_the_body(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN events an older receiver routed differently from this version, which the consumer then
    # dead-lettered for disagreeing with their bodies: an issue id with leading zeros (now the number
    # itself), a body time it could not read (it gave the receive time); and a sprint event, which
    # concerns no issue
    padded = replace(envelope(ISSUE_A, T0), issue_id=f"00{ISSUE_A}")
    untimed = replace(envelope(ISSUE_B, T0 + 5), event_ts_ms=1)
    sprint = replace(
        envelope(ISSUE_A, T0 + 9), body=json.dumps({"webhookEvent": "sprint_started", "timestamp": T0})
    )
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, [padded, untimed, sprint])
        # WHEN replayed
        summary = await dlq.replay_dead_letters(sqs, settings(queues), wait_s=NO_WAIT)
    # THEN the two issue events go back with the attributes their bodies give, in their issue's group
    assert (summary.replayed, summary.skipped, summary.failed) == (2, 1, 0)
    replayed = await drain(aws_settings, queues.queue_url)
    assert sorted(
        (m["Attributes"]["MessageGroupId"], m["MessageAttributes"]["issue_id"]["StringValue"], ts)
        for m in replayed
        for ts in [int(m["MessageAttributes"]["event_ts_ms"]["StringValue"])]
    ) == [(ISSUE_A, ISSUE_A, T0), (ISSUE_B, ISSUE_B, T0 + 5)]
    assert {m["MessageAttributes"]["delivery_id"]["StringValue"] for m in replayed} == {
        padded.delivery_id,
        untimed.delivery_id,
    }
    # AND the event whose body concerns no issue stays in the DLQ, saying why
    assert [r.reason for r in summary.results if r.outcome == "skipped"] == [
        "its body is a 'sprint_started' event, which concerns no issue"
    ]
    assert len(await drain(aws_settings, queues.dlq_url)) == 1


class SlowSendProxy(SqsFaultProxy):
    """Forwards every call; a SendMessageBatch only after ``delay_s`` (an SQS far away, or a big DLQ)."""

    def __init__(self, target_url: str, delay_s: float) -> None:
        super().__init__(target_url)
        self.delay_s = delay_s

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Amz-Target", "").endswith(".SendMessageBatch"):
            await asyncio.sleep(self.delay_s)
        return await super()._handle(request)


@pytest.mark.timeout(60)
async def test_a_replay_that_outlasts_its_hold_goes_on_to_the_end(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a DLQ whose first message is no envelope (held, never sent), then 40 issues' events
    events = [envelope(str(20_000 + i), T0 + i) for i in range(40)]
    async with aws.sqs_client(aws_settings) as sqs:
        await sqs.send_message(
            QueueUrl=queues.dlq_url, MessageBody="{}", MessageGroupId="g", MessageDeduplicationId="g"
        )
        await dead_letter_all(sqs, queues.dlq_url, events)
    # WHEN it is replayed with a hold of 1 s over an SQS that takes 0.4 s per send (4 batches), so
    # the held message comes back while the replay still has events to send
    async with SlowSendProxy(aws_settings.endpoint_url or "", delay_s=0.4) as proxy:
        slow = AwsSettings(region=aws_settings.region, endpoint_url=proxy.url)
        async with aws.sqs_client(slow) as sqs:
            summary = await dlq.replay_dead_letters(sqs, settings(queues), hold_s=1, wait_s=NO_WAIT)
    # THEN every event was replayed, the odd message counted once and left in the DLQ
    assert (summary.replayed, summary.skipped, summary.failed, summary.stopped) == (40, 1, 0, None)
    assert len(await drain(aws_settings, queues.queue_url)) == 40
    assert [m["Body"] for m in await drain(aws_settings, queues.dlq_url)] == ["{}"]


async def test_an_event_back_in_the_dlq_is_not_replayed_twice_in_one_run(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN an event of issue A dead-lettered, and again under a new message id (as the consumer
    # dead-letters a replayed event that still cannot be applied), then a later event of issue A,
    # and one of issue B
    failing = envelope(ISSUE_A, T0)
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter(sqs, queues.dlq_url, failing)
        await dead_letter(sqs, queues.dlq_url, failing, dedup_id="dead-lettered-again")
        await dead_letter(sqs, queues.dlq_url, envelope(ISSUE_A, T0 + 1))
        await dead_letter(sqs, queues.dlq_url, envelope(ISSUE_B, T0 + 2))
        # WHEN dry-run, then replayed
        dry = await dlq.replay_dead_letters(sqs, settings(queues), dry_run=True, wait_s=NO_WAIT)
        summary = await dlq.replay_dead_letters(sqs, settings(queues), wait_s=NO_WAIT)
        # THEN the event went back once, and its copy stays in the DLQ as a failure (the command exits
        # 1), with issue A's later event behind it; issue B goes on; the dry run said the same
        expected = [
            (ISSUE_A, "failed", dlq.REPLAYED_AGAIN_REASON),
            (ISSUE_A, "skipped", dlq.EARLIER_FAILED_REASON),
        ]
        for run in (dry, summary):
            assert (run.replayed, run.skipped, run.failed) == (2, 1, 1)
            assert [
                (r.issue_id, r.outcome, r.reason) for r in run.results if r.outcome in ("failed", "skipped")
            ] == expected
        assert await counts(sqs, queues.dlq_url) == (2, 0)
    assert by_group(await drain(aws_settings, queues.queue_url)) == {ISSUE_A: [T0], ISSUE_B: [T0 + 2]}


async def test_replay_that_cannot_send_keeps_everything_in_the_dlq(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a main queue URL that does not exist (a typo in JIRALAKE_QUEUE_URL)
    broken = QueueSettings(queue_url=queues.queue_url.replace(".fifo", "-gone.fifo"), dlq_url=queues.dlq_url)
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, events_of(ISSUE_A, 2))
        # WHEN replayed
        summary = await dlq.replay_dead_letters(sqs, broken, wait_s=NO_WAIT)
        # THEN both failed, nothing was deleted, and they are visible in the DLQ again
        assert (summary.replayed, summary.failed) == (0, 2)
        assert all(r.reason and r.reason.startswith("not sent: ") for r in summary.results)
        assert await counts(sqs, queues.dlq_url) == (2, 0)


async def test_connection_lost_between_send_and_delete_duplicates_instead_of_losing(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN two events of one issue in the DLQ, and the replay's connection to SQS running through a
    # proxy that is cut right after SQS accepted the SendMessageBatch
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, events_of(ISSUE_A, 2))

    assert aws_settings.endpoint_url
    host, port = aws_settings.endpoint_url.removeprefix("http://").split(":")
    proxy = await TcpProxy(host, int(port)).start()
    try:
        # One attempt per call: the default retries would only slow the test down.
        client = aioboto3.Session().client(
            "sqs",
            region_name=aws_settings.region,
            endpoint_url=f"http://{proxy.host}:{proxy.port}",
            config=AioConfig(
                connect_timeout=5, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"}
            ),
        )
        async with client as sqs:

            def cut_after_send(**_: Any) -> None:
                proxy.cut()

            sqs.meta.events.register("after-call.sqs.SendMessageBatch", cut_after_send)
            # WHEN replayed
            summary = await dlq.replay_dead_letters(sqs, settings(queues), wait_s=NO_WAIT)
    finally:
        await proxy.close()

    # THEN both are reported as failed, and each event is in BOTH queues: duplicated, never lost
    assert (summary.replayed, summary.failed) == (0, 2)
    # (a connection closed under a call cannot tell a delete that never left from one whose answer was
    # lost, so the outcome is reported as unknown)
    assert all(
        r.reason and r.in_doubt and "its delete from the dead-letter queue has an unknown outcome" in r.reason
        for r in summary.results
    )
    assert summary.stopped and summary.stopped.startswith("cannot receive from the dead-letter queue: ")
    assert by_group(await drain(aws_settings, queues.queue_url)) == {ISSUE_A: [T0, T0 + 1]}
    async with aws.sqs_client(aws_settings) as sqs:
        visible, in_flight = await counts(sqs, queues.dlq_url)
    assert visible + in_flight == 2  # held until their visibility timeout; a later replay resends them


async def test_cancelled_replay_finishes_the_send_delete_pair(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN events of two issues, and a replay cancelled (Ctrl-C, shutdown) right after its first send
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter(sqs, queues.dlq_url, envelope(ISSUE_A, T0 + 1))
        await dead_letter(sqs, queues.dlq_url, envelope(ISSUE_B, T0 + 2))
        task: asyncio.Task[dlq.ReplaySummary] | None = None

        def cancel_after_send(**_: Any) -> None:
            assert task is not None
            task.cancel()

        sqs.meta.events.register("after-call.sqs.SendMessageBatch", cancel_after_send)
        task = asyncio.create_task(
            dlq.replay_dead_letters(sqs, settings(queues), wait_s=NO_WAIT), name="replay"
        )
        with pytest.raises(asyncio.CancelledError):
            await task
        sqs.meta.events.unregister("after-call.sqs.SendMessageBatch", cancel_after_send)
        # THEN what was sent was also deleted from the DLQ: each event is in exactly one queue
        main = await _peek_all(sqs, queues.queue_url)
        left = await _peek_all(sqs, queues.dlq_url)
    assert by_group(main) == {ISSUE_A: [T0 + 1], ISSUE_B: [T0 + 2]}
    assert left == []


class PausingProxy(SqsFaultProxy):
    """Holds the first SendMessageBatch call until ``release`` is set; ``sending`` says it arrived."""

    def __init__(self, target_url: str) -> None:
        super().__init__(target_url)
        self.sending = asyncio.Event()
        self.release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if (
            request.headers.get("X-Amz-Target", "").endswith(".SendMessageBatch")
            and not self.sending.is_set()
        ):
            self.sending.set()
            await self.release.wait()
        return await super()._handle(request)


async def test_sigterm_stops_the_replay_between_batches(aws_settings: AwsSettings, queues: QueuePair) -> None:
    # GIVEN 6 events of issue A and 6 of issue B in the DLQ, interleaved
    async with aws.sqs_client(aws_settings) as sqs:
        for i in range(6):
            await dead_letter(sqs, queues.dlq_url, envelope(ISSUE_A, T0 + 2 * i))
            await dead_letter(sqs, queues.dlq_url, envelope(ISSUE_B, T0 + 2 * i + 1))
    proxy = PausingProxy(aws_settings.endpoint_url or "")
    async with proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JIRALAKE_")}
        env.update(
            AWS_ENDPOINT_URL=proxy.url, JIRALAKE_QUEUE_URL=queues.queue_url, JIRALAKE_DLQ_URL=queues.dlq_url
        )
        # WHEN `dlq replay --issue A` (a one-off task) gets SIGTERM while its first send is in flight
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jiralake", "dlq", "replay", "--issue", ISSUE_A,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(proxy.sending.wait(), timeout=30)
        child.send_signal(signal.SIGTERM)
        assert child.stderr is not None
        early = b""  # the child's log, up to its line saying it took the signal
        while b"signal_received" not in early:
            line = await asyncio.wait_for(child.stderr.readline(), timeout=30)
            assert line, "the child ended without logging the signal"
            early += line
        proxy.release.set()
        out, rest = await asyncio.wait_for(child.communicate(), timeout=30)
        err = early + rest

    # THEN the batch in flight was sent and deleted, nothing after it, the summary and one line say so,
    # the exit code is 143, and every message left in the DLQ is visible again (none held for 5 min)
    assert child.returncode == 143, err
    sent = by_group(await drain(aws_settings, queues.queue_url))
    assert list(sent) == [ISSUE_A] and sent[ISSUE_A] == [T0 + 2 * i for i in range(len(sent[ISSUE_A]))]
    assert out.decode().splitlines()[-1].startswith(f"replayed {len(sent[ISSUE_A])}, skipped 0, failed 0; ")
    assert err.decode().splitlines()[-1] == (
        f"jiralake: dlq replay stopped by SIGTERM after {len(sent[ISSUE_A])} message(s); the rest stay in "
        "the dead-letter queue; run the same command again to go on"
    )
    async with aws.sqs_client(aws_settings) as sqs:
        assert await counts(sqs, queues.dlq_url) == (12 - len(sent[ISSUE_A]), 0)


class FailingOnceStoppedProxy(SqsFaultProxy):
    """Holds the second ReceiveMessage until ``release`` is set, then answers it, and every later call,
    with SQS's 503 (each of botocore's attempts): SQS failing while a listing stops."""

    def __init__(self, target_url: str) -> None:
        super().__init__(target_url)
        self.receives = 0
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.release.is_set():
            return self._error()
        if request.headers.get("X-Amz-Target", "").endswith(".ReceiveMessage"):
            self.receives += 1
            if self.receives == 2:
                self.holding.set()
                await self.release.wait()
                return self._error()
        return await super()._handle(request)


async def test_sigterm_while_sqs_fails_ends_the_listing_with_the_signal_s_exit_code(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN 12 letters in the DLQ (two receives' worth), and `dlq list` whose second receive is held
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, events_of(ISSUE_A, 12))
    async with FailingOnceStoppedProxy(aws_settings.endpoint_url or "") as proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JIRALAKE_")}
        env.update(
            AWS_ENDPOINT_URL=proxy.url, JIRALAKE_QUEUE_URL=queues.queue_url, JIRALAKE_DLQ_URL=queues.dlq_url
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jiralake", "dlq", "list",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(proxy.holding.wait(), timeout=30)
        # WHEN SIGTERM comes, and SQS then fails that receive and the release of what the listing holds
        child.send_signal(signal.SIGTERM)
        assert child.stderr is not None
        early = b""
        while b"signal_received" not in early:
            line = await asyncio.wait_for(child.stderr.readline(), timeout=30)
            assert line, "the child ended without logging the signal"
            early += line
        proxy.release.set()
        _, rest = await asyncio.wait_for(child.communicate(), timeout=60)
    # THEN the exit is the signal's (143), with one line, not SQS's error (exit 1)
    assert child.returncode == 143, (early + rest).decode()
    assert (early + rest).decode().splitlines()[-1] == (
        "jiralake: dlq list stopped by SIGTERM; the messages it held are visible again (at the latest 60 s "
        "after it received them)"
    )


async def test_a_purge_whose_answer_was_lost_is_reported_as_done(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN two events in the DLQ, and an SQS that purges it but whose answer is lost on the way
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, events_of(ISSUE_A, 2))
    async with LoseFirstAnswerProxy(aws_settings.endpoint_url or "", "PurgeQueue") as proxy:
        lossy = AwsSettings(region=aws_settings.region, endpoint_url=proxy.url)
        # WHEN purged (botocore retries the call, which SQS refuses: a purge is under way)
        result = await dlq_command._purge(lossy, queues.dlq_url)
        assert len(proxy.calls) == 2
    # THEN the purge is reported as under way, not failed, and the DLQ is empty
    assert result == dlq.PurgeResult(approximate_messages=2, already_under_way=True)
    assert dlq_command.render_purge(queues.dlq_url, result).startswith(
        f"a purge of {queues.dlq_url} is already under way (it held about 2 message(s); "
    )
    async with aws.sqs_client(aws_settings) as sqs:
        assert await counts(sqs, queues.dlq_url) == (0, 0)


@pytest.mark.usefixtures("restore_logging")
def test_replay_and_purge_commands(
    aws_settings: AwsSettings,
    queues: QueuePair,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def dlq_counts() -> tuple[int, int]:
        async with aws.sqs_client(aws_settings) as sqs:
            return await counts(sqs, queues.dlq_url)

    given_dead_lettered(aws_settings, queues, monkeypatch, *events_of(ISSUE_A, 2))

    # dry run: a line per event and the summary, nothing moved
    assert cli.main(["dlq", "replay", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" (message")[0] for line in out] == [
        f"would replay: issue {ISSUE_A} jira:issue_updated",
        f"would replay: issue {ISSUE_A} jira:issue_updated",
        "dry run, nothing changed: would replay 2, skipped 0",
    ]
    assert asyncio.run(dlq_counts()) == (2, 0)

    # replay of one issue that has nothing in the DLQ
    assert cli.main(["dlq", "replay", "--issue", "999"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == "replayed 0, skipped 0, failed 0; 2 message(s) of other issues left in place"
    )

    # purge refuses without --yes: one line, exit 2, nothing deleted
    assert cli.main(["dlq", "purge"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "jiralake: dlq purge deletes every message in the dead-letter queue for good; add --yes to do it"
    )
    assert asyncio.run(dlq_counts()) == (2, 0)

    # purge --yes empties it
    assert cli.main(["dlq", "purge", "--yes"]) == 0
    assert capsys.readouterr().out.strip() == f"purged {queues.dlq_url} (it held about 2 message(s))"
    assert asyncio.run(dlq_counts()) == (0, 0)

    # a second purge within the minute: SQS refuses it as one under way, which is said, not an error
    assert cli.main(["dlq", "purge", "--yes"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"a purge of {queues.dlq_url} is already under way (it held about 0 message(s); SQS runs one per "
        "queue per minute): what was dead-lettered after it began may remain; check with dlq list in a minute"
    )

    # replay of the rest, for real
    put_in_dlq(aws_settings, queues, events_of(ISSUE_A, 1))
    assert cli.main(["dlq", "replay"]) == 0
    assert capsys.readouterr().out.strip() == "replayed 1, skipped 0, failed 0"


@pytest.mark.usefixtures("restore_logging")
def test_a_replay_that_cannot_read_the_dlq_says_why_on_stderr(
    aws_settings: AwsSettings,
    queues: QueuePair,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a dead-letter queue URL with a typo
    monkeypatch.setenv("JIRALAKE_QUEUE_URL", queues.queue_url)
    monkeypatch.setenv("JIRALAKE_DLQ_URL", queues.dlq_url.replace(".fifo", "-typo.fifo"))
    # WHEN replayed
    assert cli.main(["dlq", "replay"]) == 1
    # THEN the summary is the output, and the reason is the one line on stderr
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "replayed 0, skipped 0, failed 0"
    assert captured.err.splitlines()[-1].startswith(
        "jiralake: dlq replay stopped early: cannot receive from the dead-letter queue: QueueDoesNotExist: "
    )


@pytest.mark.usefixtures("restore_logging")
def test_a_dry_run_says_when_it_could_not_see_everything(
    aws_settings: AwsSettings,
    queues: QueuePair,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN 12 events of one issue in the DLQ: SQS hands out the first 10, then none while they are held
    given_dead_lettered(aws_settings, queues, monkeypatch, *events_of(ISSUE_A, 12))
    # WHEN dry-run
    assert cli.main(["dlq", "replay", "--dry-run"]) == 0
    # THEN it counts the 10 it saw and says the DLQ holds more, and why
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "dry run, nothing changed: would replay 10, skipped 0",
        "the dead-letter queue holds about 12: a dry run may see only the first events of an issue (SQS "
        "hands out no more of an issue while its first ones are held), so the replay itself may move more",
    ]
    # AND the replay itself moves all 12
    assert cli.main(["dlq", "replay"]) == 0
    assert capsys.readouterr().out.strip() == "replayed 12, skipped 0, failed 0"


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("issue", ["", "  ", "ABC-1", "10001x"])
def test_replay_refuses_an_issue_that_is_not_a_numeric_id(
    aws_settings: AwsSettings,
    queues: QueuePair,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    issue: str,
) -> None:
    # GIVEN two issues' events in the DLQ
    async def queue_counts() -> tuple[tuple[int, int], tuple[int, int]]:
        async with aws.sqs_client(aws_settings) as sqs:
            return await counts(sqs, queues.queue_url), await counts(sqs, queues.dlq_url)

    given_dead_lettered(aws_settings, queues, monkeypatch, envelope(ISSUE_A, T0), envelope(ISSUE_B, T0 + 1))
    # WHEN replay is given an --issue that is empty (an unset shell variable) or a key
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dlq", "replay", "--issue", issue])
    # THEN it refuses with argparse's usage error, exit 2, and replays nothing (not everything)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        "jiralake dlq replay: error: argument --issue: not a numeric Jira issue id "
        f"(the ISSUE column of dlq list, not the key): {issue!r}"
    )
    assert asyncio.run(queue_counts()) == ((0, 0), (2, 0))


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("action", [["list"], ["replay"], ["purge", "--yes"]])
def test_commands_refuse_a_dlq_that_is_the_main_queue(
    queues: QueuePair, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    # GIVEN JIRALAKE_DLQ_URL set to the main queue by mistake (a replay would loop on its own copies)
    monkeypatch.setenv("JIRALAKE_QUEUE_URL", queues.queue_url)
    monkeypatch.setenv("JIRALAKE_DLQ_URL", queues.queue_url)
    # WHEN any dlq command runs THEN it stops with one line and exit 2
    assert cli.main(["dlq", *action]) == 2
    assert capsys.readouterr().err.strip() == (
        "jiralake: configuration error: JIRALAKE_QUEUE_URL and JIRALAKE_DLQ_URL name the same queue"
    )


# -- helpers --


async def _peek_all(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Every message on a queue, made visible again afterwards (test helper)."""
    messages: list[dict[str, Any]] = []
    while True:
        resp = await sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=30,
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        )
        batch = resp.get("Messages", [])
        if not batch:
            break
        messages.extend(batch)
    for m in messages:
        await sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
        )
    return messages


def test_a_listed_reason_is_one_printable_line_whatever_a_sender_put_in_it() -> None:
    # GIVEN a dead-letter row whose reason (from a sender other than the consumer) holds line breaks
    # and a terminal's control sequences
    rows = [
        ["100", "jira:issue_created", "fake row: line1\r\nline2 \x9b31m red \x1b[0m é"],
        ["101", "-", "ok"],
    ]
    # WHEN it is listed as a table
    table = format_table(["ISSUE", "EVENT", "REASON"], rows).splitlines()
    # THEN each message is one line, with the control characters shown as escapes, not sent raw
    assert table == [
        "ISSUE  EVENT               REASON",
        "100    jira:issue_created  fake row: line1  line2 \\x9b31m red \\x1b[0m é",
        "101    -                   ok",
    ]
