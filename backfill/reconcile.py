"""``jiralake reconcile``: find issues the table holds alive that Jira no longer has, and replay the
webhooks Jira gave up delivering (where Jira lets us read them).

Deletes: the ids Jira returns for the JQL (ids only, the cheapest search) are compared with the
live rows of ``ap_jira_task``. Every live row missing from Jira's answer is looked up by id; only
404 counts as deleted and becomes a delete event on the queue (the consumer applies it like any
other event). 401/403 mean the account lost access: reported, never deleted. 200 means the issue
exists but the JQL does not match it: left alone. More 404s than ``max_deletes`` withholds every
delete: Jira also answers 404 for issues the account may not browse, so a sudden flood of them
usually means lost permissions, not deletions. So does a search that returns no issue at all while
the table holds live rows: every row then answers 404 to an account that lost access, however few
there are, so that withholds every delete too unless ``allow_empty_search`` says every issue of the
JQL really is gone (a limit raised for a big deletion must not waive it).

Failed webhooks: Jira Cloud's ``GET /rest/api/3/webhook/failed`` lists deliveries that failed after
all retries, with their bodies, for up to 72 hours. Jira serves it only to Connect apps, for the
app's own webhooks; for webhooks an admin registered (the usual setup for jiralake) and on Data
Center there is no such list, and the report says so. Backfill with ``--updated-since`` over the
outage window repairs those updates; reconcile repairs their deletes.

PostgreSQL: the live rows are read LIVE_WINDOW_ROWS at a time by key, and the failed-webhook cursor is
one row, so every statement reads or writes a bounded number of rows and has ``db.STATEMENT_TIMEOUT_S``
(a minute) to answer. A server that stops answering ends the command in one line (exit 1) rather
than leave it waiting for ever: what was enqueued stays enqueued, and a rerun sends only what it still
finds missing (a message sent again changes nothing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO, TypeVar

import asyncpg
import structlog

from backfill import state
from backfill.enqueue import QueueUnavailable, max_entry_bytes, send_envelopes
from backfill.jira_client import (
    FailedWebhookPage,
    JiraClient,
    JiraError,
    JiraRequestError,
    JiraUnavailable,
    Sleep,
)
from backfill.jql import build_jql
from backfill.progress import Progress
from backfill.settings import BackfillSettings
from backfill.snapshot import reconciled_delete_envelope
from shared import aws, db, strict_json
from shared.envelope import Envelope, delivery_id_for, sqs_safe_json
from shared.jira_event import ISSUE_EVENT_PREFIXES, InvalidEvent, Routed, route
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()

DEFAULT_MAX_DELETES = 100
# Events a replayed webhook may carry: the ones Jira sends (never jiralake's own).
WEBHOOK_EVENT_PREFIXES = tuple(p for p in ISSUE_EVENT_PREFIXES if not p.startswith("jiralake:"))

# The live rows are read this many rows a statement (by primary key: milliseconds; a second or two
# from a cold disk), so that no statement reads the whole table, however large.
LIVE_WINDOW_ROWS = 10_000
# What a reconcile PostgreSQL stopped answering leaves (db.unanswered_error).
UNANSWERED_OUTCOME = (
    "what was enqueued stays enqueued, and a rerun sends only what it still finds missing (a message "
    "sent again changes nothing)"
)

# -- live_rows --
# The next $2 rows after issue_id $1 (NULL: from the first), deleted ones too, so that a statement reads
# at most $2 rows however many are deleted: the caller keeps the live ones.
_LIVE_ROWS = """
SELECT issue_id, issue_key, coalesce(version, 0) AS version, is_deleted
FROM ap_jira_task
WHERE issue_id > coalesce($1::bigint, -9223372036854775808)
ORDER BY issue_id
LIMIT $2
"""


@dataclass(frozen=True)
class ReconcileRequest:
    jql: str | None = None
    dry_run: bool = False
    max_deletes: int = DEFAULT_MAX_DELETES
    # The operator said every issue really is gone: deletes go ahead even when Jira's search returned
    # no issue at all (which is also what an account that lost access sees).
    allow_empty_search: bool = False
    replay_failed_webhooks: bool = True


@dataclass(frozen=True)
class Finding:
    issue_id: str
    issue_key: str | None
    # HTTP status of GET issue/{id}: 404 deleted, 401/403 no access, 200 exists outside the JQL,
    # 0 when the lookup itself kept failing.
    status: int
    detail: str = ""
    # The row's version when it was read: names the delete (see reconciled_delete_envelope).
    row_version: int = 0


@dataclass
class FailedWebhookReport:
    available: bool
    reason: str = ""
    listed: int = 0
    replayed: int = 0
    ignored: int = 0
    without_body: list[str] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ReconcileSummary:
    jql: str
    dry_run: bool
    jira_ids: int = 0
    live_rows: int = 0
    deleted: list[Finding] = field(default_factory=list)
    forbidden: list[Finding] = field(default_factory=list)
    still_exist: list[Finding] = field(default_factory=list)
    lookup_failed: list[Finding] = field(default_factory=list)
    deletes_enqueued: int = 0
    deletes_withheld: bool = False
    # Why, when withheld.
    withheld_because: str = ""
    failed_webhooks: FailedWebhookReport | None = None
    # Why replaying the failed webhooks stopped (Jira's list unusable, SQS unavailable), after the
    # deletes above were already decided and enqueued.
    failed_webhooks_error: str | None = None

    @property
    def candidates(self) -> int:
        return len(self.deleted) + len(self.forbidden) + len(self.still_exist) + len(self.lookup_failed)


async def run_reconcile(
    settings: BackfillSettings,
    request: ReconcileRequest,
    *,
    sleep: Sleep = asyncio.sleep,
    progress_stream: TextIO | None = None,
    progress_tty: bool | None = None,
) -> ReconcileSummary:
    jql = build_jql(request.jql)
    summary = ReconcileSummary(jql=jql, dry_run=request.dry_run)
    # postgres() around PostgreSQL's statements only: a TimeoutError elsewhere (Jira, SQS) is not its.
    conn, postgres = await db.connect_bounded(settings.database)
    try:
        async with JiraClient(settings.jira, sleep=sleep) as jira, aws.sqs_client(settings.aws) as sqs:
            await jira.myself()
            jira_ids = await _jira_ids(
                jira, jql, Progress(unit="ids", stream=progress_stream, tty=progress_tty)
            )
            summary.jira_ids = len(jira_ids)
            with postgres():
                rows = await live_rows(conn)
            summary.live_rows = len(rows)
            missing = [
                (str(r["issue_id"]), r["issue_key"], r["version"])
                for r in rows
                if r["issue_id"] not in jira_ids
            ]
            log.info("reconcile_compared", jira_ids=len(jira_ids), live_rows=len(rows), missing=len(missing))
            findings = await bounded_map(
                missing, lambda item: _look_up(jira, *item), settings.jira.max_concurrency
            )
            _classify(findings, summary)
            await _enqueue_deletes(settings, request, sqs, summary, sleep)
            if request.replay_failed_webhooks:
                try:
                    summary.failed_webhooks = await _replay_failed_webhooks(
                        settings, request, jira, sqs, conn, postgres, sleep
                    )
                except (JiraError, QueueUnavailable) as exc:
                    # Reported with the rest (what the delete step did stands), not instead of it.
                    summary.failed_webhooks_error = str(exc)
                    log.warning("reconcile_failed_webhooks_stopped", error=str(exc))
    except db.Unanswered as exc:
        raise db.unanswered_error(exc, UNANSWERED_OUTCOME) from None
    finally:
        await db.close(conn)
    return summary


async def live_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every row of ap_jira_task not deleted, in issue_id order, LIVE_WINDOW_ROWS a statement."""
    window_rows = LIVE_WINDOW_ROWS  # read at the call: tests lower it
    live: list[asyncpg.Record] = []
    after: int | None = None
    while True:
        rows = await conn.fetch(_LIVE_ROWS, after, window_rows)
        live += [row for row in rows if not row["is_deleted"]]
        if len(rows) < window_rows:
            return live
        after = rows[-1]["issue_id"]


