"""A queue that takes smaller messages than SQS's largest (MaximumMessageSize 256 KiB, as older Terraform
or a hand-made queue has): the receiver learns the limit at startup and refuses (413) a webhook that
would not fit, before it joins a batch, so the other webhooks of that batch are stored."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from receiver.message_size import MessageLimits
from shared import aws
from shared.envelope import Envelope, error_attributes
from shared.errors import CommandError
from shared.queue_limits import DEAD_LETTER_ROOM_BYTES, queue_message_limit
from shared.settings import AwsSettings
from shared.sqs_batch import entry_bytes
from tests.conftest import SMALL_QUEUE_BYTES, drain
from tests.test_receiver import post, receiver_settings, running

ONE_MIB = 1_048_576
FITS_SMALL_QUEUE = SMALL_QUEUE_BYTES - DEAD_LETTER_ROOM_BYTES
QUEUE_ROOM = (
    f"the queue's MaximumMessageSize of {SMALL_QUEUE_BYTES} bytes, less {DEAD_LETTER_ROOM_BYTES} kept "
    "for dead-letter attributes"
)


def issue_body(issue_id: int, *, size_bytes: int | None = None) -> bytes:
    """An issue event; padded to exactly ``size_bytes`` when given."""
    event: dict[str, Any] = {"webhookEvent": "jira:issue_updated", "issue": {"id": str(issue_id)}, "pad": ""}
    body = json.dumps(event).encode()
    if size_bytes is None:
        return body
    return body[:-2] + b"x" * (size_bytes - len(body)) + b'"}'


async def test_a_webhook_too_large_for_the_queue_is_413_and_the_webhooks_batched_with_it_are_stored(
    aws_settings: AwsSettings, small_queue: str
) -> None:
    # GIVEN a receiver on a 256 KiB queue whose batches wait long enough to gather concurrent webhooks,
    # and two webhooks the queue cannot take: one whose body alone is too large, one whose body is
    # just within the limit but whose message (body + attributes) is not
    settings = receiver_settings(aws_settings, small_queue, batch_max_wait_ms=200)
    too_large_body = issue_body(1, size_bytes=300_000)
    too_large_message = issue_body(2, size_bytes=FITS_SMALL_QUEUE)
    small = {f"small-{i}": issue_body(100 + i) for i in range(5)}
    with capture_logs() as logs:
        async with running(settings) as client:
            # WHEN they are posted together with five small webhooks
            answers = await asyncio.gather(
                post(client, too_large_body, delivery="too-large-body"),
                post(client, too_large_message, delivery="too-large-message"),
                *(post(client, body, delivery=delivery) for delivery, body in small.items()),
            )
    # THEN the two are refused with 413, naming the queue's limit
    (body_status, body_answer, _), (message_status, message_answer, _) = answers[:2]
    assert (body_status, body_answer) == (
        413,
        {
            "status": "too_large",
            "reason": f"body is larger than the limit of {FITS_SMALL_QUEUE} bytes ({QUEUE_ROOM})",
        },
    )
    assert message_status == 413 and message_answer["reason"].startswith("the message would be ")
    assert message_answer["reason"].endswith(
        f" bytes with its attributes; at most {FITS_SMALL_QUEUE} fit ({QUEUE_ROOM})"
    )
    # AND each refusal is logged at WARNING
    refused = [entry for entry in logs if entry["event"] == "webhook" and entry["outcome"] == "too_large"]
    assert sorted((entry["log_level"], entry["status"]) for entry in refused) == [("warning", 413)] * 2
    # AND every small webhook is accepted and stored
    assert [(status, answer["status"]) for status, answer, _ in answers[2:]] == [(202, "accepted")] * 5
    stored = [Envelope.from_message(m).delivery_id for m in await drain(aws_settings, small_queue)]
    assert sorted(stored) == sorted(small)


async def test_the_queue_limit_is_learned_at_startup_and_logged_in_one_line(
    aws_settings: AwsSettings, small_queue: str
) -> None:
    # GIVEN JIRALAKE_MAX_BODY_BYTES at its default (1 MiB), then below what the queue takes
    for max_body_bytes, body_limit in ((ONE_MIB, FITS_SMALL_QUEUE), (65_536, 65_536)):
        settings = receiver_settings(aws_settings, small_queue, max_body_bytes=max_body_bytes)
        # WHEN the receiver starts
        with capture_logs() as logs:
            async with running(settings):
                pass
        # THEN one INFO line gives the queue's limit and what it leaves: the body limit is the smaller
        # of JIRALAKE_MAX_BODY_BYTES and what the queue takes
        lines = [entry for entry in logs if entry["event"] == "receiver_message_limits"]
        assert lines == [
            {
                "event": "receiver_message_limits",
                "log_level": "info",
                "queue_max_message_bytes": SMALL_QUEUE_BYTES,
                "max_message_bytes": FITS_SMALL_QUEUE,
                "max_body_bytes": body_limit,
            }
        ]


async def test_a_limit_that_cannot_be_read_is_taken_as_1_mib_with_a_warning(
    aws_settings: AwsSettings, small_queue: str
) -> None:
    # GIVEN a queue URL SQS does not know
    missing = small_queue.replace(".fifo", "-gone.fifo")
    async with aws.sqs_client(aws_settings) as sqs:
        # WHEN the receiver asks for its limit
        with capture_logs() as logs:
            limit = await queue_message_limit(sqs, missing, timeout_s=5.0)
    # THEN it has none, and says why in one warning ...
    assert limit is None
    [warning] = logs
    assert (warning["event"], warning["log_level"], warning["assumed_bytes"]) == (
        "queue_message_limit_unknown",
        "warning",
        ONE_MIB,
    )
    assert "NonExistentQueue" in warning["error"]
    # ... and the receiver goes on with SQS's largest, as it did before it asked, saying so in the
    # reason of a refusal
    assumed = MessageLimits(max_body_bytes=ONE_MIB)
    room = (
        f"SQS's largest message, {ONE_MIB} bytes (the queue's MaximumMessageSize could not be read), "
        f"less {DEAD_LETTER_ROOM_BYTES} kept for dead-letter attributes"
    )
    fits = ONE_MIB - DEAD_LETTER_ROOM_BYTES
    assert assumed.body_too_large() == f"body is larger than the limit of {fits} bytes ({room})"
    assert assumed.message_too_large(ONE_MIB) == (
        f"the message would be {ONE_MIB} bytes with its attributes; at most {fits} fit ({room})"
    )


async def test_a_queue_too_small_for_any_webhook_stops_the_start_and_a_small_one_is_warned_about(
    aws_settings: AwsSettings, unique_name: str, small_queue: str
) -> None:
    async with aws.sqs_client(aws_settings) as sqs:
        # GIVEN a queue of SQS's smallest messages, 1 KiB: less than the room kept for dead-letter reasons
        tiny = await sqs.create_queue(
            QueueName=f"{unique_name}-tiny.fifo",
            Attributes={"FifoQueue": "true", "MaximumMessageSize": "1024"},
        )
        try:
            # WHEN the receiver starts on it
            with pytest.raises(CommandError) as refused:
                async with running(receiver_settings(aws_settings, tiny["QueueUrl"])):
                    pass
        finally:
            await sqs.delete_queue(QueueUrl=tiny["QueueUrl"])
    # THEN it refuses, in one line saying what to set
    assert str(refused.value) == (
        "the queue's MaximumMessageSize of 1024 bytes leaves no room for a message (2048 bytes of each "
        "are kept for dead-letter reasons); set it to 1048576, SQS's largest (jiralake setup sets it)"
    )
    # AND on a 256 KiB queue it starts, warning that larger webhooks will be refused
    with capture_logs() as logs:
        async with running(receiver_settings(aws_settings, small_queue)):
            pass
    warnings = [(e["event"], e["queue_max_message_bytes"]) for e in logs if e["log_level"] == "warning"]
    assert warnings == [("queue_message_limit_small", SMALL_QUEUE_BYTES)]


def test_the_room_kept_for_dead_letter_attributes_holds_the_largest_reasons() -> None:
    # GIVEN the four error attributes at their largest: reasons of multi-byte characters only (cut
    # in bytes), a failure time, the longest group id SQS allows
    attributes = error_attributes(
        error_class="Ж" * 1000,
        error_message="€" * 5000,
        failed_at_iso="2024-05-10T06:00:00.123456+00:00",
        original_group_id="9" * 128,
    )
    # THEN SQS counts them within the room every stored message keeps for them
    assert entry_bytes({"MessageBody": "", "MessageAttributes": attributes}) <= DEAD_LETTER_ROOM_BYTES
