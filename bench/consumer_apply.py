"""Stage 1, the consumer's apply step (PostgreSQL only): events/s applied by
``consumer.apply.apply_envelopes`` on batches of 10 (one SQS receive) and 100, against

- the ceiling: a bare asyncpg ``unnest`` upsert of the same rows (the row each event carries, already
  extracted, so no JSON decoding, no version guard, no history row) in the same batch sizes;
- a naive consumer: one transaction per event (a guarded single-row upsert plus the history row),
  decoding each event with the same ``parse_envelope``.

Real event bodies (the full-issue webhooks of tests/fixtures, 4-47 KB), issue ids varied over a table
pre-filled with 100k rows; every event is newer than its row, so each one rewrites it. The variants
run interleaved within each round, each on its own events (fresh delivery ids, newer timestamps).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from bench.common import (
    BenchContext,
    Figure,
    StageResult,
    fmt_int,
    fmt_ratio,
    median,
    rate,
    ratio,
    scratch_database,
    spread,
)
from bench.events import BASE_TS_MS, envelopes
from bench.fill import fill_tasks
from consumer.apply import APPLIED, apply_envelopes
from consumer.event import ConsumerEvent, parse_envelope
from shared import db
from shared.envelope import Envelope
from shared.settings import DatabaseSettings

PREFILLED_ROWS = 100_000
BATCH_SIZES = (10, 100)
TARGET_OF_CEILING = 0.8
TARGET_OF_NAIVE = 5.0

_ROW_COLUMNS = (
    "issue_key, project_id, project_key, project_name, issue_number, summary, status, status_category, "
    "issue_type, priority, resolution, assignee_account_id, assignee_display_name, reporter_account_id, "
    "reporter_display_name"
)

# Both baselines overwrite every column of a conflicting row (the naive one behind its version guard).
_SET_EVERY_COLUMN = """ON CONFLICT (issue_id) DO UPDATE SET
    issue_key = excluded.issue_key, project_id = excluded.project_id, project_key = excluded.project_key,
    project_name = excluded.project_name, issue_number = excluded.issue_number, summary = excluded.summary,
    status = excluded.status, status_category = excluded.status_category, issue_type = excluded.issue_type,
    priority = excluded.priority, resolution = excluded.resolution,
    assignee_account_id = excluded.assignee_account_id,
    assignee_display_name = excluded.assignee_display_name,
    reporter_account_id = excluded.reporter_account_id,
    reporter_display_name = excluded.reporter_display_name,
    labels = excluded.labels, created_at = excluded.created_at, updated_at = excluded.updated_at,
    resolved_at = excluded.resolved_at, due_date = excluded.due_date, parent_key = excluded.parent_key,
    raw = excluded.raw, version = excluded.version, version_tiebreak = excluded.version_tiebreak,
    last_event_type = excluded.last_event_type, last_event_at = excluded.last_event_at,
    last_event_tiebreak = excluded.last_event_tiebreak, ingested_at = now()"""

# -- ceiling_upsert --
# The ceiling: the same rows as one unnest upsert per batch, nothing else (no guard, no history).
CEILING_UPSERT = f"""
INSERT INTO ap_jira_task AS t (
    issue_id, {_ROW_COLUMNS}, labels, created_at, updated_at, resolved_at, due_date, parent_key, raw,
    version, version_tiebreak, last_event_type, last_event_at, last_event_tiebreak
)
SELECT c.issue_id, c.issue_key, c.project_id, c.project_key, c.project_name, c.issue_number, c.summary,
       c.status, c.status_category, c.issue_type, c.priority, c.resolution, c.assignee_account_id,
       c.assignee_display_name, c.reporter_account_id, c.reporter_display_name,
       CASE WHEN c.labels_json IS NOT NULL
            THEN ARRAY(SELECT jsonb_array_elements_text(c.labels_json::jsonb)) END,
       c.created_at, c.updated_at, c.resolved_at, c.due_date, c.parent_key, c.raw_json::jsonb,
       c.version, c.version_tiebreak, c.last_event_type, c.last_event_at, c.last_event_tiebreak