async def _jira_ids(jira: JiraClient, jql: str, progress: Progress) -> set[int]:
    """Every id the JQL matches, ids only (Cloud ``fields=id``; the largest pages Jira allows)."""
    ids: set[int] = set()
    cursor: str | None = None
    while True:
        page = await jira.search_page(jql, cursor, fields="id", page_size=jira.settings.id_page_size)
        if page.total is not None:
            progress.set_total(page.total)
        for issue in page.issues:
            issue_id = str(issue.get("id", "")).strip()
            if issue_id.isascii() and issue_id.isdigit():  # not "²", which isdigit() takes
                ids.add(int(issue_id))
        progress.advance(len(page.issues))
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    progress.finish()
    return ids


async def _look_up(jira: JiraClient, issue_id: str, issue_key: str | None, row_version: int) -> Finding:
    try:
        status = await jira.issue_status(issue_id)
    except (JiraUnavailable, JiraRequestError) as exc:
        return Finding(issue_id, issue_key, 0, str(exc), row_version)
    return Finding(issue_id, issue_key, status, row_version=row_version)


def _classify(findings: Sequence[Finding], summary: ReconcileSummary) -> None:
    for finding in sorted(findings, key=lambda f: int(f.issue_id)):
        if finding.status == 404:
            summary.deleted.append(finding)
        elif finding.status in (401, 403):
            summary.forbidden.append(finding)
            log.warning("reconcile_no_access", issue_id=finding.issue_id, status=finding.status)
        elif finding.status == 0:
            summary.lookup_failed.append(finding)
        else:
            summary.still_exist.append(finding)


