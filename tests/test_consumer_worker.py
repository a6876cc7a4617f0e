"""The worker against moto's SQS server and real Postgres: end to end, poison messages, Postgres going
away mid-run, a crash between commit and delete, shutdown with a batch in flight, visibility
extension, and the circuit breaker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from consumer.apply import apply_envelopes
from consumer.service import GAUGE_STOP_S, run_consumer, stop_when_crashed
from consumer.settings import ConsumerSettings
from consumer.worker import POOL_CLOSE_S
from shared import aws, migrate
from shared.envelope import ERROR_ATTRIBUTES, Envelope
from shared.errors import CommandError
from shared.metrics import CONSUMER_CIRCUIT_OPEN, CONSUMER_EVENTS, SQS_CALLS
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from tests.conftest import consume_until_idle, drain, empty_database
from tests.fault_proxy import RefuseSendingProxy, SilentProxy
from tests.jira_fixtures import make_event
from tests.tcp_proxy import postgres_proxy, through
from tests.test_consumer_helpers import (
    consumer_settings,
    consumer_waiting_on_lock,
    enqueue,
    enqueue_raw,
    envelope_of,
    fixture_envelopes,
    history_count,
    holds,
    queue_counts,
    snapshot,
    wait_for,
)

CREATED = "mattermost-plugin-jira__webhook-issue-created.json"
ASSIGNED = "mattermost-plugin-jira__webhook-issue-updated-assigned.json"


def counter(metric: object, *labels: str) -> float:
    value: float = metric.labels(*labels)._value.get()  # type: ignore[attr-defined]
    return value


@pytest.fixture
def settings(aws_settings: AwsSettings, queues: QueuePair, db_settings: DatabaseSettings) -> ConsumerSettings:
    return consumer_settings(aws_settings, queues, db_settings)


@contextlib.asynccontextmanager
async def running(settings: ConsumerSettings) -> AsyncIterator[asyncio.Task[object]]:
    """run_consumer in the background; stopped (and its errors raised) on exit."""
    stop = asyncio.Event()
    task: asyncio.Task[object] = asyncio.create_task(run_consumer(settings, stop), name="test-consumer")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def test_real_fixtures_flow_through_the_queue_into_the_tables(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN every real issue fixture on the queue, as the receiver enqueues them
    envelopes = fixture_envelopes()
    await enqueue(aws_settings, queues.queue_url, envelopes)
    # WHEN two pollers consume until the queue is idle
    stats = await consume_until_idle(replace(settings, pollers=2), idle_s=1.0, timeout_s=60)
    # THEN each event was handled once, the queues are empty, and the tables equal a direct apply.
    # A second receipt of one message is a duplicate, not a failure: moto's server can hand a message
    # still in flight to the other poller (a race in its ReceiveMessage), and SQS delivers at least once.
    assert stats.went_idle
    assert stats.received - stats.duplicate == len(envelopes) == 50
    assert stats.dead_lettered == stats.retried == 0
    assert stats.applied + stats.skipped_stale + stats.history_only == 50
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 0)
    assert await queue_counts(aws_settings, queues.dlq_url) == (0, 0)
    through_queue = await snapshot(pg)
    await pg.execute("DELETE FROM ap_jira_task; DELETE FROM ap_jira_task_event")
    await apply_envelopes(pg, envelopes)
    assert through_queue == await snapshot(pg)


async def test_an_invalid_message_the_dlq_did_not_store_stays_on_the_queue(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a body that can never apply and a good event, and an SQS that refuses every SendMessageBatch
    # carrying the bad body (the dead-letter send)
    marker = "not json, never stored in the dlq"
    await enqueue_raw(aws_settings, queues.queue_url, marker, group_id="stray", dedup_id="stray-1")
    await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, issue_id=3, ts=1000))])
    async with RefuseSendingProxy(aws_settings.endpoint_url or "", marker) as proxy:
        through = replace(settings, aws=AwsSettings(region=aws_settings.region, endpoint_url=proxy.url))
        # WHEN the consumer runs until idle
        stats = await consume_until_idle(through, idle_s=1.0, timeout_s=60)
        assert proxy.counts.requests["refused"] >= 1
    # THEN the good event is applied, and the bad message, which the DLQ did not store, is not deleted
    # either: it is still on the main queue (in flight until its visibility timeout), to be dead-lettered
    # on a later receive
    assert (stats.applied, stats.dead_lettered) == (1, 0)
    assert await history_count(pg) == 1
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 1)
    assert await queue_counts(aws_settings, queues.dlq_url) == (0, 0)


async def test_poison_messages_are_dead_lettered_with_their_reason_and_the_rest_applies(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN good events around a NUL in a summary (the newest event of its issue, so it must be
    # written) and a non-JSON body with no attributes
    poison = make_event(CREATED, issue_id=2, ts=2000)
    poison["issue"]["fields"]["summary"] = "bad \u0000"
    poison_envelope = envelope_of(poison)
    await enqueue(
        aws_settings,
        queues.queue_url,
        [
            envelope_of(make_event(CREATED, issue_id=1, ts=1000)),
            poison_envelope,
            envelope_of(make_event(ASSIGNED, issue_id=2, ts=1500)),
        ],
    )
    await enqueue_raw(
        aws_settings, queues.queue_url, "this is not json", group_id="stray", dedup_id="stray-1"
    )
    await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, issue_id=3, ts=1000))])
    dead_before = counter(CONSUMER_EVENTS, "dead_lettered")
    # WHEN the consumer runs until idle
    stats = await consume_until_idle(settings, idle_s=1.0, timeout_s=60)
    # THEN the two bad messages are in the DLQ with the reason, the others are applied
    assert (stats.received, stats.applied, stats.dead_lettered) == (5, 3, 2)
    assert counter(CONSUMER_EVENTS, "dead_lettered") - dead_before == 2
    dead = {m["Body"]: m for m in await drain(aws_settings, queues.dlq_url)}
    assert set(dead) == {poison_envelope.body, "this is not json"}
    nul = dead[poison_envelope.body]
    attrs = {k: v["StringValue"] for k, v in nul["MessageAttributes"].items()}
    assert attrs["error_class"] == "CharacterNotInRepertoireError"
    assert attrs["error_message"] == 'invalid byte sequence for encoding "UTF8": 0x00'
    assert attrs["original_group_id"] == "2" == nul["Attributes"]["MessageGroupId"]
    assert attrs["failed_at"].endswith("+00:00")
    assert attrs["delivery_id"] == poison_envelope.delivery_id  # the original envelope is kept
    stray = {k: v["StringValue"] for k, v in dead["this is not json"]["MessageAttributes"].items()}
    assert set(stray) == set(ERROR_ATTRIBUTES)
    assert (stray["error_class"], stray["original_group_id"]) == ("InvalidEnvelope", "stray")
    rows = await pg.fetch("SELECT issue_id, version FROM ap_jira_task ORDER BY issue_id")
    assert [tuple(r) for r in rows] == [(1, 1000), (2, 1500), (3, 1000)]
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 0)


async def test_a_binary_attribute_of_a_dead_lettered_message_goes_with_it(
    settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a message that is no envelope, from a producer that adds a Binary attribute (a trace id)
    trace = {"DataType": "Binary", "BinaryValue": b"\x01\x02trace"}
    await enqueue_raw(
        aws_settings,
        queues.queue_url,
        "not an envelope",
        group_id="stray",
        dedup_id="stray-binary",
        attributes={"trace": trace, "issue_id": {"DataType": "Binary", "BinaryValue": b"39001"}},
    )
    # WHEN the consumer runs until idle
    stats = await consume_until_idle(settings, idle_s=1.0, timeout_s=60)
    # THEN it is dead-lettered with its reason and both Binary attributes, not a crash
    assert (stats.received, stats.dead_lettered) == (1, 1)
    (dead,) = await drain(aws_settings, queues.dlq_url)
    attrs = dead["MessageAttributes"]
    assert attrs["trace"] == trace
    assert attrs["issue_id"]["BinaryValue"] == b"39001"
    assert attrs["error_class"]["StringValue"] == "InvalidEnvelope"
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 0)


async def test_large_invalid_messages_received_together_are_all_dead_lettered(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN three 400 KB events of three issues whose attributes name another event type (invalid),
    # together more than SQS takes in one SendMessageBatch (1 MiB)
    bad = []
    for issue_id in (1, 2, 3):
        body = make_event(CREATED, issue_id=issue_id, ts=1000)
        body["issue"]["fields"]["description"] = "x" * 400_000
        bad.append(replace(envelope_of(body), event_type="jira:issue_updated"))
        await enqueue(aws_settings, queues.queue_url, bad[-1:])
    # WHEN the consumer receives them in one batch
    stats = await consume_until_idle(settings, idle_s=1.0, timeout_s=60)
    # THEN each is in the DLQ once, with its reason, and none is left on the main queue
    assert (stats.received, stats.batches, stats.dead_lettered) == (3, 1, 3)
    dead = await drain(aws_settings, queues.dlq_url)
    assert sorted(m["MessageAttributes"]["delivery_id"]["StringValue"] for m in dead) == sorted(
        e.delivery_id for e in bad
    )
    assert {m["MessageAttributes"]["error_class"]["StringValue"] for m in dead} == {"InvalidMessage"}
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 0)
    assert await history_count(pg) == 0


async def test_postgres_going_away_mid_batch_loses_nothing_and_applies_nothing_twice(
    pg: asyncpg.Connection,
    settings: ConsumerSettings,
    aws_settings: AwsSettings,
    queues: QueuePair,
    db_settings: DatabaseSettings,
) -> None:
    # GIVEN a consumer that reaches Postgres through a proxy the test can cut
    assert db_settings.url is not None
    proxy = await postgres_proxy(db_settings.url)
    proxied = replace(settings, database=DatabaseSettings(url=through(proxy, db_settings.url)))
    first = [envelope_of(make_event(CREATED, issue_id=i, ts=1000)) for i in range(1, 5)]
    second = [envelope_of(make_event(ASSIGNED, issue_id=i, ts=2000)) for i in range(1, 5)]
    retried_before = counter(CONSUMER_EVENTS, "retried")
    try:
        async with running(proxied):
            await enqueue(aws_settings, queues.queue_url, first)
            await wait_for(lambda: _history_is(pg, 4), what="the first events")
            # WHEN a batch is in flight (held by a lock) and the proxy cuts every connection
            async with pg.transaction():
                await pg.execute("LOCK TABLE ap_jira_task IN EXCLUSIVE MODE")
                await enqueue(aws_settings, queues.queue_url, second)
                await wait_for(lambda: consumer_waiting_on_lock(pg), what="a batch blocked on the lock")
                proxy.cut()
                # THEN the consumer keeps trying to reach Postgres (and does not receive meanwhile)
                await wait_for(holds(lambda: proxy.rejected >= 2), what="reconnect attempts")
            # (the lock is released here: the orphaned backend may now commit the batch itself)
            proxy.restore()
            # AND once Postgres is back everything is applied
            await wait_for(lambda: _rows_at(pg, 2000, 4), what="the second events")
            await wait_for(lambda: _queue_empty(aws_settings, queues.queue_url), what="an empty queue")
    finally:
        await proxy.close()
    # exactly once each: every delivery has one history row, the row holds the newest event
    assert await history_count(pg) == 8
    assert counter(CONSUMER_EVENTS, "retried") - retried_before >= 1
    rows = await pg.fetch("SELECT issue_id, version, assignee_display_name FROM ap_jira_task ORDER BY 1")
    assert [tuple(r) for r in rows] == [(i, 2000, "Test User") for i in range(1, 5)]
    assert await queue_counts(aws_settings, queues.dlq_url) == (0, 0)


async def test_a_postgres_that_stops_answering_holds_shutdown_for_seconds_not_minutes(
    pg: asyncpg.Connection, settings: ConsumerSettings, db_settings: DatabaseSettings
) -> None:
    # GIVEN a running consumer that reaches Postgres through a proxy, with a 1 s grace period
    assert db_settings.url is not None
    proxy = await postgres_proxy(db_settings.url)
    proxied = replace(
        settings, database=DatabaseSettings(url=through(proxy, db_settings.url)), shutdown_grace_s=1.0
    )
    polls_before = counter(SQS_CALLS, "ReceiveMessage", "ok")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []  # what asyncio would log as ERROR, with a traceback
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(run_consumer(proxied, stop))
            # (a receive comes after the poller's check of its connection)
            await wait_for(
                holds(lambda: counter(SQS_CALLS, "ReceiveMessage", "ok") > polls_before), what="a first poll"
            )
            # WHEN Postgres stops answering (nothing is closed: its packets are dropped) while the
            # poller's next check waits on it, and the consumer is told to stop
            proxy.freeze()
            await wait_for(holds(lambda: proxy.held > 0), what="the poller's next check, held")
            stop.set()
            # THEN it stops within the grace period and POOL_CLOSE_S (asyncpg alone waited for the
            # cancelled check up to the statement timeout, then for its goodbyes, a minute and more),
            # closing its connections from this side
            await asyncio.wait_for(task, timeout=proxied.shutdown_grace_s + POOL_CLOSE_S + 10)
            await asyncio.sleep(0.1)
            gc.collect()  # a task whose error nobody read is reported when it is collected
    finally:
        loop.set_exception_handler(None)
        await proxy.close()
    assert [e["after_s"] for e in logs if e["event"] == "database_connections_terminated"] == [POOL_CLOSE_S]
    # AND no task it leaves behind (asyncpg returning the connections to the pool) fails unseen
    assert [c["message"] for c in unhandled] == []


async def test_an_sqs_that_stops_answering_holds_shutdown_for_seconds_not_minutes(
    pg: asyncpg.Connection, settings: ConsumerSettings
) -> None:
    # GIVEN an SQS endpoint that takes requests and never answers, and a consumer with its queue-depth
    # poller on, every 0.2 s, and a 1 s grace period
    requests: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(writer)
        await reader.read()  # until the client gives up

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    silent = replace(
        settings,
        aws=replace(settings.aws, endpoint_url=f"http://127.0.0.1:{port}"),
        queue_stats_interval_s=0.2,
        shutdown_grace_s=1.0,
    )
    stop = asyncio.Event()
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(run_consumer(silent, stop))
            # WHEN the poller and the gauge poller wait on it, and the consumer is told to stop
            await wait_for(
                holds(lambda: len(requests) >= 2), what="a receive and a queue-depth call, waiting"
            )
            stop.set()
            # THEN it stops within the grace period and GAUGE_STOP_S (the gauge poller's calls ran to
            # botocore's read timeouts and retries: minutes), cancelling the gauge poller by name
            await asyncio.wait_for(task, timeout=silent.shutdown_grace_s + GAUGE_STOP_S + 10)
    finally:
        server.close()
        for writer in requests:
            writer.close()
    cancelled = [e["task"] for e in logs if e["event"] == "gauge_poller_cancelled"]
    assert cancelled == ["queue-depth-poller"]


async def test_an_acknowledgement_sqs_never_answers_holds_shutdown_for_seconds_not_minutes(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a consumer with a 1 s grace period whose SQS takes the delete after a commit and never
    # answers it (botocore would wait 30 s a try, four tries)
    await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, issue_id=7, ts=1000))])
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []  # what asyncio would log as ERROR, with a traceback
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        async with SilentProxy(aws_settings.endpoint_url or "", "DeleteMessageBatch") as proxy:
            held = replace(settings, aws=replace(settings.aws, endpoint_url=proxy.url), shutdown_grace_s=1.0)
            stop = asyncio.Event()
            with capture_logs() as logs:
                task = asyncio.create_task(run_consumer(held, stop))
                await asyncio.wait_for(proxy.arrived.wait(), timeout=30)
                # WHEN the consumer is told to stop while that delete waits
                stop.set()
                # THEN it stops within the grace period and POOL_CLOSE_S, cancelling the delete by name
                stats = await asyncio.wait_for(task, timeout=held.shutdown_grace_s + POOL_CLOSE_S + 10)
            await asyncio.sleep(0.1)
            gc.collect()  # a task whose error nobody read is reported when it is collected
    finally:
        loop.set_exception_handler(None)
    assert [e["task"] for e in logs if e["event"] == "acknowledgement_cancelled"] == ["consumer-acknowledge"]
    # AND the event was applied; its message stays on the queue, to come back as a duplicate
    assert stats.applied == 1
    assert await history_count(pg) == 1
    assert sum(await queue_counts(aws_settings, queues.queue_url)) == 1
    assert [c["message"] for c in unhandled] == []


@pytest.mark.parametrize("retry_in_place_s", [300.0, 0.0])
async def test_a_lock_held_past_the_statement_timeout_is_waited_out_without_spending_receives(
    pg: asyncpg.Connection,
    settings: ConsumerSettings,
    aws_settings: AwsSettings,
    queues: QueuePair,
    retry_in_place_s: float,
) -> None:
    # GIVEN a 0.5 s statement timeout, and maintenance holding the table until the batch's writes
    # timed out twice: Postgres answers SELECT 1 all along, but every write times out
    patient = replace(
        settings, statement_timeout_s=0.5, retry_in_place_s=retry_in_place_s, unavailable_backoff_max_s=30
    )
    events = [envelope_of(make_event(CREATED, issue_id=i, ts=1000)) for i in (1, 2, 3)]
    retried_before = counter(CONSUMER_EVENTS, "retried")
    retry_event = "batch_retrying_in_place" if retry_in_place_s else "batch_retried"
    stop = asyncio.Event()
    with capture_logs() as logs:
        async with pg.transaction():
            await pg.execute("LOCK TABLE ap_jira_task IN EXCLUSIVE MODE")
            await enqueue(aws_settings, queues.queue_url, events)
            task = asyncio.create_task(run_consumer(patient, stop))
            await wait_for(lambda: consumer_waiting_on_lock(pg), what="a batch blocked on the lock")
            await wait_for(
                holds(lambda: sum(e["event"] == retry_event for e in logs) >= 2),
                what=f"two statement timeouts ({retry_event})",
            )
        # WHEN the lock is released
        try:
            await wait_for(lambda: _history_is(pg, 3), what="the batch")
        finally:
            stop.set()
            stats = await asyncio.wait_for(task, timeout=20)
    # THEN every event is applied once; retried in place, the batch was received once and never
    # released, so no receive count grew toward maxReceiveCount
    assert (stats.applied, await history_count(pg)) == (3, 3)
    if retry_in_place_s:
        assert (stats.received, stats.batches, stats.retried) == (3, 1, 0)
        assert counter(CONSUMER_EVENTS, "retried") == retried_before
        assert not any(e["event"] == "batch_retried" for e in logs)
        # AND each wait in place doubles, so a struggling PostgreSQL is not retried every half second
        waits = [e["retry_in_s"] for e in logs if e["event"] == retry_event]
        assert waits[:2] == [0.5, 1.0]
    else:  # the old way, still there when disabled: released, received again, each time counted
        assert stats.retried >= 6 and stats.received >= 9
        assert not any(e["event"] == "batch_retrying_in_place" for e in logs)


async def test_a_lock_on_one_issue_holds_back_that_issue_only(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a row lock held on issue 1 (a session left open in psql), and a batch with an update of
    # issue 1 and one of issue 2: two FIFO groups
    await apply_envelopes(pg, [envelope_of(make_event(CREATED, issue_id=1, ts=1000))])
    patient = replace(settings, statement_timeout_s=0.5, retry_in_place_s=60, visibility_timeout_s=2)
    events = [envelope_of(make_event(ASSIGNED, issue_id=i, ts=2000)) for i in (1, 2)]
    stop = asyncio.Event()
    with capture_logs() as logs:
        async with pg.transaction():
            await pg.execute("SELECT 1 FROM ap_jira_task WHERE issue_id = 1 FOR UPDATE")
            await enqueue(aws_settings, queues.queue_url, events)
            task = asyncio.create_task(run_consumer(patient, stop))
            # WHEN the batch's statement times out on the lock
            # THEN issue 2 is applied and acknowledged while issue 1 is still locked
            await wait_for(lambda: _applied(pg, 2), what="issue 2, which no lock holds")
            await wait_for(
                lambda: _queue_counts_are(aws_settings, queues.queue_url, (0, 1)), what="issue 2 deleted"
            )
            assert await pg.fetchval("SELECT version FROM ap_jira_task WHERE issue_id = 1") == 1000
            # AND only issue 1's message, still held, is kept invisible from then on
            before = len(_extensions(logs))
            await wait_for(
                holds(lambda: len(_extensions(logs)) > before), what="a visibility extension after the delete"
            )
            assert _extensions(logs)[-1] == 1
        # AND issue 1 follows once the lock is gone, from the same receive (retried in place)
        try:
            await wait_for(lambda: _applied(pg, 1), what="issue 1 after the lock")
        finally:
            stop.set()
            stats = await asyncio.wait_for(task, timeout=20)
    assert any(e["event"] == "batch_split_by_group" and e["groups"] == 2 for e in logs)
    assert (stats.received, stats.batches, stats.applied, stats.retried) == (2, 1, 2, 0)
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 0)


async def _applied(pg: asyncpg.Connection, issue_id: int) -> bool:
    version = await pg.fetchval("SELECT version FROM ap_jira_task WHERE issue_id = $1", issue_id)
    return bool(version == 2000)


def _extensions(logs: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The messages of each visibility_extended line so far (a renewal SQS refused any of is
    visibility_extend_failed)."""
    return [e["messages"] for e in logs if e["event"] == "visibility_extended"]


