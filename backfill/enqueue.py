"""Put jiralake's own envelopes on the queue, retrying entries SQS failed retryably.

A caller learns which envelopes SQS stored and which it refused for good (too large, invalid);
if retryable failures outlast the attempts, :class:`QueueUnavailable` stops the run before any
cursor moves past them, so a restart sends them again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from backfill.jira_client import Sleep
from backfill.snapshot import MAX_BODY_BYTES, body_too_large
from shared.envelope import Envelope
from shared.sqs_batch import send_entries

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()


class QueueUnavailable(Exception):
    """SQS kept failing retryably; nothing past the last confirmed page counts as sent."""


@dataclass(frozen=True)
class Refused:
    issue_id: str
    reason: str


@dataclass
class SendOutcome:
    sent: int = 0
    refused: list[Refused] = field(default_factory=list)


async def send_envelopes(
    sqs: SQSClient,
    queue_url: str,
    envelopes: Sequence[Envelope],
    *,
    attempts: int = 5,
    sleep: Sleep = asyncio.sleep,
    backoff_s: float = 0.5,
) -> SendOutcome:
    outcome = SendOutcome()
    pending: list[Envelope] = []
    for env in envelopes:
        if body_too_large(env):
            outcome.refused.append(Refused(env.issue_id, f"body larger than {MAX_BODY_BYTES} bytes"))
        else:
            pending.append(env)
    last_error = ""
    for attempt in range(attempts):
        if not pending:
            break
        entries = [env.send_entry(str(i)) for i, env in enumerate(pending)]
        results = await send_entries(sqs, queue_url, entries)
        retry: list[Envelope] = []
        for env, result in zip(pending, results, strict=True):
            if result.ok:
                outcome.sent += 1
            elif result.retryable:
                retry.append(env)
                last_error = result.error or "unknown"
            else:
                outcome.refused.append(Refused(env.issue_id, result.error or "refused by SQS"))
        pending = retry
        if pending and attempt + 1 < attempts:
            delay_s = backoff_s * (2**attempt)
            log.warning("sqs_retry", entries=len(pending), error=last_error, delay_s=delay_s)
            await sleep(delay_s)
    if pending:
        raise QueueUnavailable(
            f"SQS did not accept {len(pending)} messages after {attempts} attempts: {last_error}"
        )
    return outcome
