"""Creates the SQS FIFO queue, its FIFO dead-letter queue and (on a local endpoint) the bucket.

Idempotent: SQS ``CreateQueue`` returns the existing queue when the attributes match, and the
attributes are then set again, so re-running ``setup`` changes nothing.
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
) -> QueuePair:
    common = {
        "FifoQueue": "true",
        "ContentBasedDeduplication": "false",
        "MaximumMessageSize": str(MAX_MESSAGE_BYTES),
        "MessageRetentionPeriod": str(RETENTION_S),
    }
    dlq_url = await _create(sqs, dlq_name, dict(common))
    dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))["Attributes"][
        "QueueArn"
    ]
    main_attributes = dict(
        common,
        VisibilityTimeout=str(visibility_timeout_s),
        ReceiveMessageWaitTimeSeconds="20",
        RedrivePolicy=json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}),
    )
    queue_url = await _create(sqs, queue_name, main_attributes)
    log.info("queues_ready", queue_url=queue_url, dlq_url=dlq_url, max_receive_count=max_receive_count)
    return QueuePair(queue_url=queue_url, dlq_url=dlq_url)


async def _create(sqs: Any, name: str, attributes: dict[str, str]) -> str:
    try:
        url: str = (await sqs.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
    except ClientError as exc:
        if error_code(exc) not in {"QueueAlreadyExists", "QueueNameExists"}:
            raise
        # It exists with other attributes: adopt it and bring its attributes to what we want.
        url = (await sqs.get_queue_url(QueueName=name))["QueueUrl"]
    settable = {k: v for k, v in attributes.items() if k != "FifoQueue"}
    await sqs.set_queue_attributes(QueueUrl=url, Attributes=settable)
    return url


async def ensure_bucket(s3: Any, bucket: str, region: str) -> None:
    try:
        await s3.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    await s3.create_bucket(**kwargs)
    log.info("bucket_created", bucket=bucket)