async def test_a_crash_between_commit_and_delete_redelivers_a_message_that_changes_nothing(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN events received and committed by a consumer that died before deleting them
    envelopes = [envelope_of(make_event(CREATED, issue_id=i, ts=1000)) for i in (1, 2)]
    await enqueue(aws_settings, queues.queue_url, envelopes)
    async with aws.sqs_client(aws_settings) as sqs:
        received = await sqs.receive_message(
            QueueUrl=queues.queue_url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            VisibilityTimeout=1,
            WaitTimeSeconds=1,
        )
    assert len(received["Messages"]) == 2
    committed = await apply_envelopes(pg, [Envelope.from_message(m) for m in received["Messages"]])
    assert [r.outcome for r in committed.results] == ["applied", "applied"]
    before = await pg.fetch("SELECT * FROM ap_jira_task ORDER BY issue_id")
    # WHEN a consumer runs after the visibility timeout ran out
    await wait_for(
        lambda: _queue_counts_are(aws_settings, queues.queue_url, (2, 0)), what="the messages to reappear"
    )
    stats = await consume_until_idle(settings, idle_s=1.0, timeout_s=30)
    # THEN the messages came back, changed nothing (not even ingested_at) and are gone now
    assert (stats.received, stats.duplicate, stats.applied) == (2, 2, 0)
    assert await pg.fetch("SELECT * FROM ap_jira_task ORDER BY issue_id") == before
    assert await history_count(pg) == 2
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 0)


