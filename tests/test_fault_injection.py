"""End to end under faults: receiver -> SQS FIFO -> consumer -> PostgreSQL loses nothing.

A stream of webhook deliveries built from the real fixtures (tests/fault_stream.py) is posted,
signed, by a Jira-like load generator that retries until it gets a 2xx (tests/webhook_load.py) to
``jiralake receiver``, while ``jiralake consumer`` applies the queue to a private PostgreSQL server.
Meanwhile the test:

- SIGKILLs the consumer at random points and starts it again;
- restarts PostgreSQL (``pg_ctl stop -m fast`` and ``-m immediate``, i.e. a crash);
- stops the receiver with SIGTERM mid-burst and starts it again;
- makes a share of every SQS call of both services fail, before or after SQS did the work
  (tests/fault_proxy.py);
- puts a few messages on the queue that are not valid jiralake envelopes.

After recovery the table must equal an independent model of the ordering rule, the history must hold
every distinct delivery exactly once, and the DLQ exactly the deliberately bad events. The figures of
the run are printed in the terminal summary (tests/fault_report.py).

``JIRALAKE_SOAK=1`` (``make soak``) runs the same test with more issues, events and faults.
docs/reliability.md describes the suite and the figures of one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer import apply
from consumer.outcomes import Outcome, classify
from ops.dlq import replay_dead_letters
from ops.local_aws import LocalAws, free_port
from shared import aws, db, migrate
from shared.envelope import ATTR_DELIVERY_ID, ATTR_ERROR_CLASS, Envelope, read_attribute
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings, QueueSettings
from shared.sqs_batch import send_entries
from tests import fault_report, jira_fixtures
from tests.conftest import drain
from tests.fault_proxy import FAULT_KINDS, SqsFaultProxy
from tests.fault_stream import (
    ExpectedRow,
    Stream,
    build_stream,
    expected_history,
    expected_rows,
)
from tests.private_postgres import PrivatePostgres, binaries_missing
from tests.service_process import ServiceProcess
from tests.test_consumer_helpers import queue_counts
from tests.webhook_load import LoadStats, deliver

SECRET = "fault-injection-secret"
SOAK = os.environ.get("JIRALAKE_SOAK", "") not in ("", "0")
# Keep the child processes' logs even when the test passes (they are always kept when it fails).
KEEP_LOGS = os.environ.get("JIRALAKE_FAULTS_KEEP_LOGS", "") not in ("", "0")


@dataclass(frozen=True)
class Profile:
    issues: int
    events_per_issue: int
    bad_webhooks: int  # signed bodies PostgreSQL refuses, through the receiver
    bad_injected: int  # not valid envelopes, put on the queue directly
    consumer_kills: int
    postgres_restarts: int
    receiver_restarts: int
    sqs_outages: int  # a few seconds in which every SQS call fails, longer than botocore's retries
    sqs_failure_ratio: float
    concurrency: int
    load_timeout_s: float
    drain_timeout_s: float
    test_timeout_s: float
    seed: int


DEFAULT = Profile(
    issues=200,
    events_per_issue=5,
    bad_webhooks=5,
    bad_injected=3,
    consumer_kills=4,
    postgres_restarts=2,
    receiver_restarts=2,
    sqs_outages=2,
    sqs_failure_ratio=0.08,
    concurrency=16,
    load_timeout_s=400,
    drain_timeout_s=150,
    test_timeout_s=600,
    seed=20260101,
)
SOAK_PROFILE = Profile(
    issues=600,
    events_per_issue=6,
    bad_webhooks=15,
    bad_injected=6,
    consumer_kills=10,
    postgres_restarts=4,
    receiver_restarts=4,
    sqs_outages=4,
    sqs_failure_ratio=0.1,
    concurrency=16,
    load_timeout_s=2400,
    drain_timeout_s=900,
    test_timeout_s=3600,
    seed=int(os.environ.get("JIRALAKE_SOAK_SEED", "20260102")),
)
PROFILE = SOAK_PROFILE if SOAK else DEFAULT


@dataclass
class Faults:
    counts: Counter[str] = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, kind: str, detail: str = "") -> None:
        self.counts[kind] += 1
        self.log.append(f"{time.monotonic() - self.started:6.1f}s {kind} {detail}".rstrip())


@dataclass
class Mismatches:
    lost: list[int] = field(default_factory=list)
    regressed: list[int] = field(default_factory=list)
    resurrected: list[int] = field(default_factory=list)
    other: list[int] = field(default_factory=list)
    unexpected_rows: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(v) for v in vars(self).values())


@pytest.mark.slow
@pytest.mark.timeout(PROFILE.test_timeout_s)
async def test_nothing_is_lost_regressed_or_resurrected_under_faults(
    moto_server: LocalAws,
    aws_settings: AwsSettings,
    queues: QueuePair,
    request: pytest.FixtureRequest,
) -> None:
    missing = binaries_missing()
    if missing is not None:
        pytest.skip(f"needs a private PostgreSQL server to restart: {missing}")
    profile = PROFILE
    rng = random.Random(profile.seed)
    # GIVEN a stream of deliveries and its expected outcome
    stream = build_stream(
        issues=profile.issues,
        events_per_issue=profile.events_per_issue,
        bad=profile.bad_webhooks,
        seed=profile.seed,
    )
    expected = expected_rows(stream)
    history = expected_history(stream)
    injected_ids = [f"flt-injected-{n}" for n in range(profile.bad_injected)]
    # AND a private PostgreSQL, a fault proxy in front of moto, and the two services as processes
    # Not under tmp_path: pytest makes /tmp/pytest-of-<user> private again whenever a session starts,
    # which would lock the server's own user out of its data directory mid-run.
    # The logs stay there when the test fails.
    scratch = Path(tempfile.mkdtemp(prefix="jiralake-faults-"))
    outcome = {"passed": False}
    pg = PrivatePostgres(scratch)

    def clean_up() -> None:
        pg.close_now()
        keep = not outcome["passed"] or KEEP_LOGS
        shutil.rmtree(scratch / "pgdata" if keep else scratch, ignore_errors=True)

    request.addfinalizer(clean_up)
    await pg.init()
    await pg.start()
    database_url = pg.url("jiralake")
    admin = await asyncpg.connect(pg.url())
    await admin.execute('CREATE DATABASE "jiralake"')
    await admin.close()
    conn = await asyncpg.connect(database_url)
    await migrate.apply(conn)
    await conn.close()
    logs = scratch / "logs"
    logs.mkdir()
    faults = Faults()
    load = LoadStats()
    async with SqsFaultProxy(moto_server.endpoint_url, seed=profile.seed) as proxy:
        port = free_port()
        base_env = dict(os.environ, AWS_ENDPOINT_URL=proxy.url, JIRALAKE_QUEUE_URL=queues.queue_url)
        base_env["JIRALAKE_DLQ_URL"] = queues.dlq_url
        receiver = ServiceProcess(
            "receiver",
            ["receiver", "--host", "127.0.0.1", "--port", str(port)],
            base_env
            | {
                "JIRALAKE_WEBHOOK_SECRET": SECRET,
                "JIRALAKE_RECEIVER_ADMIN_PORT": str(free_port()),
                "JIRALAKE_RECEIVER_SQS_TIMEOUT_S": "10",
                "JIRALAKE_RECEIVER_SHUTDOWN_GRACE_S": "15",
            },
            logs,
        )
        consumer = ServiceProcess(
            "consumer",
            ["consumer", "--pollers", "2", "--admin-port", "0"],
            base_env
            | {
                "DATABASE_URL": database_url,
                # Short polls: moto's long poll busy-waits (its wait_for returns at once while any
                # message is visible, even one whose FIFO group is in flight), burning the CPU that
                # moto needs to serve the other calls. The consumer pauses 0.2 s after an empty poll.
                "JIRALAKE_CONSUMER_WAIT_S": "0",
                "JIRALAKE_VISIBILITY_TIMEOUT_S": "10",
                "JIRALAKE_CONSUMER_RETRY_BASE_S": "1",
                "JIRALAKE_CONSUMER_RETRY_MAX_S": "4",
                "JIRALAKE_CONSUMER_UNAVAILABLE_BACKOFF_S": "2",
                "JIRALAKE_CONSUMER_SHUTDOWN_GRACE_S": "15",
                "JIRALAKE_CONSUMER_QUEUE_STATS_S": "0",
            },
            logs,
        )
        supervisor = Supervisor([receiver, consumer], faults)
        started = time.monotonic()
        try:
            await receiver.start()
            await receiver.wait_until_logged("receiver_started")
            await consumer.start()
            supervision = asyncio.create_task(supervisor.run(), name="supervisor")
            # WHEN the stream is delivered while faults are injected
            proxy.failure_ratio = profile.sqs_failure_ratio
            url = f"http://127.0.0.1:{port}/webhooks/jira"
            gate = asyncio.Event()
            gate.set()
            holding = asyncio.create_task(_hold_while_deep(aws_settings, queues, gate), name="depth-gate")
            sending = asyncio.create_task(
                deliver(
                    url,
                    SECRET,
                    stream.send_order,
                    concurrency=profile.concurrency,
                    stats=load,
                    seed=profile.seed,
                    gate=gate,
                ),
                name="load-generator",
            )
            actions = _fault_plan(profile, rng, supervisor, pg, proxy, aws_settings, queues, injected_ids)
            try:
                async with asyncio.timeout(profile.load_timeout_s):
                    await _run_plan(actions, load, sending, rng, faults)
                    await sending
            except TimeoutError:
                raise AssertionError(
                    f"load not delivered in {profile.load_timeout_s:.0f} s: {load.done} of {load.sent} "
                    f"answered; faults so far: {faults.log}"
                ) from None
            load_s = time.monotonic() - started
            holding.cancel()
            # ... and one more SIGKILL while the consumer drains the rest, then the faults stop
            await supervisor.restart(consumer, kill=True, pause_s=rng.uniform(0, 1))
            faults.note("consumer SIGKILL", "while draining")
            proxy.failure_ratio = 0.0
            # THEN after recovery the queue drains
            await _until_drained(
                aws_settings, queues, database_url, len(history), profile.drain_timeout_s, faults
            )
            drain_s = time.monotonic() - started - load_s
            supervisor.stop()
            await supervision
            consumer_exit = await consumer.terminate()
            receiver_exit = await receiver.terminate()
        finally:
            supervisor.stop()
            for task in asyncio.all_tasks():
                if task.get_name() in ("supervisor", "load-generator", "depth-gate") and not task.done():
                    task.cancel()
            await consumer.close()
            await receiver.close()
        sqs_counts = proxy.counts
    # AND the table, the history and the DLQ hold exactly what the model says
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT issue_id, version, summary, deleted_version, is_deleted, last_event_type "
            "FROM ap_jira_task"
        )
        recorded = await conn.fetch("SELECT delivery_id, issue_id, event_version FROM ap_jira_task_event")
    finally:
        await conn.close()
        await pg.close()
    actual = {
        r["issue_id"]: ExpectedRow(
            r["version"], r["summary"], r["deleted_version"], r["is_deleted"], r["last_event_type"]
        )
        for r in rows
    }
    mismatches = _compare(expected, actual)
    recorded_history = {r["delivery_id"]: (r["issue_id"], r["event_version"]) for r in recorded}
    dead = await drain(aws_settings, queues.dlq_url)
    dead_ids = Counter(read_attribute(m, ATTR_DELIVERY_ID) for m in dead)
    # Dead-lettered by the consumer (with the reason), or moved by SQS itself after maxReceiveCount
    # receives without an acknowledgement (no error attributes).
    rejected_ids = {read_attribute(m, ATTR_DELIVERY_ID) for m in dead if read_attribute(m, ATTR_ERROR_CLASS)}
    redriven = [read_attribute(m, ATTR_DELIVERY_ID) for m in dead if not read_attribute(m, ATTR_ERROR_CLASS)]
    bad_ids = {d.delivery_id for d in stream.of_role("bad")} | set(injected_ids)
    leftover = await drain(aws_settings, queues.queue_url)
    outcomes = _consumer_outcomes(consumer)
    fault_report.record(
        request.config,
        f"fault injection ({'soak' if SOAK else 'default'} run, seed {profile.seed})",
        _summary(stream, load, faults, sqs_counts, expected, recorded_history, dead_ids, mismatches, outcomes)
        + [
            f"DLQ: {len(dead) - len(redriven)} dead-lettered by the consumer, {len(redriven)} moved by SQS "
            f"after maxReceiveCount ({sum(i in bad_ids for i in redriven)} of them bad, the rest applied "
            "copies)"
        ]
        + [
            f"took: load {load_s:.0f} s, drain {drain_s:.0f} s, total {time.monotonic() - started:.0f} s",
            f"logs: {logs} (kept when the test fails)",
            "fault timeline: " + "; ".join(faults.log),
        ],
    )
    assert mismatches.total == 0, (mismatches, faults.log)
    assert actual == expected
    assert recorded_history == history
    assert rejected_ids <= bad_ids, (rejected_ids - bad_ids, faults.log)  # only bad events rejected
    assert bad_ids <= set(dead_ids), (bad_ids - set(dead_ids), faults.log)  # every bad event there
    # A copy SQS moved after maxReceiveCount is a bad event, or a delivery the history holds: applied.
    assert set(redriven) <= bad_ids | set(history), (set(redriven) - bad_ids - set(history), faults.log)
    assert leftover == []
    assert load.refused == []
    assert (consumer_exit.code, receiver_exit.code) == (0, 0), (consumer.tail(), receiver.tail())
    assert [e.cause for e in receiver.exits] == ["sigterm"] * len(receiver.exits)
    assert consumer.unexpected_exits() == [], [consumer.tail()]
    outcome["passed"] = True


async def test_a_session_postgres_ends_while_a_poller_holds_it_is_retried(
    db_settings: DatabaseSettings, pg: asyncpg.Connection
) -> None:
    """Found by the run above: a restart of PostgreSQL while a poller held its pooled connection (waiting
    on SQS) crashed the consumer, because asyncpg's detached proxy raises "released back to the pool"."""
    # GIVEN a pooled connection held by a poller
    pool = await db.create_pool(db_settings, min_size=0, max_size=1)
    try:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            # WHEN the server ends that session (as a restart or pg_terminate_backend does)
            await pg.execute("SELECT pg_terminate_backend($1)", pid)
            for _ in range(200):  # until the client noticed (at most 10 s)
                if _session_gone(conn):
                    break
                await asyncio.sleep(0.05)
            body = jira_fixtures.raw("pinpoint-jira__jira_issue_created.json").decode()
            ts_ms = json.loads(body)["timestamp"]
            envelope = Envelope(body, "jira:issue_created", "20942", ts_ms, ts_ms, "released-1")
            with pytest.raises(asyncpg.InterfaceError) as caught:
                await apply.apply_envelopes(conn, [envelope])
        # THEN the error means "retry later", not a crash
        assert "released back to the pool" in str(caught.value)
        assert classify(caught.value) is Outcome.RETRY
    finally:
        await pool.close()


