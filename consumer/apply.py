"""The apply step: a batch of envelopes -> ``ap_jira_task`` and ``ap_jira_task_event``, set-based.

The whole batch is one statement (``apply_batch`` in queries.sql), so one round trip and atomic. When
Postgres rejects the batch because of a message's data (a NUL character, an out-of-range value), the
batch is applied again one message at a time (by issue id, in queue order within an issue), each under
a savepoint inside one transaction: the bad message is reported invalid and every other message still
applies. Transient and unexpected errors propagate (consumer/outcomes.py decides what they mean to the
caller).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import structlog

from consumer import queries
from consumer.event import ConsumerEvent, parse_envelope
from consumer.ordering import IssueChange, coalesce
from consumer.outcomes import InvalidMessage, Outcome, classify, describe
from shared.envelope import Envelope

log = structlog.get_logger()

# JSON escapes json.loads accepts and jsonb may refuse: NUL, and UTF-16 surrogates (D800-DFFF; jsonb
# refuses the unpaired ones, this takes all of them).
_JSONB_REJECTS = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
# orjson's refusal of a value nested deeper than 254 levels.
_ORJSON_TOO_DEEP = "Recursion limit reached"

APPLIED = "applied"
SKIPPED_STALE = "skipped_stale"
DUPLICATE = "duplicate"
HISTORY_ONLY = "history_only"
INVALID = "invalid"


@dataclass(frozen=True)
class EventResult:
    outcome: str
    # For INVALID: what to put on the dead-letter.
    error_class: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class ApplyResult:
    # One result per envelope, in the order given.
    results: list[EventResult]
    duration_s: float
    # True when Postgres rejected the batch and it was applied one message at a time.
    isolated: bool = False

    def counts(self) -> Counter[str]:
        return Counter(r.outcome for r in self.results)


async def apply_envelopes(conn: asyncpg.Connection, envelopes: Sequence[Envelope]) -> ApplyResult:
    """Apply a batch (in queue order) in one transaction; see the module docstring."""
    started = time.perf_counter()
    results: list[EventResult | None] = [None] * len(envelopes)
    valid: list[tuple[int, ConsumerEvent]] = []
    for index, envelope in enumerate(envelopes):
        try:
            valid.append((index, parse_envelope(envelope)))
        except Exception as exc:
            if classify(exc) is not Outcome.INVALID:
                raise
            results[index] = _invalid(exc)
    isolated = False
    if valid:
        events = [event for _, event in valid]
        try:
            outcomes = await _apply_batch(conn, events)
        except Exception as exc:
            if classify(exc) is not Outcome.INVALID:
                raise
            error_class, message = describe(exc)
            log.warning("batch_rejected_isolating", error_class=error_class, error_message=message)
            isolated = True
            outcomes = await _apply_one_by_one(conn, events)
        for (index, _), outcome in zip(valid, outcomes, strict=True):
            results[index] = outcome
    final = [r for r in results if r is not None]
    assert len(final) == len(envelopes)
    return ApplyResult(final, time.perf_counter() - started, isolated)


async def _apply_batch(conn: asyncpg.Connection, events: list[ConsumerEvent]) -> list[EventResult]:
    if conn.is_in_transaction():
        async with conn.transaction():  # a savepoint: a rejected batch leaves the caller's transaction usable
            return await _run(conn, events)
    return await _run(conn, events)


async def _apply_one_by_one(conn: asyncpg.Connection, events: list[ConsumerEvent]) -> list[EventResult]:
    results: dict[int, EventResult] = {}
    # Issue id order, queue order within an issue (a stable sort): the row locks of this one
    # transaction are then taken in the order the batch statement and forget-user take them.
    order = sorted(range(len(events)), key=lambda i: events[i].issue_id)
    async with conn.transaction():
        for i in order:
            try:
                async with conn.transaction():  # savepoint per message
                    (results[i],) = await _run(conn, [events[i]])
            except Exception as exc:
                if classify(exc) is not Outcome.INVALID:
                    raise
                results[i] = _invalid(exc)
    return [results[i] for i in range(len(events))]


async def _run(conn: asyncpg.Connection, events: list[ConsumerEvent]) -> list[EventResult]:
    # A delivery twice in one batch counts once; the other is a duplicate. Redelivered, it is the same
    # event, and the first one counts. Two events under one id (another producer reusing ids) keep the
    # newer, as two batches would: which one the row takes must not depend on how they were batched.
    distinct: dict[str, ConsumerEvent] = {}
    for event in events:
        kept = distinct.get(event.delivery_id)
        if kept is None or event.order_key > kept.order_key:
            distinct[event.delivery_id] = event
    unique = list(distinct.values())
    rows = await conn.fetch(queries.query("apply_batch"), *_arguments(coalesce(unique), unique))
    recorded = {row["delivery_id"]: (row["recorded"], row["applied"]) for row in rows}
    outcomes = []
    for event in events:
        was_recorded, applied = recorded[event.delivery_id]
        if distinct[event.delivery_id] is not event:
            outcomes.append(EventResult(DUPLICATE))
        elif not was_recorded:
            outcomes.append(EventResult(DUPLICATE))
        elif applied:
            outcomes.append(EventResult(APPLIED))
        elif not event.touches_row:
            outcomes.append(EventResult(HISTORY_ONLY))
        else:
            outcomes.append(EventResult(SKIPPED_STALE))
    return outcomes


def _json(value: Any, what: str) -> str | None:
    """JSON text for a jsonb argument.

    Raises :class:`InvalidMessage` for a value that can never be stored, which isolates its message
    (:func:`_apply_one_by_one`): text that is not Unicode (a lone surrogate, which jsonb refuses too)
    and nesting deeper than Python can encode. orjson stops at 254 levels, while the receiver and the
    decoders take bodies nested up to Python's recursion limit (about 1,000), which the PostgreSQL path
    stores whole: so deeper values are encoded by the standard library instead, and a body's unrelated
    ``\u0000`` (which sends its issue object this way) never makes a deep issue invalid. Jira's
    changelogs and issue objects nest a few tens of levels at most.
    """
    if value is None:
        return None
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:
        if _ORJSON_TOO_DEEP not in str(exc):
            raise InvalidMessage(f"{what} cannot be stored as JSON: {exc}") from None
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise InvalidMessage(f"{what} cannot be stored as JSON: nested too deeply") from None


def _invalid(exc: BaseException) -> EventResult:
    error_class, message = describe(exc)
    return EventResult(INVALID, error_class, message)


def _extractable(body: str) -> bool:
    """True when PostgreSQL reads this JSON text as jsonb whenever Python could decode it.

    jsonb rejects the escape of NUL (``\\u0000``) and unpaired UTF-16 surrogate escapes wherever they
    are in the body, while the Python path rejects them only in the issue object it writes. A body with
    either escape (or with a paired surrogate escape: the check stays one regex scan) takes the Python
    path (the issue object encoded in Python), so such a character outside the issue never makes an event
    invalid.
    """
    return _JSONB_REJECTS.search(body) is None


def _arguments(changes: list[IssueChange], events: list[ConsumerEvent]) -> list[list[Any]]:
    """The 46 arrays of ``apply_batch``: 34 per changed issue, then 12 per delivery.

    ``raw`` goes as the winning message's body (``fields_body``, PostgreSQL takes ``-> 'issue'``) rather
    than re-encoded in Python: encoding a 4-47 KB issue object was most of the Python time.
    """
    columns: list[list[Any]] = [[] for _ in range(46)]
    for change in changes:
        f, d, last = change.fields, change.delete, change.last
        row = f.row if f is not None else None
        values: list[Any] = [change.issue_id, f and f.version, f and f.tiebreak]
        fields_body = None
        if row is None:
            values += [None] * 22
        else:
            assert f is not None
            fields_body = f.body if _extractable(f.body) else None
            values += [
                row.issue_key,
                row.project_id,
                row.project_key,
                row.project_name,
                row.issue_number,
                row.summary,
                row.status,
                row.status_category,
                row.issue_type,
                row.priority,
                row.resolution,
                row.assignee_account_id,
                row.assignee_display_name,
                row.reporter_account_id,
                row.reporter_display_name,
                _json(row.labels, "labels"),
                row.created_at,
                row.updated_at,
                row.resolved_at,
                row.due_date and row.due_date.isoformat(),  # text: see apply_batch in queries.sql
                row.parent_key,
                None if fields_body is not None else _json(row.raw, "issue object"),
            ]
        values += [
            d and d.version,
            d and d.event_at,
            last and last.event_type,
            last and last.event_at,
            last and last.tiebreak,
            f and f.delivery_id,
            d and d.delivery_id,
            last and last.delivery_id,
            fields_body,
        ]
        for column, value in zip(columns[:34], values, strict=True):
            column.append(value)
    for event in events:
        values = [
            event.delivery_id,
            event.issue_id,
            event.event_type,
            event.issue_event_type_name,
            event.event_at,
            event.version,
            event.tiebreak,
            event.source,
            _json(event.changelog, "changelog items"),
            event.actor_account_id,
            event.actor_display_name,
            event.received_at,
        ]
        for column, value in zip(columns[34:], values, strict=True):
            column.append(value)
    return columns