async def _enqueue_deletes(
    settings: BackfillSettings,
    request: ReconcileRequest,
    sqs: SQSClient,
    summary: ReconcileSummary,
    sleep: Sleep,
) -> None:
    if not summary.deleted:
        return
    # The guard first, also for a dry run: it shows what the real run would do.
    reason = _withhold_reason(request, summary)
    if reason:
        summary.deletes_withheld, summary.withheld_because = True, reason
        log.warning("reconcile_deletes_withheld", deletes=len(summary.deleted), reason=reason)
        return
    if request.dry_run:
        return
    now_ms = int(time.time() * 1000)
    envelopes = [
        reconciled_delete_envelope(f.issue_id, f.issue_key, row_version=f.row_version, now_ms=now_ms)
        for f in summary.deleted
    ]
    outcome = await send_envelopes(
        sqs,
        settings.queue_url,
        envelopes,
        attempts=settings.sqs_attempts,
        sleep=sleep,
        call_timeout_s=PROMPT_CALL_TIMEOUT_S,
    )
    summary.deletes_enqueued = outcome.sent
    for finding in summary.deleted:
        log.info("reconcile_deleted", issue_id=finding.issue_id, issue_key=finding.issue_key)


def _withhold_reason(request: ReconcileRequest, summary: ReconcileSummary) -> str:
    """Why no delete may go out, or "" (Jira answers 404 to an account that lost access, too)."""
    deletes = len(summary.deleted)
    if deletes > request.max_deletes:
        return f"{deletes} issues answered 404, more than --max-deletes {request.max_deletes}"
    if summary.jira_ids == 0 and not request.allow_empty_search:
        return (
            f"Jira's search returned no issue at all, and all {deletes} live rows it was asked about "
            "answered 404"
        )
    return ""