def test_a_query_racing_the_servers_goodbye_is_retried() -> None:
    """Also found by the run above (a consumer crash during `pg_ctl stop -m fast`): a query started on an
    idle connection after the server's FATAL message arrived and before the socket closed."""
    raced = asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    assert classify(raced) is Outcome.RETRY
    assert classify(asyncpg.InternalClientError("unknown error in protocol implementation")) is Outcome.CRASH


def _session_gone(conn: asyncpg.Connection) -> bool:
    try:
        conn.is_closed()
    except asyncpg.InterfaceError:
        return True
    return False


class Supervisor:
    """Restarts a service that exited on its own (as ECS or systemd would) and lets the test kill and
    restart services without racing it."""

    def __init__(self, services: list[ServiceProcess], faults: Faults) -> None:
        self.services = services
        self.faults = faults
        self._locks = {s.name: asyncio.Lock() for s in services}
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        while not self._stopped.is_set():
            for service in self.services:
                async with self._locks[service.name]:
                    if not service.running and not self._stopped.is_set():
                        self.faults.note(f"{service.name} exited on its own", service.tail(3))
                        await service.start()
            await asyncio.sleep(0.5)

    async def restart(self, service: ServiceProcess, *, kill: bool, pause_s: float) -> None:
        async with self._locks[service.name]:
            if kill:
                await service.kill()
            else:
                ended = await service.terminate()
                assert ended.code == 0, service.tail()
            await asyncio.sleep(pause_s)
            await service.start()
            if service.name == "receiver":
                await service.wait_until_logged("receiver_started")


