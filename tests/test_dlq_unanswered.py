"""``jiralake dlq replay|list|purge`` against an SQS that takes one call and never answers it: each call
is given up after PROMPT_CALL_TIMEOUT_S (botocore alone: over 2 minutes), the command says in one
line what that means for the messages, and a stop signal is honoured within that bound.

The command tests run ``cli.main`` in this thread with the bound made 1 s (``PROMPT_CALL_TIMEOUT_S``
as ``ops.dlq_command`` reads it) and the proxy in a thread of its own; the SIGTERM test runs the real
command, with the real bound, in a child process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
import structlog
from aiohttp import ClientOSError
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from jiralake import cli
from ops import dlq_command
from ops.local_aws import free_port
from shared import aws, sqs_batch
from shared.provision import QueuePair
from shared.settings import AwsSettings
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S, SQS_ERRORS, Unanswered, maybe_done
from tests.cli_in_process import in_thread, run_timed
from tests.conftest import drain
from tests.fault_proxy import LoseAnswerProxy, SilentProxy
from tests.test_dlq import ISSUE_A, ISSUE_B, T0, by_group, counts, dead_letter_all, events_of, put_in_dlq

TEST_CALL_TIMEOUT_S = 1.0
# Well under botocore's own wait for a call that is never answered (30 s a try, and retries), over the
# bound and the few calls that are answered.
FAST_ENOUGH_S = TEST_CALL_TIMEOUT_S + 9
MAYBE_SENT = "it stays in the dead-letter queue and may be in the main queue as well (harmless)"
# How botocore reports a connection reset before SQS's answer came back.
LOST_ANSWER = "ConnectionClosedError: "
# The bound for the tests whose calls fail on their own, not on the bound: room for botocore's 3 tries
# of a call whose answer is lost and its backoff between them, and for a receive's 1 s long poll.
ROOMY_CALL_TIMEOUT_S = 20.0
HARMLESS = "which is harmless (SQS drops a second copy within 5 minutes, the consumer skips it after)"

# A proxy that takes every call of one operation: never answers it, or loses SQS's answer to it.
OneCallProxy = SilentProxy | LoseAnswerProxy
Through = Callable[..., AbstractContextManager[OneCallProxy]]


@pytest.fixture
def through(
    aws_settings: AwsSettings, queues: QueuePair, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Through]:
    """The dlq commands' environment, with the bound at TEST_CALL_TIMEOUT_S; ``with through(op)``
    points AWS_ENDPOINT_URL at a proxy that never answers ``op`` (``through(op, LoseAnswerProxy)``:
    one that loses SQS's answers to it). ``cli.main`` configures structlog
    for the captured stderr; the suite's setup is put back after."""
    monkeypatch.setenv("JIRALAKE_QUEUE_URL", queues.queue_url)
    monkeypatch.setenv("JIRALAKE_DLQ_URL", queues.dlq_url)
    monkeypatch.setattr(dlq_command, "PROMPT_CALL_TIMEOUT_S", TEST_CALL_TIMEOUT_S)

    @contextmanager
    def through_proxy(
        operation: str, proxy_class: type[OneCallProxy] = SilentProxy
    ) -> Iterator[OneCallProxy]:
        with in_thread(proxy_class(aws_settings.endpoint_url or "", operation)) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            yield proxy

    saved = structlog.get_config()
    yield through_proxy
    structlog.configure(**saved)


def queue_counts(aws_settings: AwsSettings, queues: QueuePair) -> tuple[tuple[int, int], tuple[int, int]]:
    """(visible, in flight) of the main queue and of the DLQ, read around the proxy."""

    async def read() -> tuple[tuple[int, int], tuple[int, int]]:
        async with aws.sqs_client(aws_settings) as sqs:
            return await counts(sqs, queues.queue_url), await counts(sqs, queues.dlq_url)

    return asyncio.run(read())


@pytest.mark.timeout(30)
def test_a_send_sqs_never_answers_stops_the_replay_in_seconds_and_keeps_the_events_in_the_dlq(
    aws_settings: AwsSettings, queues: QueuePair, through: Through, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN two events of issue A and one of B in the DLQ, and an SQS that takes SendMessageBatch and
    # never answers it
    put_in_dlq(aws_settings, queues, [*events_of(ISSUE_A, 2), *events_of(ISSUE_B, 1)])
    with through("SendMessageBatch") as proxy:
        # WHEN replayed
        code, elapsed = run_timed(["dlq", "replay"])
    # THEN it gives the send up after the bound, makes no other send, and stops with exit 1 and one line
    assert code == 1
    assert TEST_CALL_TIMEOUT_S <= elapsed < FAST_ENOUGH_S
    assert proxy.calls == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == (
        "jiralake: dlq replay stopped early: SQS did not answer SendMessageBatch within 1 s; the 3 "
        "message(s) it carried stay in the dead-letter queue and may be in the main queue as well, "
        f"{HARMLESS}; run the same command again"
    )
    out = captured.out.splitlines()
    assert [(line.split(" (message ")[0], line.split("): ", 1)[1]) for line in out[:3]] == [
        (
            f"failed: issue {issue} jira:issue_updated",
            f"no answer from SQS within 1 s to SendMessageBatch: {MAYBE_SENT}",
        )
        for issue in (ISSUE_A, ISSUE_A, ISSUE_B)
    ]
    assert out[3:] == [
        "replayed 0, skipped 0, failed 3 (3 of them may be in both queues, which is harmless)",
        captured.err.splitlines()[-1].replace("jiralake: dlq replay stopped early: ", "stopped early: "),
    ]
    # AND every event is still in the DLQ, visible again at once (not held for 5 minutes); SQS never
    # got the send, so the main queue is empty
    assert queue_counts(aws_settings, queues) == ((0, 0), (3, 0))


@pytest.mark.timeout(60)
def test_a_send_whose_answer_is_lost_is_reported_as_maybe_sent_not_as_not_sent(
    aws_settings: AwsSettings,
    queues: QueuePair,
    through: Through,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dlq_command, "PROMPT_CALL_TIMEOUT_S", ROOMY_CALL_TIMEOUT_S)
    # GIVEN two events of issue A and one of B in the DLQ, and an SQS that stores every SendMessageBatch
    # while the connection is reset before its answer comes back (botocore's retries too)
    put_in_dlq(aws_settings, queues, [*events_of(ISSUE_A, 2), *events_of(ISSUE_B, 1)])
    with through("SendMessageBatch", LoseAnswerProxy) as proxy:
        # WHEN replayed
        code = cli.main(["dlq", "replay"])
    # THEN each message is reported with an unknown outcome, never as "not sent", and so is the summary
    assert code == 1
    assert proxy.calls >= 3  # botocore's 3 tries at least, each stored by SQS
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    reasons = [line.split("): ", 1)[1] for line in out[:3]]
    assert all(
        reason.startswith(f"outcome unknown ({LOST_ANSWER}") and reason.endswith(f"): {MAYBE_SENT}")
        for reason in reasons
    ), reasons
    assert out[3:] == ["replayed 0, skipped 0, failed 3 (3 of them may be in both queues, which is harmless)"]
    assert captured.err.splitlines()[-1] == (
        "jiralake: dlq replay could not replay 3 message(s) (reasons above): SQS's answer was lost for 3 "
        "of them, so each of those may be in both queues, which is harmless; run the same command again "
        "once the cause is fixed"
    )
    # AND every event is in BOTH queues: SQS did store the copies ("not sent" would have been false),
    # once each (the same deduplication id on every try), and the DLQ keeps them, visible again
    assert queue_counts(aws_settings, queues)[1] == (3, 0)
    assert by_group(asyncio.run(drain(aws_settings, queues.queue_url))) == {
        ISSUE_A: [T0, T0 + 1],
        ISSUE_B: [T0],
    }


@pytest.mark.timeout(60)
def test_a_delete_whose_answer_is_lost_is_not_reported_as_still_in_the_dlq(
    aws_settings: AwsSettings,
    queues: QueuePair,
    through: Through,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dlq_command, "PROMPT_CALL_TIMEOUT_S", ROOMY_CALL_TIMEOUT_S)
    # GIVEN two events of issue A in the DLQ, and an SQS that carries out every DeleteMessageBatch while
    # the connection is reset before its answer comes back
    put_in_dlq(aws_settings, queues, events_of(ISSUE_A, 2))
    with through("DeleteMessageBatch", LoseAnswerProxy):
        # WHEN replayed
        code = cli.main(["dlq", "replay"])
    # THEN each message says its delete has an unknown outcome, not that it is still in the DLQ
    assert code == 1
    out = capsys.readouterr().out.splitlines()
    reasons = [line.split("): ", 1)[1] for line in out[:2]]
    assert all(
        reason.startswith(
            f"sent, but its delete from the dead-letter queue has an unknown outcome ({LOST_ANSWER}"
        )
        and reason.endswith("): it may still be there, and a later replay sends it again, which is harmless")
        for reason in reasons
    ), reasons
    assert out[2] == "replayed 0, skipped 0, failed 2 (2 of them may be in both queues, which is harmless)"
    # AND SQS did delete them ("still in the dead-letter queue" would have been false): they are in the
    # main queue only, in order
    assert queue_counts(aws_settings, queues)[1] == (0, 0)
    assert by_group(asyncio.run(drain(aws_settings, queues.queue_url))) == {ISSUE_A: [T0, T0 + 1]}


def test_a_send_sqs_refuses_is_still_reported_as_not_sent(
    aws_settings: AwsSettings,
    queues: QueuePair,
    through: Through,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN two events of issue A in the DLQ, and a main queue URL that names no queue (SQS answers 400)
    put_in_dlq(aws_settings, queues, events_of(ISSUE_A, 2))
    monkeypatch.setattr(dlq_command, "PROMPT_CALL_TIMEOUT_S", ROOMY_CALL_TIMEOUT_S)
    monkeypatch.setenv("JIRALAKE_QUEUE_URL", queues.queue_url.replace(".fifo", "-gone.fifo"))
    # WHEN replayed
    code = cli.main(["dlq", "replay"])
    # THEN SQS answered, so "not sent" is certain and said, with SQS's error, and nothing is in doubt
    assert code == 1
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert [line.split("): ", 1)[1] for line in out[:2]] == [
        "not sent: QueueDoesNotExist: An error occurred (AWS.SimpleQueueService.NonExistentQueue) when "
        "calling the SendMessageBatch operation: The specified queue does not exist."
    ] * 2
    assert out[2:] == ["replayed 0, skipped 0, failed 2"]
    assert captured.err.splitlines()[-1] == (
        "jiralake: dlq replay could not replay 2 message(s); they stay in the dead-letter queue (reasons "
        "above); run the same command again once the cause is fixed"
    )
    assert queue_counts(aws_settings, queues) == ((0, 0), (2, 0))


@pytest.mark.timeout(30)
def test_a_delete_sqs_never_answers_stops_the_replay_in_seconds_and_says_the_events_may_come_twice(
    aws_settings: AwsSettings, queues: QueuePair, through: Through, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN two events of issue A in the DLQ, and an SQS that stores the sends but never answers the
    # delete from the DLQ
    put_in_dlq(aws_settings, queues, events_of(ISSUE_A, 2))
    with through("DeleteMessageBatch") as proxy:
        # WHEN replayed
        code, elapsed = run_timed(["dlq", "replay"])
    # THEN it gives the delete up after the bound, stops there with exit 1, and one line says what that means
    assert code == 1
    assert TEST_CALL_TIMEOUT_S <= elapsed < FAST_ENOUGH_S
    assert proxy.calls == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == (
        "jiralake: dlq replay stopped early: SQS did not answer DeleteMessageBatch within 1 s; the 2 "
        "message(s) it was deleting are in the main queue and may still be in the dead-letter queue, so "
        f"a later replay may send them again, {HARMLESS}"
    )
    out = captured.out.splitlines()
    assert all(
        line.endswith(
            "): sent, but its delete from the dead-letter queue got no answer from SQS within 1 s to "
            "DeleteMessageBatch: it may "
            "still be there, and a later replay sends it again, which is harmless"
        )
        for line in out[:2]
    )
    assert out[2] == "replayed 0, skipped 0, failed 2 (2 of them may be in both queues, which is harmless)"
    # AND the events are in the main queue, in order, and (the delete never reached SQS) in the DLQ,
    # visible again at once
    assert queue_counts(aws_settings, queues)[1] == (2, 0)
    assert by_group(asyncio.run(drain(aws_settings, queues.queue_url))) == {ISSUE_A: [T0, T0 + 1]}


@pytest.mark.timeout(30)
def test_a_receive_sqs_never_answers_ends_replay_and_list_in_seconds(
    aws_settings: AwsSettings, queues: QueuePair, through: Through, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an event in the DLQ, and an SQS that never answers ReceiveMessage
    put_in_dlq(aws_settings, queues, events_of(ISSUE_A, 1))
    with through("ReceiveMessage"):
        # WHEN replayed, THEN it stops after the bound with exit 1 and says why
        code, elapsed = run_timed(["dlq", "replay"])
        assert (code, elapsed < FAST_ENOUGH_S) == (1, True)
        assert capsys.readouterr().err.splitlines()[-1] == (
            "jiralake: dlq replay stopped early: cannot receive from the dead-letter queue: no answer from "
            "SQS within 1 s to ReceiveMessage (what SQS may have handed out is visible again within 5 "
            "minutes)"
        )
        # WHEN listed, THEN the same
        code, elapsed = run_timed(["dlq", "list"])
        assert (code, elapsed < FAST_ENOUGH_S) == (1, True)
        assert capsys.readouterr().err.splitlines()[-1] == (
            "jiralake: dlq list got no answer from SQS within 1 s to ReceiveMessage; what it may have held "
            "is visible again within 60 s"
        )
    # AND the event is where it was
    assert queue_counts(aws_settings, queues) == ((0, 0), (1, 0))


@pytest.mark.timeout(30)
def test_a_count_sqs_never_answers_ends_list_in_seconds_holding_nothing(
    aws_settings: AwsSettings, queues: QueuePair, through: Through, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an event in the DLQ, and an SQS that never answers GetQueueAttributes (the count, read first)
    put_in_dlq(aws_settings, queues, events_of(ISSUE_A, 1))
    with through("GetQueueAttributes"):
        # WHEN listed
        code, elapsed = run_timed(["dlq", "list"])
    # THEN it stops after the bound with exit 1, naming the call, and claims no hidden message
    assert (code, elapsed < FAST_ENOUGH_S) == (1, True)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "jiralake: dlq list got no answer from SQS within 1 s to GetQueueAttributes; it held no message"
    )
    assert queue_counts(aws_settings, queues) == ((0, 0), (1, 0))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("operation", "line"),
    [
        (
            "GetQueueAttributes",
            "jiralake: dlq purge got no answer from SQS within 1 s when it read the dead-letter queue's "
            "count; nothing was purged",
        ),
        (
            "PurgeQueue",
            "jiralake: dlq purge got no answer from SQS within 1 s to the purge (the dead-letter queue held "
            "about 1 message(s)); whether it was purged is unknown: check with dlq list in a minute",
        ),
    ],
)
def test_a_purge_sqs_never_answers_ends_in_seconds_and_says_what_is_known(
    aws_settings: AwsSettings,
    queues: QueuePair,
    through: Through,
    capsys: pytest.CaptureFixture[str],
    operation: str,
    line: str,
) -> None:
    # GIVEN an event in the DLQ, and an SQS that never answers one of purge's two calls
    put_in_dlq(aws_settings, queues, events_of(ISSUE_A, 1))
    with through(operation):
        # WHEN purged
        code, elapsed = run_timed(["dlq", "purge", "--yes"])
    # THEN it ends after the bound with exit 1 and one line, and (the call never reached SQS) the
    # event is still there
    assert (code, elapsed < FAST_ENOUGH_S) == (1, True)
    assert capsys.readouterr().err.splitlines()[-1] == line
    assert queue_counts(aws_settings, queues) == ((0, 0), (1, 0))


@pytest.mark.timeout(30)
async def test_entries_after_a_call_sqs_never_answers_are_not_sent(
    aws_settings: AwsSettings, queues: QueuePair, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN three entries that take three calls (each call made to hold one), and an SQS that never
    # answers SendMessageBatch
    monkeypatch.setattr(sqs_batch, "MAX_CALL_BYTES", 1)
    entries = [
        {
            "Id": str(i),
            "MessageBody": f"body{i}",
            "MessageGroupId": f"g{i}",
            "MessageDeduplicationId": f"d{i}",
        }
        for i in range(3)
    ]
    assert len(list(sqs_batch.calls(entries))) == 3
    async with SilentProxy(aws_settings.endpoint_url or "", "SendMessageBatch") as proxy:
        async with aws.sqs_client(dataclasses.replace(aws_settings, endpoint_url=proxy.url)) as silent:
            # WHEN sent with a bound
            started = time.monotonic()
            results = await sqs_batch.send_entries(
                silent, queues.queue_url, entries, timeout_s=TEST_CALL_TIMEOUT_S
            )
            elapsed = time.monotonic() - started
        # THEN the first call is given up after the bound (outcome unknown) and the others are not made
        assert proxy.calls == 1
    assert elapsed < FAST_ENOUGH_S
    assert [(r.ok, r.error, r.unanswered) for r in results] == [
        (False, "no answer from SQS within 1 s to SendMessageBatch", True),
        (False, "SQS did not answer an earlier call", False),
        (False, "SQS did not answer an earlier call", False),
    ]


@pytest.mark.timeout(60)
async def test_sigterm_while_a_send_goes_unanswered_ends_the_replay_within_the_bound(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN two events of issue A in the DLQ, and `dlq replay` (a one-off task, the real bound) whose
    # SendMessageBatch SQS takes and never answers
    async with aws.sqs_client(aws_settings) as sqs:
        await dead_letter_all(sqs, queues.dlq_url, events_of(ISSUE_A, 2))
    async with SilentProxy(aws_settings.endpoint_url or "", "SendMessageBatch") as proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JIRALAKE_")}
        env.update(
            AWS_ENDPOINT_URL=proxy.url, JIRALAKE_QUEUE_URL=queues.queue_url, JIRALAKE_DLQ_URL=queues.dlq_url
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jiralake", "dlq", "replay",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(proxy.arrived.wait(), timeout=30)
        # WHEN it gets SIGTERM while that send waits
        signalled = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(child.communicate(), timeout=PROMPT_CALL_TIMEOUT_S + 30)
        elapsed = time.monotonic() - signalled
    # THEN it ends within the bound of the send it waited for (not botocore's minutes), with the
    # signal's exit code and one line, and the summary says why the events were not moved
    assert child.returncode == 143, err.decode()
    assert elapsed < PROMPT_CALL_TIMEOUT_S + 5
    unanswered = (
        "SQS did not answer SendMessageBatch within 10 s; the 2 message(s) it carried stay in the "
        f"dead-letter queue and may be in the main queue as well, {HARMLESS}; run the same command again"
    )
    assert err.decode().splitlines()[-1] == f"jiralake: dlq replay stopped by SIGTERM; {unanswered}"
    assert out.decode().splitlines()[-2:] == [
        "replayed 0, skipped 0, failed 2 (2 of them may be in both queues, which is harmless)",
        f"stopped early: {unanswered}",
    ]
    # AND both events are in the DLQ, visible again; the main queue never got them
    async with aws.sqs_client(aws_settings) as sqs:
        assert await counts(sqs, queues.dlq_url) == (2, 0)
        assert await counts(sqs, queues.queue_url) == (0, 0)


def sqs_error(status: int, *, tries: int = 1) -> ClientError:
    """The error botocore raises for an SQS answer of ``status``, after ``tries`` tries."""
    response: Any = {
        "Error": {"Code": "Anything", "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": tries - 1},
    }
    return ClientError(response, "SendMessageBatch")


@pytest.mark.parametrize(
    ("exc", "maybe"),
    [
        # SQS answered a refusal at the first try: certainly not done
        (sqs_error(400), False),
        (sqs_error(403), False),
        # SQS failed (a 5xx), or botocore tried again after a try that may have been carried out
        (sqs_error(500), True),
        (sqs_error(503), True),
        (sqs_error(400, tries=3), True),
        # no connection made: certainly not done
        (ConnectTimeoutError(endpoint_url="http://sqs"), False),
        (EndpointConnectionError(endpoint_url="http://sqs", error=socket.gaierror(-2, "unknown")), False),
        # the request may have reached SQS and its answer been lost
        (EndpointConnectionError(endpoint_url="http://sqs", error=ClientOSError(104, "reset by peer")), True),
        (ReadTimeoutError(endpoint_url="http://sqs"), True),
        (ConnectionClosedError(endpoint_url="http://sqs"), True),
        (Unanswered("no answer from SQS within 10 s to SendMessageBatch"), True),
        (OSError(104, "reset by peer"), True),
    ],
)
def test_whether_sqs_may_have_done_a_failed_call_is_decided_by_what_failed(
    exc: Exception, maybe: bool
) -> None:
    assert maybe_done(exc) is maybe


async def test_a_call_to_an_sqs_nothing_listens_for_certainly_did_nothing(aws_settings: AwsSettings) -> None:
    # GIVEN an SQS endpoint on a port nothing listens on
    nowhere = AwsSettings(region=aws_settings.region, endpoint_url=f"http://127.0.0.1:{free_port()}")
    async with aws.sqs_client(nowhere) as sqs:
        # WHEN a SendMessageBatch fails (after botocore's tries)
        with pytest.raises(SQS_ERRORS) as failed:
            await sqs.send_message_batch(
                QueueUrl="http://127.0.0.1/123456789012/q.fifo", Entries=[{"Id": "0", "MessageBody": "b"}]
            )
    # THEN it is known to have done nothing (aiobotocore calls it an EndpointConnectionError, as it does
    # a reset mid-answer)
    assert isinstance(failed.value, EndpointConnectionError)
    assert maybe_done(failed.value) is False