async def _replay_failed_webhooks(
    settings: BackfillSettings,
    request: ReconcileRequest,
    jira: JiraClient,
    sqs: SQSClient,
    conn: asyncpg.Connection,
    postgres: Callable[[], AbstractContextManager[None]],
    sleep: Sleep,
) -> FailedWebhookReport:
    """``with postgres():`` around PostgreSQL's statements (db.unanswered_raised)."""
    with postgres():
        after_ms = await state.load_failed_webhook_cursor(conn, settings.jira.url)
    report = FailedWebhookReport(available=True)
    limit: int | None = None  # what a message may count on the queue, asked before the first send
    while True:
        page = await jira.failed_webhooks(after_ms)
        if not isinstance(page, FailedWebhookPage):
            report.available = False
            report.reason = f"HTTP {page.status}: {page.reason}"
            log.info("failed_webhooks_unavailable", status=page.status, reason=page.reason)
            return report
        envelopes = _replayable(page, report)
        if envelopes and not request.dry_run:
            if limit is None:
                limit = await max_entry_bytes(sqs, settings.queue_url)
            outcome = await send_envelopes(
                sqs,
                settings.queue_url,
                envelopes,
                attempts=settings.sqs_attempts,
                sleep=sleep,
                max_bytes=limit,
                call_timeout_s=PROMPT_CALL_TIMEOUT_S,
            )
            report.replayed += outcome.sent
            report.invalid += [(r.issue_id, r.reason) for r in outcome.refused]
        elif request.dry_run:
            report.replayed += len(envelopes)
        times = [t for t in (_failure_ms(v) for v in page.values) if t is not None]
        if times and after_ms is not None and max(times) <= after_ms and len(page.values) >= page.max_results:
            raise JiraError(
                f"Jira's failed-webhook list, asked for failures after {after_ms}, answered a full page "
                "of none later: the list cannot be paged (it would be read forever)"
            )
        if times:
            after_ms = max(times)
            if not request.dry_run:
                with postgres():
                    await state.store_failed_webhook_cursor(conn, settings.jira.url, after_ms)
        if not page.values or len(page.values) < page.max_results or not times:
            return report


def _replayable(page: FailedWebhookPage, report: FailedWebhookReport) -> list[Envelope]:
    now_ms = int(time.time() * 1000)
    envelopes: list[Envelope] = []
    report.listed += page.not_objects
    report.invalid += [("?", "an entry of the list that is not a JSON object")] * page.not_objects
    for entry in page.values:
        report.listed += 1
        webhook_id = str(entry.get("id") or "").strip()
        body = entry.get("body")
        if not isinstance(body, str) or not body.strip():
            report.without_body.append(webhook_id or "?")
            continue
        try:
            routed = route(strict_json.loads(body), WEBHOOK_EVENT_PREFIXES)
        except (ValueError, RecursionError, InvalidEvent) as exc:
            report.invalid.append((webhook_id or "?", str(exc)[:200]))
            continue
        if not isinstance(routed, Routed):
            report.ignored += 1
            continue
        envelopes.append(
            Envelope(
                body=sqs_safe_json(body),
                event_type=routed.event_type,
                issue_id=routed.issue_id,
                event_ts_ms=routed.event_ts_ms or _failure_ms(entry) or now_ms,
                received_at_ms=now_ms,
                # The id Jira sent as X-Atlassian-Webhook-Identifier: the receiver's delivery id, so
                # a delivery that did arrive after all is a duplicate, not a second event.
                delivery_id=delivery_id_for(webhook_id or None, body),
            )
        )
    return envelopes


def _failure_ms(entry: dict[str, object]) -> int | None:
    value = entry.get("failureTime")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


T = TypeVar("T")
R = TypeVar("R")


async def bounded_map(items: Sequence[T], fn: Callable[[T], Awaitable[R]], concurrency: int) -> list[R]:
    """``fn`` over ``items`` with at most ``concurrency`` calls in flight (a fixed pool of workers)."""
    results: list[R] = []
    iterator = iter(items)

    async def worker() -> None:
        for item in iterator:
            results.append(await fn(item))

    workers = [
        asyncio.create_task(worker(), name=f"reconcile-lookup-{n}")
        for n in range(max(1, min(concurrency, len(items))))
    ]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
    return results
