"""``jiralake queue stats`` and the queue-depth poller against moto's server: the numbers match what
was enqueued, thresholds set exit code 3 (which nothing else uses: bad arguments and configuration
exit 2, unreadable queues 1), and the gauges carry the same numbers."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from prometheus_client import REGISTRY

from jiralake import cli
from ops.local_aws import free_port
from ops.queue_stats import Thresholds, exceeded, read_stats, render_lines, render_table, watch
from shared import aws
from shared.errors import CommandError
from shared.metrics import QUEUE_MESSAGES
from shared.provision import QueuePair
from shared.queue_depth import (
    DEAD_LETTER_QUEUE,
    MAIN_QUEUE,
    RELEASE_CALL_TIMEOUT_S,
    OldestAgeTracker,
    QueueDepth,
    make_visible,
    poll_queue_depths,
    queue_urls,
)
from shared.settings import AwsSettings, QueueSettings
from tests.fault_proxy import SilentProxy


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``cli.main`` configures structlog for the captured stderr; put the suite's setup back after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


async def send(sqs: Any, url: str, n: int, *, group: str = "10001") -> None:
    for i in range(n):
        await sqs.send_message(
            QueueUrl=url,
            MessageBody=f"m{i}",
            MessageGroupId=f"{group}-{i}",
            MessageDeduplicationId=f"{group}-{i}",
        )


async def enqueue(
    aws_settings: AwsSettings, queues: QueuePair, *, main: int, dlq: int, receive: int = 0
) -> None:
    """``main`` messages on the main queue (``receive`` of them then in flight), ``dlq`` on the DLQ."""
    async with aws.sqs_client(aws_settings) as sqs:
        await send(sqs, queues.queue_url, main)
        await send(sqs, queues.dlq_url, dlq, group="10002")
        if receive:
            resp = await sqs.receive_message(
                QueueUrl=queues.queue_url,
                MaxNumberOfMessages=receive,
                VisibilityTimeout=60,
                WaitTimeSeconds=0,
            )
            assert len(resp["Messages"]) == receive


def settings(queues: QueuePair) -> QueueSettings:
    return QueueSettings(queue_url=queues.queue_url, dlq_url=queues.dlq_url)


def numbers(depths: list[QueueDepth]) -> dict[str, tuple[int, int, int]]:
    return {d.queue: (d.visible, d.in_flight, d.delayed) for d in depths}


async def test_stats_match_what_was_enqueued(aws_settings: AwsSettings, queues: QueuePair) -> None:
    # GIVEN 3 messages on the main queue, 1 of them received (in flight), 2 on the DLQ
    before_s = time.time()
    await enqueue(aws_settings, queues, main=3, dlq=2, receive=1)

    # WHEN stats are read twice
    first = await read_stats(aws_settings, settings(queues))
    second = await read_stats(aws_settings, settings(queues))

    # THEN the counts match, the main queue's age is unknown, the DLQ's comes from its oldest message,
    # and peeking left the DLQ messages visible
    assert numbers(first) == {MAIN_QUEUE: (2, 1, 0), DEAD_LETTER_QUEUE: (2, 0, 0)}
    assert numbers(second) == numbers(first)
    main, dead = first
    assert main.oldest_age_s is None
    assert dead.oldest_age_s is not None
    assert 0 <= dead.oldest_age_s <= time.time() - before_s + 1


async def test_delayed_messages_are_counted(aws_settings: AwsSettings, queues: QueuePair) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        await sqs.set_queue_attributes(QueueUrl=queues.queue_url, Attributes={"DelaySeconds": "60"})
        await send(sqs, queues.queue_url, 2)
    depths = await read_stats(aws_settings, settings(queues))
    assert numbers(depths) == {MAIN_QUEUE: (0, 0, 2), DEAD_LETTER_QUEUE: (0, 0, 0)}


async def test_empty_queues_have_age_zero(aws_settings: AwsSettings, queues: QueuePair) -> None:
    depths = await read_stats(aws_settings, settings(queues))
    assert [(d.queue, d.total, d.oldest_age_s) for d in depths] == [
        (MAIN_QUEUE, 0, 0.0),
        (DEAD_LETTER_QUEUE, 0, 0.0),
    ]


def test_thresholds_name_what_was_exceeded() -> None:
    depths = [
        QueueDepth(MAIN_QUEUE, "u1", visible=12, in_flight=3, delayed=0, oldest_age_s=None),
        QueueDepth(DEAD_LETTER_QUEUE, "u2", visible=1, in_flight=1, delayed=0, oldest_age_s=5.0),
    ]
    assert exceeded(depths, Thresholds()) == []
    assert exceeded(depths, Thresholds(max_visible=12, max_dlq=2)) == []
    assert exceeded(depths, Thresholds(max_visible=10, max_dlq=0)) == [
        "main queue has 12 visible messages (max 10)",
        "dead-letter queue holds 2 messages (max 0)",
    ]


def test_table_and_lines() -> None:
    depths = [
        QueueDepth(MAIN_QUEUE, "http://q/main.fifo", visible=12, in_flight=3, delayed=0, oldest_age_s=None),
        QueueDepth(
            DEAD_LETTER_QUEUE, "http://q/dlq.fifo", visible=2, in_flight=0, delayed=0, oldest_age_s=3725.0
        ),
    ]
    assert render_table(depths).splitlines() == [
        "QUEUE              VISIBLE  IN FLIGHT  DELAYED  OLDEST",
        "main queue         12       3          0        unknown",
        "dead-letter queue  2        0          0        1h 2m",
        "the main queue's oldest age is not peeked (a receive there counts toward maxReceiveCount); "
        "CloudWatch's ApproximateAgeOfOldestMessage has it",
    ]
    assert render_lines(depths).splitlines() == [
        "queue=main visible=12 in_flight=3 delayed=0 oldest_age_s=unknown url=http://q/main.fifo",
        "queue=dlq visible=2 in_flight=0 delayed=0 oldest_age_s=3725 url=http://q/dlq.fifo",
    ]


@pytest.mark.usefixtures("restore_logging")
def test_stats_command_thresholds_and_json(
    aws_settings: AwsSettings,
    queues: QueuePair,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN 2 visible messages on the main queue and 1 on the DLQ, the queues in the environment
    asyncio.run(enqueue(aws_settings, queues, main=2, dlq=1))
    monkeypatch.setenv("JIRALAKE_QUEUE_URL", queues.queue_url)
    monkeypatch.setenv("JIRALAKE_DLQ_URL", queues.dlq_url)

    # WHEN thresholds are not exceeded: exit 0, plain lines (stdout is not a terminal here)
    assert cli.main(["queue", "stats", "--max-visible", "2", "--max-dlq", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" oldest_age_s=")[0] for line in out] == [
        "queue=main visible=2 in_flight=0 delayed=0",
        "queue=dlq visible=1 in_flight=0 delayed=0",
    ]

    # WHEN they are: exit 3 and one line saying which
    assert cli.main(["queue", "stats", "--max-visible", "1", "--max-dlq", "0"]) == 3
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "jiralake: threshold exceeded: main queue has 2 visible messages (max 1); "
        "dead-letter queue holds 1 messages (max 0)"
    )

    # WHEN --json: it parses and carries the same numbers and reasons
    assert cli.main(["queue", "stats", "--json", "--max-dlq", "0"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert [(q["queue"], q["visible"], q["in_flight"], q["delayed"]) for q in report["queues"]] == [
        (MAIN_QUEUE, 2, 0, 0),
        (DEAD_LETTER_QUEUE, 1, 0, 0),
    ]
    assert report["queues"][0]["oldest_age_s"] is None
    assert report["exceeded"] == ["dead-letter queue holds 1 messages (max 0)"]


def test_exit_codes_tell_a_deep_queue_from_a_check_that_could_not_run(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN 2 visible messages on the main queue, and the environment cron would run the check with
    asyncio.run(enqueue(aws_settings, queues, main=2, dlq=0))
    env = {**os.environ, "JIRALAKE_QUEUE_URL": queues.queue_url, "JIRALAKE_DLQ_URL": queues.dlq_url}
    env.pop("JIRALAKE_LOG_LEVEL", None)
    no_queue_url = {k: v for k, v in env.items() if k != "JIRALAKE_QUEUE_URL"}
    unreachable = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}

    def check(*args: str, environ: dict[str, str] = env) -> tuple[int, str]:
        """The exit status and the last stderr line, as cron sees them: a real process."""
        done = subprocess.run(
            [sys.executable, "-m", "jiralake", "queue", "stats", *args],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.returncode, (done.stderr.strip().splitlines() or [""])[-1]

    # WHEN it runs within, over, misused, misconfigured and without SQS
    # THEN each case has its own exit code, and 3 only ever means a threshold
    assert check("--max-visible", "2") == (0, "")
    assert check("--max-visible", "1") == (
        3,
        "jiralake: threshold exceeded: main queue has 2 visible messages (max 1)",
    )
    assert check("--max-visible", "-1") == (
        2,
        "jiralake queue stats: error: argument --max-visible: must be at least 0, got -1",
    )
    assert check("--watch", "inf") == (
        2,
        "jiralake queue stats: error: argument --watch: must be a finite number, got inf",
    )
    assert check("--watch", "1e-300") == (
        2,
        "jiralake queue stats: error: argument --watch: must be at least 1 (seconds), got 1e-300",
    )
    assert check("--max-visible", "1", environ=no_queue_url) == (
        2,
        "jiralake: configuration error: JIRALAKE_QUEUE_URL is not set "
        "(see the configuration table in README.md)",
    )
    code, line = check("--max-visible", "1", environ=unreachable)
    assert code == 1
    assert line.startswith("jiralake: cannot read the queues: EndpointConnectionError: "), line


async def test_watch_prints_one_json_line_per_round(aws_settings: AwsSettings, queues: QueuePair) -> None:
    await enqueue(aws_settings, queues, main=1, dlq=0)
    out = io.StringIO()
    await watch(
        aws_settings,
        settings(queues),
        Thresholds(max_visible=0),
        interval_s=0.01,
        style="json",
        rounds=2,
        out=out,
    )
    rounds = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["queues"][0]["visible"] for r in rounds] == [1, 1]
    assert [r["exceeded"] for r in rounds] == [["main queue has 1 visible messages (max 0)"]] * 2


async def test_watch_goes_on_through_an_sqs_outage(aws_settings: AwsSettings, queues: QueuePair) -> None:
    # GIVEN a watch whose SQS endpoint does not answer (an incident, when people watch)
    down = AwsSettings(aws_settings.region, f"http://127.0.0.1:{free_port()}")
    out = io.StringIO()
    # WHEN it runs two rounds THEN each says SQS is unavailable, and the watch does not end
    await watch(down, settings(queues), Thresholds(), interval_s=0.01, style="json", rounds=2, out=out)
    rounds = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(rounds) == 2
    assert all(r["error"].startswith("EndpointConnectionError") for r in rounds), rounds


async def test_watch_ends_when_a_queue_does_not_exist(aws_settings: AwsSettings, queues: QueuePair) -> None:
    # GIVEN a main queue URL with a typo: no later round could read it
    typo = QueueSettings(queue_url=queues.queue_url.replace(".fifo", "-typo.fifo"), dlq_url=queues.dlq_url)
    out = io.StringIO()
    # WHEN watched THEN the watch ends at once with the reason (exit 1), rather than retry forever
    with pytest.raises(CommandError) as ended:
        await watch(aws_settings, typo, Thresholds(), interval_s=0.01, style="json", rounds=3, out=out)
    assert ended.value.exit_code == 1
    assert str(ended.value).startswith("cannot read the queues: QueueDoesNotExist: ")
    assert out.getvalue() == ""


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_poller_publishes_depth_and_dlq_age(aws_settings: AwsSettings, queues: QueuePair) -> None:
    # GIVEN 3 messages on the main queue (1 in flight) and 2 on the DLQ
    await enqueue(aws_settings, queues, main=3, dlq=2, receive=1)
    QUEUE_MESSAGES.labels(DEAD_LETTER_QUEUE, "visible").set(-1)  # whatever earlier tests left
    stop = asyncio.Event()
    started = time.time()

    # WHEN the poller runs until the gauges show the DLQ
    task = asyncio.create_task(
        poll_queue_depths(aws_settings, queue_urls(settings(queues)), interval_s=0.05, stop=stop),
        name="queue-depth-poller",
    )
    deadline = time.monotonic() + 10
    while gauge("jiralake_queue_messages", queue=DEAD_LETTER_QUEUE, state="visible") != 2:
        assert time.monotonic() < deadline, "the poller did not publish in time"
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=10)

    # THEN the gauges carry the counts, the DLQ's age is known and the main queue's is not exported
    assert {
        (q, s): gauge("jiralake_queue_messages", queue=q, state=s)
        for q in (MAIN_QUEUE, DEAD_LETTER_QUEUE)
        for s in ("visible", "in_flight", "delayed")
    } == {
        (MAIN_QUEUE, "visible"): 2,
        (MAIN_QUEUE, "in_flight"): 1,
        (MAIN_QUEUE, "delayed"): 0,
        (DEAD_LETTER_QUEUE, "visible"): 2,
        (DEAD_LETTER_QUEUE, "in_flight"): 0,
        (DEAD_LETTER_QUEUE, "delayed"): 0,
    }
    assert gauge("jiralake_queue_oldest_message_age_seconds", queue=MAIN_QUEUE) is None
    age = gauge("jiralake_queue_oldest_message_age_seconds", queue=DEAD_LETTER_QUEUE)
    assert age is not None and 0 <= age < 60
    # AND each queue's read time says the gauges are fresh
    for queue in (MAIN_QUEUE, DEAD_LETTER_QUEUE):
        read = gauge("jiralake_queue_depth_read_timestamp_seconds", queue=queue)
        assert read is not None and started <= read <= time.time()


async def test_a_poller_cut_off_from_sqs_keeps_the_gauges_but_not_their_read_time(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN gauges holding an empty main queue, and a poller whose SQS endpoint does not answer (the
    # consumer's network path to SQS is cut)
    QUEUE_MESSAGES.labels(MAIN_QUEUE, "visible").set(0)
    cut_off = AwsSettings(region=aws_settings.region, endpoint_url=f"http://127.0.0.1:{free_port()}")
    urls = queue_urls(settings(queues))
    stop = asyncio.Event()
    started = time.time()
    with structlog.testing.capture_logs() as logs:
        # WHEN it tries for a few rounds, over more than a second
        task = asyncio.create_task(
            poll_queue_depths(cut_off, urls, interval_s=0.05, stop=stop), name="queue-depth-poller"
        )
        deadline = time.monotonic() + 30
        while sum(e["event"] == "queue_depth_unavailable" for e in logs) < 4 or time.time() < started + 1.5:
            assert time.monotonic() < deadline, "the poller did not try in time"
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, timeout=30)

    # THEN the gauges keep their last values (one failed read must not make an alert flap), and the
    # read time stays at the poller's start, so JiralakeQueueDepthUnknown can tell stale from empty
    assert gauge("jiralake_queue_messages", queue=MAIN_QUEUE, state="visible") == 0
    for queue in (MAIN_QUEUE, DEAD_LETTER_QUEUE):
        read = gauge("jiralake_queue_depth_read_timestamp_seconds", queue=queue)
        assert read is not None and started <= read < started + 1.0


async def test_age_tracker_peeks_only_when_a_message_left(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN 2 messages on the DLQ and a tracker with a clock we move by hand
    await enqueue(aws_settings, queues, main=0, dlq=2)
    clock = [time.time()]
    tracker = OldestAgeTracker(repeek_every_s=300, now_s=lambda: clock[0])
    async with aws.sqs_client(aws_settings) as sqs:

        async def receive_counts() -> list[int]:
            resp = await sqs.receive_message(
                QueueUrl=queues.dlq_url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=0,
                MessageSystemAttributeNames=["All"],
            )
            return sorted(int(m["Attributes"]["ApproximateReceiveCount"]) for m in resp["Messages"])

        # WHEN it reads the depth, then again 100 s later with nothing changed
        first = await tracker.depth(sqs, DEAD_LETTER_QUEUE, queues.dlq_url, peek=True)
        clock[0] += 100
        second = await tracker.depth(sqs, DEAD_LETTER_QUEUE, queues.dlq_url, peek=True)
        # THEN it peeked once (each message received once), and the age grew with the clock
        assert first.oldest_age_s is not None and second.oldest_age_s is not None
        assert second.oldest_age_s - first.oldest_age_s == pytest.approx(100)
        assert await receive_counts() == [2, 2]  # one peek, plus this receive

        # WHEN a message arrives nothing is peeked; WHEN one leaves, it peeks again
        await send(sqs, queues.dlq_url, 1, group="20000")
        await tracker.depth(sqs, DEAD_LETTER_QUEUE, queues.dlq_url, peek=True)
        assert await receive_counts() == [1, 3, 3]
        resp = await sqs.receive_message(QueueUrl=queues.dlq_url, MaxNumberOfMessages=1, VisibilityTimeout=30)
        await sqs.delete_message(QueueUrl=queues.dlq_url, ReceiptHandle=resp["Messages"][0]["ReceiptHandle"])
        third = await tracker.depth(sqs, DEAD_LETTER_QUEUE, queues.dlq_url, peek=True)
        assert third.total == 2
        assert await receive_counts() == [3, 5]


async def test_a_queue_with_a_redrive_policy_is_never_peeked(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN a message on the main queue (which has a redrive policy), and a caller asking to peek it
    await enqueue(aws_settings, queues, main=1, dlq=0)
    async with aws.sqs_client(aws_settings) as sqs:
        depth = await OldestAgeTracker().depth(sqs, MAIN_QUEUE, queues.queue_url, peek=True)
        resp = await sqs.receive_message(
            QueueUrl=queues.queue_url, VisibilityTimeout=0, MessageSystemAttributeNames=["All"]
        )
    # THEN the age is unknown and the message was never received before this check
    assert depth.oldest_age_s is None
    assert resp["Messages"][0]["Attributes"]["ApproximateReceiveCount"] == "1"


async def test_a_watch_whose_reader_went_away_ends_quietly_as_sigpipe_would(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN `jiralake queue stats --watch 1 | head -1`: a reader that takes one line and leaves
    env = {**os.environ, "JIRALAKE_QUEUE_URL": queues.queue_url, "JIRALAKE_DLQ_URL": queues.dlq_url}
    read_end, write_end = os.pipe()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "queue", "stats", "--watch", "1", "--json",
        env=env, stdout=write_end, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        first = await asyncio.to_thread(reader.readline)
    # WHEN its next round writes to the closed pipe
    _, err = await asyncio.wait_for(child.communicate(), timeout=30)
    # THEN it ends as a Unix tool that SIGPIPE ended (141), saying nothing: the reader left, nothing failed
    assert json.loads(first)["queues"]
    assert child.returncode == 128 + signal.SIGPIPE
    assert err.decode() == ""


async def test_releasing_held_messages_to_an_sqs_that_never_answers_gives_up_in_seconds(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN 25 messages held (received), as a listing or a stopping replay holds them, and an SQS that
    # takes the release calls and never answers (botocore alone: 4 tries of 30 s, call after call)
    await enqueue(aws_settings, queues, main=0, dlq=25)
    async with aws.sqs_client(aws_settings) as sqs:
        held: list[str] = []
        while len(held) < 25:
            resp = await sqs.receive_message(
                QueueUrl=queues.dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=300
            )
            held += [m["ReceiptHandle"] for m in resp.get("Messages", [])]
    async with SilentProxy(aws_settings.endpoint_url or "", "ChangeMessageVisibilityBatch") as proxy:
        async with aws.sqs_client(dataclasses.replace(aws_settings, endpoint_url=proxy.url)) as silent:
            # WHEN they are released
            started = time.monotonic()
            not_reset = await make_visible(silent, queues.dlq_url, held)
            elapsed = time.monotonic() - started
    # THEN the three calls went out at once and were given up after RELEASE_CALL_TIMEOUT_S: the
    # messages reappear by themselves when their visibility timeout runs out
    assert (not_reset, proxy.calls) == (25, 3)
    assert RELEASE_CALL_TIMEOUT_S <= elapsed < 2 * RELEASE_CALL_TIMEOUT_S