FROM unnest(
    $1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::integer[], $7::text[], $8::text[],
    $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], $16::text[],
    $17::text[], $18::timestamptz[], $19::timestamptz[], $20::timestamptz[], $21::date[], $22::text[],
    $23::text[], $24::bigint[], $25::text[], $26::text[], $27::timestamptz[], $28::text[]
) AS c (
    issue_id, issue_key, project_id, project_key, project_name, issue_number, summary, status,
    status_category, issue_type, priority, resolution, assignee_account_id, assignee_display_name,
    reporter_account_id, reporter_display_name, labels_json, created_at, updated_at, resolved_at,
    due_date, parent_key, raw_json, version, version_tiebreak, last_event_type, last_event_at,
    last_event_tiebreak
)
ORDER BY c.issue_id
{_SET_EVERY_COLUMN}
"""

# -- naive_upsert --
# The naive consumer's row write: one event, guarded by its version.
NAIVE_UPSERT = f"""
INSERT INTO ap_jira_task AS t (
    issue_id, {_ROW_COLUMNS}, labels, created_at, updated_at, resolved_at, due_date, parent_key, raw,
    version, version_tiebreak, last_event_type, last_event_at, last_event_tiebreak
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21,
        $22, $23::text::jsonb, $24, $25, $26, $27, $28)
{_SET_EVERY_COLUMN}
WHERE (t.version, t.version_tiebreak COLLATE "C") < (excluded.version, excluded.version_tiebreak COLLATE "C")
"""

# -- naive_history --
NAIVE_HISTORY = """
INSERT INTO ap_jira_task_event (
    delivery_id, issue_id, event_type, issue_event_type_name, event_at, event_version, event_tiebreak,
    source, changelog, actor_account_id, actor_display_name, applied, received_at
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::jsonb, $10, $11, $12, $13)
ON CONFLICT (delivery_id) DO NOTHING
"""


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def row_values(event: ConsumerEvent) -> list[Any]:
    """The 28 values of one row, in CEILING_UPSERT / NAIVE_UPSERT order."""
    row = event.row
    assert row is not None, "the apply stage uses full-issue events only"
    return [
        event.issue_id,
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
        row.labels,
        row.created_at,
        row.updated_at,
        row.resolved_at,
        row.due_date,
        row.parent_key,
        _json(row.raw),
        event.version,
        event.tiebreak,
        event.event_type,
        event.event_at,
        event.tiebreak,
    ]


def ceiling_arguments(events: Sequence[ConsumerEvent]) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(28)]
    for event in events:
        values = row_values(event)
        values[16] = _json(values[16])  # labels as JSON text (a list inside text[] would be a 2-D array)
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def time_consumer(conn: asyncpg.Connection, batches: Sequence[Sequence[Envelope]]) -> float:
    """Seconds to apply every batch with the product's apply step; checks each event was applied."""
    started = time.perf_counter()
    for batch in batches:
        result = await apply_envelopes(conn, batch)
        if result.counts()[APPLIED] != len(batch):
            raise RuntimeError(f"apply_envelopes did not apply every event: {dict(result.counts())}")
    return time.perf_counter() - started


async def time_ceiling(conn: asyncpg.Connection, batches: list[list[list[Any]]]) -> float:
    statement = await conn.prepare(CEILING_UPSERT)
    started = time.perf_counter()
    for arguments in batches:
        await statement.fetch(*arguments)
    return time.perf_counter() - started


async def time_naive(conn: asyncpg.Connection, items: Sequence[Envelope]) -> float:
    """One transaction per event: decode, guarded upsert, history row, commit."""
    upsert = await conn.prepare(NAIVE_UPSERT)
    history = await conn.prepare(NAIVE_HISTORY)
    started = time.perf_counter()
    for envelope in items:
        event = parse_envelope(envelope)
        async with conn.transaction():
            await upsert.fetch(*row_values(event))
            await history.fetch(
                event.delivery_id,
                event.issue_id,
                event.event_type,
                event.issue_event_type_name,
                event.event_at,
                event.version,
                event.tiebreak,
                event.source,
                _json(event.changelog),
                event.actor_account_id,
                event.actor_display_name,
                True,
                event.received_at,
            )
    return time.perf_counter() - started


def time_parse(items: Sequence[Envelope]) -> float:
    """Seconds the consumer spends decoding the events alone (no database): one bound on its rate."""
    started = time.perf_counter()
    for envelope in items:
        parse_envelope(envelope)
    return time.perf_counter() - started


