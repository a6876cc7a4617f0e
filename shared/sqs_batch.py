"""``SendMessageBatch`` in chunks of 10 with per-entry results, counted in ``jiralake_sqs_requests_total``.

Used by the receiver's micro-batcher, backfill and dead-letter replay: each caller learns exactly
which of its entries SQS stored and which it refused, so nothing is acknowledged that was not stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from shared.metrics import SQS_CALLS

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

MAX_BATCH = 10


@dataclass(frozen=True)
class EntryResult:
    entry_id: str
    ok: bool
    # For failures: SQS's code and message, or the exception class and text of a failed call.
    error: str | None = None
    # True when retrying could succeed (throttling, network, 5xx); False for a refused entry.
    retryable: bool = False


async def send_entries(
    sqs: SQSClient, queue_url: str, entries: Sequence[dict[str, Any]]
) -> list[EntryResult]:
    """Send entries (each with a unique ``Id``) in chunks of 10; one result per entry, in order."""
    results: dict[str, EntryResult] = {}
    for start in range(0, len(entries), MAX_BATCH):
        chunk = list(entries[start : start + MAX_BATCH])
        try:
            resp = await sqs.send_message_batch(QueueUrl=queue_url, Entries=chunk)  # type: ignore[arg-type]
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            SQS_CALLS.labels("SendMessageBatch", "error").inc()
            reason = f"{type(exc).__name__}: {exc}"
            for entry in chunk:
                results[entry["Id"]] = EntryResult(entry["Id"], False, reason, retryable=True)
            continue
        SQS_CALLS.labels("SendMessageBatch", "ok").inc()
        for ok in resp.get("Successful", []):
            results[ok["Id"]] = EntryResult(ok["Id"], True)
        for failed in resp.get("Failed", []):
            results[failed["Id"]] = EntryResult(
                failed["Id"],
                False,
                f"{failed.get('Code', 'Unknown')}: {failed.get('Message', '')}".strip(),
                retryable=not failed.get("SenderFault", False),
            )
    return [
        results.get(e["Id"], EntryResult(e["Id"], False, "no result from SQS", retryable=True))
        for e in entries
    ]
