"""Creates the SQS FIFO queue, its FIFO dead-letter queue and (on a local endpoint) the bucket.

Idempotent: SQS ``CreateQueue`` returns the existing queue when the attributes match, and the
attributes are then set again, so re-running ``setup`` changes nothing.

With ``call_timeout_s`` each call is given up after that long without an answer and
:class:`~shared.sqs_requests.Unanswered` raised, its text naming the call (``no answer from SQS within 10 s to
CreateQueue``): whether SQS did it is unknown, and running it all again is the way to find out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import structlog
from botocore.exceptions import ClientError

from shared.aws import error_code
from shared.settings import ConfigError
from shared.sqs_requests import answered_within, counted

log = structlog.get_logger()

MAX_MESSAGE_BYTES = 1_048_576  # SQS's limit since 2025
MAX_VISIBILITY_TIMEOUT_S = 43_200  # SQS's limit: 12 hours
MAX_RECEIVE_COUNT = 1_000  # SQS's limit for a redrive policy's maxReceiveCount
RETENTION_S = 1_209_600  # 14 days, SQS's maximum: the DLQ must outlive any outage


@dataclass(frozen=True)
class QueuePair:
    queue_url: str
    dlq_url: str


def queue_name_from_url(url: str) -> str:
    name = urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]
    if not name.endswith(".fifo"):
        raise ConfigError(f"queue {name!r} is not a FIFO queue: its name must end in .fifo")
    return name


async def ensure_queues(
    sqs: Any,
    *,
    queue_name: str,
    dlq_name: str,
    max_receive_count: int,
    visibility_timeout_s: int = 60,
    call_timeout_s: float | None = None,
) -> QueuePair:
    common = {
        "FifoQueue": "true",
        "ContentBasedDeduplication": "false",
        "MaximumMessageSize": str(MAX_MESSAGE_BYTES),
        "MessageRetentionPeriod": str(RETENTION_S),
    }
    dlq_url = await _create(sqs, dlq_name, dict(common), call_timeout_s)
    answer = await counted(
        "GetQueueAttributes",
        sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]),
        timeout_s=call_timeout_s,
    )
    dlq_arn = answer["Attributes"]["QueueArn"]
    main_attributes = dict(
        common,
        VisibilityTimeout=str(visibility_timeout_s),
        ReceiveMessageWaitTimeSeconds="20",
        RedrivePolicy=json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}),
    )
    queue_url = await _create(sqs, queue_name, main_attributes, call_timeout_s)
    log.info("queues_ready", queue_url=queue_url, dlq_url=dlq_url, max_receive_count=max_receive_count)
    return QueuePair(queue_url=queue_url, dlq_url=dlq_url)


async def _create(sqs: Any, name: str, attributes: dict[str, str], timeout_s: float | None) -> str:
    try:
        created = await counted(
            "CreateQueue", sqs.create_queue(QueueName=name, Attributes=attributes), timeout_s=timeout_s
        )
        url: str = created["QueueUrl"]
    except ClientError as exc:
        if error_code(exc) not in {"QueueAlreadyExists", "QueueNameExists"}:
            raise
        # It exists with other attributes: adopt it and bring its attributes to what we want.
        found = await counted("GetQueueUrl", sqs.get_queue_url(QueueName=name), timeout_s=timeout_s)
        url = found["QueueUrl"]
    settable = {k: v for k, v in attributes.items() if k != "FifoQueue"}
    await counted(
        "SetQueueAttributes", sqs.set_queue_attributes(QueueUrl=url, Attributes=settable), timeout_s=timeout_s
    )
    return url


async def ensure_bucket(s3: Any, bucket: str, region: str, *, call_timeout_s: float | None = None) -> None:
    try:
        await answered_within("HeadBucket", s3.head_bucket(Bucket=bucket), call_timeout_s, service="S3")
        return
    except ClientError as exc:
        if error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    await answered_within("CreateBucket", s3.create_bucket(**kwargs), call_timeout_s, service="S3")
    log.info("bucket_created", bucket=bucket)