@contextlib.asynccontextmanager
async def migrated_then(pg_server_dsn: str, label: str, sql: str, *args: object) -> AsyncIterator[str]:
    """A new database that setup migrated, then ``sql`` changed; yields its URL."""
    async with empty_database(pg_server_dsn, label) as url:
        conn = await asyncpg.connect(url)
        try:
            await migrate.apply(conn)
            await conn.execute(sql, *args)
        finally:
            await conn.close()
        yield url


async def test_an_unexpected_error_crashes_loudly_and_leaves_the_message_on_the_queue(
    settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair, pg_server_dsn: str
) -> None:
    # GIVEN a migrated database whose table someone renamed (a misconfiguration, not a bad message)
    async with migrated_then(
        pg_server_dsn, "renamed", "ALTER TABLE ap_jira_task RENAME TO ap_jira_task_old"
    ) as url:
        await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, ts=1))])
        # WHEN the consumer applies a batch THEN the error propagates: no retry loop, no dead-letter
        with pytest.raises(asyncpg.UndefinedTableError, match="ap_jira_task"):
            await consume_until_idle(replace(settings, database=DatabaseSettings(url=url)), timeout_s=20)
    # AND the message is still on the queue (in flight until its visibility timeout), not in the DLQ
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 1)
    assert await queue_counts(aws_settings, queues.dlq_url) == (0, 0)