Action = tuple[float, str, Callable[[], Awaitable[str]]]


def _fault_plan(
    profile: Profile,
    rng: random.Random,
    supervisor: Supervisor,
    pg: PrivatePostgres,
    proxy: SqsFaultProxy,
    aws_settings: AwsSettings,
    queues: QueuePair,
    injected_ids: list[str],
) -> list[Action]:
    """(share of deliveries answered, fault kind, action) triples, spread over the load."""
    consumer, receiver = supervisor.services[1], supervisor.services[0]

    async def kill_consumer() -> str:
        await consumer.wait_until_logged("consumer_starting")  # at work, not still importing
        await asyncio.sleep(rng.uniform(0, 1.5))
        await supervisor.restart(consumer, kill=True, pause_s=rng.uniform(0, 1.5))
        return ""

    async def restart_receiver() -> str:
        await supervisor.restart(receiver, kill=False, pause_s=rng.uniform(0.5, 2))
        return ""

    restarts = iter(range(profile.postgres_restarts))

    async def restart_postgres() -> str:
        mode = "immediate" if next(restarts) % 2 else "fast"
        down_s = rng.uniform(2, 5)
        await pg.stop(mode)
        await asyncio.sleep(down_s)
        await pg.start()
        return f"-m {mode}, down {down_s:.1f} s"

    async def sqs_outage() -> str:
        down_s = rng.uniform(4, 8)
        proxy.failure_ratio = 1.0
        await asyncio.sleep(down_s)
        proxy.failure_ratio = profile.sqs_failure_ratio
        return f"{down_s:.1f} s"

    async def inject() -> str:
        await _inject_invalid(aws_settings, queues, injected_ids)
        return f"{len(injected_ids)} messages"

    def spread(n: int, kind: str, action: Callable[[], Awaitable[str]]) -> list[Action]:
        return [((i + rng.uniform(0.2, 0.8)) / n * 0.95, kind, action) for i in range(n)]

    plan = spread(profile.consumer_kills, "consumer SIGKILL", kill_consumer)
    plan += spread(profile.postgres_restarts, "postgres restart", restart_postgres)
    plan += spread(profile.receiver_restarts, "receiver SIGTERM", restart_receiver)
    plan += spread(profile.sqs_outages, "SQS outage", sqs_outage)
    plan += [(rng.uniform(0.3, 0.6), "invalid messages injected", inject)]
    return sorted(plan, key=lambda a: a[0])