async def run(ctx: BenchContext) -> StageResult:
    rounds = ctx.runs(5, quick=2)
    per_run = 1_000 if ctx.quick else 6_000
    naive_per_run = 300 if ctx.quick else 2_000
    prefill = 10_000 if ctx.quick else PREFILLED_ROWS
    rates: dict[str, list[float]] = {f"consumer {b}": [] for b in BATCH_SIZES}
    rates.update({f"ceiling {b}": [] for b in BATCH_SIZES})
    rates["naive"] = []
    rates["decode only"] = []
    next_ts = BASE_TS_MS
    next_issue = 1
    async with scratch_database(ctx.dsn, "apply") as url:
        conn = await db.connect(DatabaseSettings(url=url))
        try:
            await fill_tasks(conn, 1, prefill, raw_pad_chars=2_000)

            def take(count: int) -> list[Envelope]:
                nonlocal next_ts, next_issue
                items = envelopes(
                    "full_issue",
                    count,
                    first_issue_id=next_issue,
                    issue_ids=min(count, prefill),
                    ts_ms=next_ts,
                )
                next_ts += count + 1_000
                next_issue = (next_issue + count) % (prefill - count) + 1
                return items

            for round_no in range(rounds):
                variants = [("consumer", b) for b in BATCH_SIZES] + [("ceiling", b) for b in BATCH_SIZES]
                variants.append(("naive", 1))
                shift = round_no % len(variants)
                for kind, size in variants[shift:] + variants[:shift]:  # rotate the order across rounds
                    if kind == "naive":
                        items = take(naive_per_run)
                        rates["naive"].append(rate(len(items), await time_naive(conn, items)))
                        continue
                    items = take(per_run)
                    batches = [list(b) for b in _chunks(items, size)]
                    if kind == "consumer":
                        elapsed = await time_consumer(conn, batches)
                    else:
                        parsed = [[parse_envelope(e) for e in b] for b in batches]
                        elapsed = await time_ceiling(conn, [ceiling_arguments(b) for b in parsed])
                    rates[f"{kind} {size}"].append(rate(len(items), elapsed))
                items = take(per_run)
                rates["decode only"].append(rate(len(items), time_parse(items)))
        finally:
            await conn.close()
    return from_raw(
        {
            "rates": rates,
            "rounds": rounds,
            "per_run": per_run,
            "naive_per_run": naive_per_run,
            "prefill": prefill,
        }
    )