async def test_a_dead_letter_queue_sqs_does_not_know_stops_the_consumer_before_it_receives(
    settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN JIRALAKE_DLQ_URL naming a queue that does not exist (a typo, another account's, deleted)
    # and an event on the main queue
    missing = queues.dlq_url.replace(".fifo", "-missing.fifo")
    await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, issue_id=6, ts=1))])
    # WHEN the consumer starts THEN it stops at once with one line saying so, exit 1, rather than run
    # and fail every dead-letter (each only a warning) until SQS's redrive drops the reasons
    broken = replace(settings, queue=replace(settings.queue, dlq_url=missing))
    with pytest.raises(
        CommandError, match=r"JIRALAKE_DLQ_URL names no queue SQS knows \(.*-missing\.fifo\)"
    ) as stopped:
        await asyncio.wait_for(run_consumer(broken, asyncio.Event()), timeout=30)
    assert stopped.value.exit_code == 1
    # AND nothing was received
    assert await queue_counts(aws_settings, queues.queue_url) == (1, 0)


async def test_a_read_only_server_is_waited_for_without_receiving(
    pg: asyncpg.Connection,
    settings: ConsumerSettings,
    aws_settings: AwsSettings,
    queues: QueuePair,
    db_settings: DatabaseSettings,
) -> None:
    # GIVEN a consumer whose sessions are read-only (a standby, or a primary a failover demoted, which
    # a connection still reaches), and an event on the queue
    assert db_settings.url is not None
    read_only = DatabaseSettings(url=f"{db_settings.url}?default_transaction_read_only=on")
    await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, issue_id=5, ts=1))])
    receives_before = counter(SQS_CALLS, "ReceiveMessage", "ok")
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(run_consumer(replace(settings, database=read_only), stop))
        # WHEN it polls
        await wait_for(
            holds(lambda: sum(e["event"] == "dependency_unavailable" for e in logs) >= 2),
            what="two checks that found the server read-only",
        )
        stop.set()
        stats = await asyncio.wait_for(task, timeout=30)
    # THEN it waits (backing off, saying why) and receives nothing: no receive counts toward the
    # DLQ's maxReceiveCount while the server takes no writes, and nothing crashes
    waits = [e for e in logs if e["event"] == "dependency_unavailable"]
    assert {(e["error_class"], e["error"]) for e in waits} == {
        ("ServerReadOnly", "PostgreSQL is read-only (a standby, or a failover in progress); not receiving")
    }
    assert counter(SQS_CALLS, "ReceiveMessage", "ok") == receives_before
    assert stats.received == 0
    assert await queue_counts(aws_settings, queues.queue_url) == (1, 0)
    # AND the same consumer applies it once the server takes writes
    assert (await consume_until_idle(settings, timeout_s=30)).applied == 1