async def _run_plan(
    plan: list[Action], load: LoadStats, sending: asyncio.Task[None], rng: random.Random, faults: Faults
) -> None:
    """Each action once its share of deliveries has been answered (faults by progress, not by clock, so
    they land during the load however fast the machine is), one at a time, a random moment later."""
    for share, kind, action in plan:
        while load.done < share * load.sent and not sending.done():
            load.progressed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(load.progressed.wait(), timeout=1)
        await asyncio.sleep(rng.uniform(0, 0.5))
        detail = await action()
        faults.note(kind, detail)


async def _inject_invalid(aws_settings: AwsSettings, queues: QueuePair, ids: list[str]) -> None:
    """Straight onto the queue: messages no consumer can ever apply (each on an issue of its own)."""
    body = jira_fixtures.raw("pinpoint-jira__jira_issue_created.json").decode()
    entries = []
    for n, delivery_id in enumerate(ids):
        group = str(7_950_000 + n)
        envelope = Envelope(
            body, "jira:issue_created", group, 1_700_000_000_000, 1_700_000_000_000, delivery_id
        )
        entry = envelope.send_entry(str(n))
        kind = n % 3
        if kind == 0:  # not an envelope: only the delivery id attribute
            entry["MessageAttributes"] = {ATTR_DELIVERY_ID: entry["MessageAttributes"][ATTR_DELIVERY_ID]}
        elif kind == 1:  # not JSON
            entry["MessageBody"] = '{"webhookEvent": "jira:issue_created", "issue": {'
        # kind 2: the body concerns another issue than the attributes say
        entries.append(entry)
    async with aws.sqs_client(aws_settings) as sqs:
        results = await send_entries(sqs, queues.queue_url, entries)
    assert all(r.ok for r in results), results


