"""Put jiralake's own envelopes on the queue, retrying entries SQS failed retryably.

A caller learns which envelopes SQS stored and which it refused for good (too large, invalid);
if retryable failures outlast the attempts, :class:`QueueUnavailable` stops the run before any
cursor moves past them, so a restart sends them again.

A call SQS takes and does not answer within ``call_timeout_s`` (PROMPT_CALL_TIMEOUT_S, 10 s, for the
commands) stops the run at once, not retried: botocore alone waits minutes for it, and each retry
would wait as long again. Whether SQS stored its messages is unknown, so they count as not sent; the
rerun that sends them again is harmless, as every envelope jiralake makes keeps its deduplication id
(``backfill:<id>:<updated>``, ``reconcile:deleted:<id>:<version>``, Jira's webhook id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from backfill.jira_client import Sleep
from shared.envelope import Envelope
from shared.provision import MAX_MESSAGE_BYTES
from shared.queue_limits import entry_room, queue_message_limit
from shared.sqs_batch import entry_bytes, send_entries
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S, no_answer

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


# What a message may count (body and attributes) on a queue that takes SQS's largest, 1 MiB.
DEFAULT_MAX_ENTRY_BYTES = entry_room(MAX_MESSAGE_BYTES)
# How long the one GetQueueAttributes call that learns the queue's limit may take.
LIMIT_TIMEOUT_S = PROMPT_CALL_TIMEOUT_S
# Why a message sent twice (a rerun after a send SQS did not answer) is harmless.
RESENT_IS_HARMLESS = (
    "sending them again is harmless (each keeps its deduplication id: SQS drops a second copy within "
    "5 minutes, the consumer skips it after)"
)


async def max_entry_bytes(sqs: SQSClient, queue_url: str) -> int:
    """What a message may count on this queue: its ``MaximumMessageSize`` (1 MiB when it cannot be
    read, with a warning) less the room kept for dead-letter reasons. A message over it would make
    SQS refuse the whole batch it joined, so :func:`send_envelopes` refuses it on its own."""
    limit = await queue_message_limit(sqs, queue_url, timeout_s=LIMIT_TIMEOUT_S)
    return entry_room(limit or MAX_MESSAGE_BYTES)


async def send_envelopes(
    sqs: SQSClient,
    queue_url: str,
    envelopes: Sequence[Envelope],
    *,
    attempts: int = 5,
    sleep: Sleep = asyncio.sleep,
    backoff_s: float = 0.5,
    max_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    call_timeout_s: float | None = None,
) -> SendOutcome:
    """Send ``envelopes``; one whose message (body and attributes) is over ``max_bytes`` is refused
    here, before it joins a batch (see :func:`max_entry_bytes`). A call without an answer within
    ``call_timeout_s`` (None: botocore's own limits) raises :class:`QueueUnavailable` at once."""
    outcome = SendOutcome()
    pending: list[Envelope] = []
    for env in envelopes:
        size = entry_bytes(env.send_entry("0"))
        if size > max_bytes:
            reason = f"message of {size} bytes with its attributes; the queue takes at most {max_bytes}"
            outcome.refused.append(Refused(env.issue_id, reason))
        else:
            pending.append(env)
    last_error = ""
    maybe_stored: set[int] = set()  # id() of pending envelopes SQS may have stored (its answer lost)
    for attempt in range(attempts):
        if not pending:
            break
        entries = [env.send_entry(str(i)) for i, env in enumerate(pending)]
        results = await send_entries(sqs, queue_url, entries, timeout_s=call_timeout_s)
        unanswered = sum(result.unanswered for result in results)
        if unanswered:
            raise QueueUnavailable(
                f"SQS did not answer SendMessageBatch ({no_answer(call_timeout_s or 0.0)}): whether it "
                f"stored the {unanswered} message(s) it carried is unknown, so they do not count as "
                f"sent; {RESENT_IS_HARMLESS}"
            )
        retry: list[Envelope] = []
        for env, result in zip(pending, results, strict=True):
            if result.ok:
                outcome.sent += 1
            elif result.retryable:
                retry.append(env)
                last_error = result.error or "unknown"
                if result.maybe_stored:
                    maybe_stored.add(id(env))
            else:
                outcome.refused.append(Refused(env.issue_id, result.error or "refused by SQS"))
        pending = retry
        if pending and attempt + 1 < attempts:
            delay_s = backoff_s * (2**attempt)
            log.warning("sqs_retry", entries=len(pending), error=last_error, delay_s=delay_s)
            await sleep(delay_s)
    if pending:
        if doubtful := sum(id(env) in maybe_stored for env in pending):
            raise QueueUnavailable(
                f"SQS did not confirm {len(pending)} messages after {attempts} attempts ({last_error}); it "
                f"may have stored {doubtful} of them (its answer was lost), so they do not count as sent; "
                f"{RESENT_IS_HARMLESS}"
            )
        raise QueueUnavailable(
            f"SQS did not accept {len(pending)} messages after {attempts} attempts: {last_error}"
        )
    return outcome