@pytest.mark.parametrize("applied", [0, 1], ids=["never set up", "one migration behind"])
async def test_a_database_setup_has_not_migrated_stops_the_consumer_before_it_receives(
    settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair, pg_server_dsn: str, applied: int
) -> None:
    # GIVEN a database that `jiralake setup` has not (fully) migrated: a consumer deployed before setup
    async with empty_database(pg_server_dsn, "unmigrated") as url:
        if applied:
            conn = await asyncpg.connect(url)
            try:
                await migrate.apply(conn)
                await conn.execute(
                    "DELETE FROM jiralake_schema_migrations WHERE version = $1", migrate.latest_version()
                )
            finally:
                await conn.close()
        await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, ts=1))])
        # WHEN the consumer starts THEN it stops at once, saying to run setup
        with pytest.raises(CommandError, match=r"needs \d{4}: run `jiralake setup --skip-queues` first"):
            await consume_until_idle(replace(settings, database=DatabaseSettings(url=url)), timeout_s=20)
    # AND it never received the message: no receive counted toward the DLQ's maxReceiveCount, however
    # often its supervisor restarts it
    assert await queue_counts(aws_settings, queues.queue_url) == (1, 0)
    assert await queue_counts(aws_settings, queues.dlq_url) == (0, 0)