# moto's FIFO ReceiveMessage scans the whole queue in Python: at a depth of about 1,500 messages one
# call took 5 s, and the consumer could not catch up again. The load generator starts no new delivery
# while the queue is deeper than this (in the default run it hardly ever is).
MAX_QUEUE_DEPTH = 400


async def _hold_while_deep(aws_settings: AwsSettings, queues: QueuePair, gate: asyncio.Event) -> None:
    while True:
        try:
            visible, _ = await queue_counts(aws_settings, queues.queue_url)
        except Exception:  # moto busy or the call failed: never block the load because of the gate
            visible = 0
        if visible > MAX_QUEUE_DEPTH:
            gate.clear()
        else:
            gate.set()
        await asyncio.sleep(1)


async def _until_drained(
    aws_settings: AwsSettings,
    queues: QueuePair,
    database_url: str,
    history_rows: int,
    timeout_s: float,
    faults: Faults,
) -> None:
    """Until the queue holds nothing (visible or in flight) and every delivery is in the history.

    Under this many faults a message can reach maxReceiveCount before it is applied, and SQS moves it
    to the DLQ by itself; on-call's answer is `jiralake dlq replay`, so when the queue stays empty
    while deliveries are missing and the DLQ holds messages, the DLQ is replayed (the bad events come
    back to it, dead-lettered by the consumer with their reason).
    """
    deadline = time.monotonic() + timeout_s
    stalled = 0
    while True:
        queued = sum(await queue_counts(aws_settings, queues.queue_url))
        try:
            conn = await asyncpg.connect(database_url, timeout=5)
            try:
                recorded = await conn.fetchval("SELECT count(*) FROM ap_jira_task_event")
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            recorded = -1
        if queued == 0 and recorded >= history_rows:
            return
        stalled = stalled + 1 if queued == 0 and recorded >= 0 else 0
        if stalled >= 3 and sum(await queue_counts(aws_settings, queues.dlq_url)) > 0:
            async with aws.sqs_client(aws_settings) as sqs:
                replay = await replay_dead_letters(
                    sqs, QueueSettings(queue_url=queues.queue_url, dlq_url=queues.dlq_url)
                )
            faults.note("dlq replay (recovery)", f"{replay.replayed} replayed, {replay.skipped} skipped")
            stalled = 0
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not drained after {timeout_s:.0f} s: {queued} messages queued, "
                f"{recorded} of {history_rows} deliveries in the history"
            )
        await asyncio.sleep(1)