def from_raw(raw: dict[str, Any]) -> StageResult:
    """The stage's figures and report from its measurements (also used to re-render a saved run)."""
    rates: dict[str, list[float]] = raw["rates"]
    rounds, per_run, naive_per_run, prefill = (
        raw["rounds"],
        raw["per_run"],
        raw["naive_per_run"],
        raw["prefill"],
    )
    result = StageResult(
        stage="consumer_apply",
        title="Consumer apply step (PostgreSQL)",
        table_header=("variant", "events/s: median (min-max, runs)"),
        raw=raw,
    )
    naive = median(rates["naive"])
    decode = median(rates["decode only"])
    for size in BATCH_SIZES:
        ours = median(rates[f"consumer {size}"])
        ceiling = median(rates[f"ceiling {size}"])
        of_ceiling = ratio(ours, ceiling)
        of_naive = ratio(ours, naive)
        result.figures.append(
            Figure(
                name=f"consumer_apply batch={size}",
                headline=(
                    f"{fmt_ratio(of_ceiling, TARGET_OF_CEILING)}x of ceiling "
                    f"({fmt_int(ours)} ev/s vs {fmt_int(ceiling)} ev/s), "
                    f"{of_naive:.1f}x naive ({fmt_int(naive)} ev/s)"
                ),
                target=f">={TARGET_OF_CEILING} of ceiling, >={TARGET_OF_NAIVE:g}x naive",
                passed=of_ceiling >= TARGET_OF_CEILING and of_naive >= TARGET_OF_NAIVE,
            )
        )
    for name, values in rates.items():
        result.table_rows.append((name, spread(values, "{:,.0f}")))
    result.method = (
        f"Table pre-filled with {prefill:,} rows (`bench/fill.py`), then {rounds} rounds; in each round "
        f"every variant applies its own {per_run:,} events ({naive_per_run:,} for the naive consumer), "
        "in an order rotated from round to round. Events are the full-issue webhooks of "
        "tests/fixtures/jira-webhooks (4-47 KB each) with issue ids spread over the pre-filled rows, "
        "fresh delivery ids and newer timestamps, so every event rewrites its row. "
        "`consumer N` = `consumer.apply.apply_envelopes` on batches of N (one transaction each: upsert "
        "with version guards + history rows). `ceiling N` = one bare `unnest` upsert per batch of N of "
        "the same rows, already extracted (no JSON decoding, no guard, no history row). `naive` = one "
        "transaction per event (decode, guarded upsert, history insert, commit). `decode only` = "
        "`consumer.event.parse_envelope` alone, no database: the consumer's CPU-side limit. "
        "synchronous_commit is the server's (on), so every commit waits for the WAL flush."
    )
    result.bounds = (
        "PostgreSQL on the same 2 cores bounds the ceiling (WAL writes of 4-47 KB rows, TOAST, index "
        "updates) and the naive consumer (one WAL flush per event). The consumer is bounded by both: it "
        "decodes every webhook in Python (JSON, routing, row extraction: the `decode only` rate) and "
        "then does more database work than the ceiling (the version guard and one history row per "
        f"event). The decode step alone runs at {fmt_int(decode)} ev/s here, so it takes "
        + "; ".join(
            f"{median(rates[f'consumer {b}']) / decode:.0%} of the consumer's time at batch {b}"
            for b in BATCH_SIZES
        )
        + "."
    )
    if not all(f.passed for f in result.figures):
        us = {k: 1e6 / median(v) for k, v in rates.items()}  # microseconds per event
        big = BATCH_SIZES[-1]
        rest_us = us[f"consumer {big}"] - us["decode only"]
        bound = us[f"ceiling {big}"] / (us[f"ceiling {big}"] + us["decode only"])
        ceiling_over_naive = us["naive"] / us[f"ceiling {BATCH_SIZES[0]}"]
        ceiling_over_naive_big = us["naive"] / us[f"ceiling {big}"]
        result.findings += [
            f"Where the consumer's time goes at batch {big}: {us[f'consumer {big}']:,.0f} us per event "
            f"in all, against {us[f'ceiling {big}']:,.0f} us for the ceiling. Decoding (`parse_envelope`: "
            "orjson decoding of a 4-47 KB body, pydantic routing, row extraction, SHA-256 of the body for "
            f"the tie-break) takes {us['decode only']:,.0f} us (the `decode only` row): work the ceiling, "
            "which is handed rows already decoded, never does. The rest, about "
            f"{rest_us:,.0f} us, is building the argument arrays and the `apply_batch` statement, "
            f"{rest_us / us[f'ceiling {big}']:.1f}x the ceiling's statement: it also writes one history "
            "row per event and evaluates the version guard per column.",
            f"Decoding alone caps the ratio at about {bound:.2f}x of the ceiling (ceiling / (ceiling + "
            "decode)), "
            + (
                f"below the {TARGET_OF_CEILING} target whatever the statement costs."
                if bound < TARGET_OF_CEILING
                else "so the rest of the gap is the statement's extra work, not decoding."
            )
            + " The naive consumer commits (and waits for a WAL flush) once per event, "
            f"{us['naive']:,.0f} us per event; batching saves that flush, which is what the ratio to "
            f"naive measures. The ceiling itself is {ceiling_over_naive:.1f}x naive at batch "
            f"{BATCH_SIZES[0]} and {ceiling_over_naive_big:.1f}x at batch {big}"
            + (
                f": on this machine {TARGET_OF_NAIVE:g}x naive is out of reach of a bare upsert too."
                if ceiling_over_naive_big < TARGET_OF_NAIVE
                else "."
            ),
            "Three ways to close the gap were measured outside this script and changed the ratio by "
            "less than run-to-run noise, so none is in the product: sending PostgreSQL only the issue "
            "object as `raw` instead of the whole body (the issue is most of the body, so the server "
            "parses almost as much JSON, and Python then pays orjson encoding); a selective parse that "
            "builds only the values the columns read (pydantic's JSON parser with every other key "
            "skipped: as slow as orjson building everything, since reading the text is the cost); and "
            "two batches at once on two connections, as the consumer's two pollers run (the ceiling on "
            "two connections speeds up as much). What remains is the decode, which the ceiling never "
            "does, and the version guard and history row, which are the product's idempotency and "
            "audit trail.",
            "Since migration 0010 both variants write `raw` compressed with LZ4 instead of pglz. "
            "Measured before it landed (2026-12-06, batch 100, 3 alternating runs on fresh tables), LZ4 "
            "cut the time per event by about 19% for the consumer (604 -> 491 us, medians) and 26% for "
            "the ceiling (351 -> 258 us). Compression is work both do, so it helps the ceiling more and "
            "the ratio does not improve.",
        ]
    return result