async def test_a_schema_a_newer_release_migrated_is_accepted_after_a_rollback(
    settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair, pg_server_dsn: str
) -> None:
    # GIVEN a database a newer release's `setup` migrated one step further, then that release was rolled
    # back (docs/operations.md, Upgrading: the schema stays; migrations only add)
    newer = "INSERT INTO jiralake_schema_migrations (version, name) VALUES ($1, 'from_a_newer_release')"
    async with migrated_then(pg_server_dsn, "newer", newer, migrate.latest_version() + 1) as url:
        await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, ts=1))])
        # WHEN this (older) version's consumer runs THEN it applies the event as usual
        stats = await consume_until_idle(replace(settings, database=DatabaseSettings(url=url)), timeout_s=30)
        assert (stats.went_idle, stats.applied) == (True, 1)
    assert await queue_counts(aws_settings, queues.queue_url) == (0, 0)


async def test_stop_finishes_the_batch_in_flight_and_receives_no_more(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    first = [envelope_of(make_event(CREATED, issue_id=i, ts=1000)) for i in (1, 2, 3)]
    later = [envelope_of(make_event(CREATED, issue_id=i, ts=1000)) for i in (4, 5)]
    stop = asyncio.Event()
    async with pg.transaction():
        # GIVEN a batch in flight (held by a lock the test owns)
        await pg.execute("LOCK TABLE ap_jira_task IN EXCLUSIVE MODE")
        await enqueue(aws_settings, queues.queue_url, first)
        task = asyncio.create_task(run_consumer(settings, stop))
        await wait_for(lambda: consumer_waiting_on_lock(pg), what="a batch blocked on the lock")
        # WHEN the consumer is told to stop (as on SIGTERM), then more events arrive
        stop.set()
        await enqueue(aws_settings, queues.queue_url, later)
        assert not task.done()
    # THEN once the lock is released the batch commits, is deleted, and the consumer returns
    stats = await asyncio.wait_for(task, timeout=20)
    assert (stats.received, stats.applied) == (3, 3)
    assert await history_count(pg) == 3
    assert await queue_counts(aws_settings, queues.queue_url) == (2, 0)


async def test_stop_lets_the_long_poll_in_progress_finish_so_no_message_is_left_hidden(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a consumer in 2-second long polls on an empty queue
    polls_before = counter(SQS_CALLS, "ReceiveMessage", "ok")
    stop = asyncio.Event()
    task = asyncio.create_task(run_consumer(replace(settings, wait_time_s=2), stop))
    await wait_for(
        holds(lambda: counter(SQS_CALLS, "ReceiveMessage", "ok") > polls_before), what="a first poll"
    )
    # WHEN it is stopped and an event arrives right after
    stop.set()
    await enqueue(aws_settings, queues.queue_url, [envelope_of(make_event(CREATED, ts=1))])
    stats = await asyncio.wait_for(task, timeout=10)
    # THEN the event was either taken by the poll in progress and applied, or left visible: never
    # hidden in flight by an abandoned poll
    visible, in_flight = await queue_counts(aws_settings, queues.queue_url)
    assert in_flight == 0
    assert (stats.received, stats.applied, await history_count(pg), visible) in {(1, 1, 1, 0), (0, 0, 0, 1)}


async def test_a_long_batch_keeps_its_messages_invisible(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a 2-second visibility timeout and two pollers that could each take the batch
    short = replace(settings, pollers=2, visibility_timeout_s=2)
    extended_before = counter(SQS_CALLS, "ChangeMessageVisibilityBatch", "ok")
    stop = asyncio.Event()
    async with pg.transaction():
        await pg.execute("LOCK TABLE ap_jira_task IN EXCLUSIVE MODE")
        await enqueue(
            aws_settings,
            queues.queue_url,
            [envelope_of(make_event(CREATED, issue_id=i, ts=1)) for i in (1, 2)],
        )
        task = asyncio.create_task(run_consumer(short, stop))
        await wait_for(lambda: consumer_waiting_on_lock(pg), what="a batch blocked on the lock")
        # WHEN the batch runs for longer than the visibility timeout (two renewals)
        await wait_for(
            holds(lambda: counter(SQS_CALLS, "ChangeMessageVisibilityBatch", "ok") - extended_before >= 2),
            what="two visibility renewals",
        )
    try:
        await wait_for(lambda: _history_is(pg, 2), what="the batch")
    finally:
        stop.set()
        stats = await asyncio.wait_for(task, timeout=20)
    # THEN no other poller received the messages meanwhile
    assert (stats.received, stats.applied, stats.duplicate) == (2, 2, 0)


async def test_the_circuit_breaker_stops_receiving_when_most_events_are_dead_lettered(
    pg: asyncpg.Connection, settings: ConsumerSettings, aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a bad deploy's view of the world: every message is garbage
    for i in range(14):
        await enqueue_raw(aws_settings, queues.queue_url, f"garbage {i}", group_id=f"g{i}", dedup_id=f"d{i}")
    breaker = replace(
        settings,
        breaker_window_events=4,
        breaker_min_events=4,
        breaker_max_dead_letter_ratio=0.5,
        breaker_cooldown_s=60,
    )
    # WHEN the consumer runs (the gauge is process-wide and may still say 1 from an earlier test: the
    # log line says this consumer's breaker opened)
    with capture_logs() as logs:
        async with running(breaker):
            opened = holds(lambda: any(e["event"] == "circuit_opened" for e in logs))
            await wait_for(opened, what="the breaker to open")
            assert CONSUMER_CIRCUIT_OPEN._value.get() == 1
            dead_now = (await queue_counts(aws_settings, queues.dlq_url))[0]
            await asyncio.sleep(1.5)  # a receive would take at most wait_time_s (1 s)
            # THEN it stops receiving: the rest stays on the queue instead of moving to the DLQ
            assert (await queue_counts(aws_settings, queues.dlq_url))[0] == dead_now < 14
            assert (await queue_counts(aws_settings, queues.queue_url))[0] == 14 - dead_now
    assert CONSUMER_CIRCUIT_OPEN._value.get() == 1


async def _history_is(pg: asyncpg.Connection, n: int) -> bool:
    return await history_count(pg) == n


async def _rows_at(pg: asyncpg.Connection, version: int, n: int) -> bool:
    count: int = await pg.fetchval("SELECT count(*) FROM ap_jira_task WHERE version = $1", version)
    return count == n


async def _queue_counts_are(aws_settings: AwsSettings, url: str, counts: tuple[int, int]) -> bool:
    return await queue_counts(aws_settings, url) == counts


async def _queue_empty(aws_settings: AwsSettings, url: str) -> bool:
    return await queue_counts(aws_settings, url) == (0, 0)


async def test_a_gauge_poller_that_crashes_stops_the_consumer_and_one_that_returns_does_not() -> None:
    # GIVEN two pollers: one failing with a bug (the SQS and PostgreSQL failures they handle themselves),
    # one returning as on a stop request
    stop = asyncio.Event()

    async def crashing() -> None:
        raise RuntimeError("bug in the poller")

    async def returning() -> None:
        return None

    with capture_logs() as logs:
        fine = asyncio.create_task(returning(), name="export-freshness-poller")
        fine.add_done_callback(stop_when_crashed(stop))
        await fine  # done-callbacks run in the order added: the check ran before this await returned
        assert not stop.is_set()
        # WHEN the other ends with its exception
        crashed = asyncio.create_task(crashing(), name="queue-depth-poller")
        crashed.add_done_callback(stop_when_crashed(stop))
        with pytest.raises(RuntimeError, match="bug in the poller"):
            await crashed
        await asyncio.wait_for(stop.wait(), timeout=5)
    # THEN the consumer is told to stop (run_consumer then re-raises it), and the crash is logged by name
    crashes = [e for e in logs if e["event"] == "background_task_crashed"]
    assert [(e["task"], e["log_level"]) for e in crashes] == [("queue-depth-poller", "error")]