def _compare(expected: dict[int, ExpectedRow], actual: dict[int, ExpectedRow]) -> Mismatches:
    found = Mismatches()
    for issue_id, want in expected.items():
        got = actual.get(issue_id)
        if got is None:
            found.lost.append(issue_id)
        elif want.is_deleted and not got.is_deleted:
            found.resurrected.append(issue_id)
        elif (got.version or 0) < (want.version or 0) or (got.deleted_version or 0) < (
            want.deleted_version or 0
        ):
            found.regressed.append(issue_id)
        elif got != want:
            found.other.append(issue_id)
    found.unexpected_rows = sorted(set(actual) - set(expected))
    return found


# What the consumer logs when a dependency failed it (docs/consumer.md), counted in the summary.
_CONSUMER_EVENTS = (
    "message_dead_lettered",
    "batch_retried",
    "dependency_unavailable",
    "delete_failed",
    "dead_letter_failed",
    "retry_backoff_failed",
    "visibility_extend_failed",
)


def _consumer_outcomes(consumer: ServiceProcess) -> Counter[str]:
    """What the consumer processes logged per message (``message_handled`` outcomes, dead-letters)."""
    counts: Counter[str] = Counter()
    for n in range(1, consumer.starts + 1):
        for line in (consumer.log_dir / f"consumer-{n}.log").read_text(errors="replace").splitlines():
            try:
                event: dict[str, Any] = json.loads(line)
            except ValueError:
                continue  # a line cut short by SIGKILL
            if event.get("event") == "message_handled":
                counts[str(event.get("outcome"))] += 1
            elif event.get("event") in _CONSUMER_EVENTS:
                counts[str(event["event"])] += 1
    return counts


def _summary(
    stream: Stream,
    load: LoadStats,
    faults: Faults,
    sqs: Any,
    expected: dict[int, ExpectedRow],
    history: dict[str, tuple[int, int]],
    dead_ids: Counter[str | None],
    mismatches: Mismatches,
    outcomes: Counter[str],
) -> list[str]:
    roles = Counter(d.role for d in stream.deliveries)
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(load.answers.items()))
    sqs_faults = ", ".join(f"{k} {sqs.faults[k]}" for k in FAULT_KINDS)
    by_op = ", ".join(f"{k} {v}" for k, v in sorted(sqs.faults_by_operation.items()))
    deleted = sum(r.is_deleted for r in expected.values())
    return [
        f"events: {len(stream.deliveries)} distinct webhooks over {len(expected)} issues "
        f"({roles['row']} touch the row, {roles['history']} history only, {roles['ignored']} ignored, "
        f"{roles['bad']} bad), {load.sent} sent with {load.sent - len(stream.deliveries)} redeliveries",
        f"http: {load.requests} requests, {load.retries} retries by the load generator; answers {answers}",
        f"faults: {', '.join(f'{k} {v}' for k, v in sorted(faults.counts.items()))}",
        f"sqs faults: {sqs.total_faults} of {sum(sqs.requests.values())} SQS calls ({sqs_faults}); "
        f"by call: {by_op}",
        f"consumer: {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}",
        f"checked: {len(expected)} rows ({deleted} deleted), {len(history)} history rows, "
        f"{sum(dead_ids.values())} DLQ messages for {len(dead_ids)} bad events"
        + "".join(f", {n} copies of {i}" for i, n in sorted(dead_ids.items(), key=str) if n > 1),
        f"mismatches: {mismatches.total} (lost {len(mismatches.lost)}, "
        f"regressed {len(mismatches.regressed)}, "
        f"resurrected {len(mismatches.resurrected)}, other {len(mismatches.other)}, "
        f"unexpected rows {len(mismatches.unexpected_rows)})",
    ]
