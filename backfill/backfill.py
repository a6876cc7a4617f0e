"""``jiralake backfill``: every issue a JQL matches becomes a snapshot event on the FIFO queue.

One page at a time, in order: a fetcher task reads the next page from Jira while the current one
goes to SQS; the page's cursor is saved in Postgres only after SQS accepted all its messages (a send
SQS does not answer within PROMPT_CALL_TIMEOUT_S stops the run with that page not saved, see
backfill/enqueue.py). A restart with the same request continues from the saved cursor; a complete
run forgets the cursor and, when it covered everything since the previous watermark, stores its
start time as the new watermark for ``--updated-since last-run``.

PostgreSQL holds only that bookkeeping: each statement reads or writes one row by key, so each has
``db.STATEMENT_TIMEOUT_S`` (a minute) to answer. A server that stops answering ends the command in one
line (exit 1) rather than leave it waiting for ever: every page SQS accepted stays enqueued, and the
cursor is never ahead of them (saved only after SQS accepted the page), so a rerun resumes after the
last page saved, and a page sent again changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Literal, TextIO

import asyncpg
import structlog

from backfill import state
from backfill.enqueue import QueueUnavailable, Refused, max_entry_bytes, send_envelopes
from backfill.jira_client import JiraClient, JiraError, JiraRequestError, SearchPage, Sleep
from backfill.jql import WATERMARK_OVERLAP, build_jql, jira_zone
from backfill.progress import Progress
from backfill.settings import BackfillSettings
from backfill.snapshot import InvalidSnapshot, snapshot_envelope
from shared import aws, db
from shared.envelope import Envelope
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()

LAST_RUN: Final = "last-run"
# Pages read ahead of the one being sent: Jira and SQS work at the same time, memory stays bounded.
PREFETCH_PAGES = 1
# What a backfill PostgreSQL stopped answering leaves (db.unanswered_error).
UNANSWERED_OUTCOME = (
    "every page SQS accepted stays enqueued, and a rerun resumes after the last page whose place was "
    "saved (a page sent again changes nothing)"
)

Since = datetime | Literal["last-run"] | None


@dataclass(frozen=True)
class BackfillRequest:
    jql: str | None = None
    updated_since: Since = None
    # Jira's ``expand`` for search, e.g. "changelog" (the issue then carries its recent history).
    expand: str | None = None
    restart: bool = False
    dry_run: bool = False


@dataclass
class BackfillSummary:
    jql: str
    dry_run: bool = False
    total: int | None = None
    resumed_after_page: int | None = None
    pages: int = 0
    sent: int = 0
    issues_sent_total: int = 0
    refused: list[Refused] = field(default_factory=list)
    # Snapshots an earlier process of this (resumed) run did not enqueue: listed when that one stopped.
    refused_before_resume: int = 0
    complete: bool = False
    watermark: datetime | None = None
    duration_s: float = 0.0
    jira_retries: int = 0
    # A resumed run whose saved nextPageToken Jira no longer accepted, and so began again at page one.
    restarted_after_expired_token: bool = False


async def run_backfill(
    settings: BackfillSettings,
    request: BackfillRequest,
    *,
    sleep: Sleep = asyncio.sleep,
    progress_stream: TextIO | None = None,
    progress_tty: bool | None = None,
) -> BackfillSummary:
    started_mono = time.monotonic()
    started_at = datetime.now(UTC)
    key = state.RunKey(
        jira_url=settings.jira.url,
        request_jql=(request.jql or "").strip(),
        updated_since=_since_key(request.updated_since),
        expand=request.expand or "",
    )
    summary = BackfillSummary(jql="", dry_run=request.dry_run)
    # postgres() around PostgreSQL's statements only: a TimeoutError elsewhere (Jira, SQS) is not its.
    conn, postgres = await db.connect_bounded(settings.database)
    try:
        async with JiraClient(settings.jira, sleep=sleep) as jira, aws.sqs_client(settings.aws) as sqs:
            me = await jira.myself()
            zone = jira_zone(me.get("timeZone"))
            with postgres():
                run = None if request.restart else await state.load_run(conn, key)
            if run is None:
                with postgres():
                    covers_from = await _covers_from(conn, key, request.updated_since)
                effective = build_jql(request.jql, updated_since=covers_from, zone=zone)
                if request.dry_run:
                    summary.jql = effective
                    summary.total = await jira.count(effective)
                    return summary
                with postgres():
                    run = await state.start_run(
                        conn, key, effective_jql=effective, covers_from=covers_from, started_at=started_at
                    )
            else:
                summary.resumed_after_page = run.pages_done
                summary.refused_before_resume = run.issues_refused
                if request.dry_run:
                    summary.jql = run.effective_jql
                    summary.total = await jira.count(run.effective_jql)
                    return summary
            summary.jql = run.effective_jql
            summary.issues_sent_total = run.issues_sent
            log.info(
                "backfill_started",
                jql=run.effective_jql,
                resumed_after_page=summary.resumed_after_page,
                deployment=settings.jira.deployment,
            )
            progress = Progress(total=None, done=run.issues_sent, stream=progress_stream, tty=progress_tty)
            try:
                limit = await max_entry_bytes(sqs, settings.queue_url)
                job = _Job(settings, request, key, jira, sqs, conn, postgres, progress, summary, sleep, limit)
                await _send_remaining_pages(job, run)
            except (JiraError, QueueUnavailable) as exc:
                # Said only when there is something to resume: a failed first page has none.
                saved = summary.pages
                if not summary.restarted_after_expired_token:
                    saved += summary.resumed_after_page or 0
                if saved:
                    exc.add_note(
                        f"{saved} page(s) already enqueued are saved: run the same command to resume"
                    )
                raise
            summary.jira_retries = jira.retries
            return summary
    except db.Unanswered as exc:
        raise db.unanswered_error(exc, UNANSWERED_OUTCOME) from None
    finally:
        await db.close(conn)
        summary.duration_s = time.monotonic() - started_mono


@dataclass(frozen=True)
class _Job:
    """What the page loop of one backfill command works with (the run's saved state apart)."""

    settings: BackfillSettings
    request: BackfillRequest
    key: state.RunKey
    jira: JiraClient
    sqs: SQSClient
    conn: asyncpg.Connection
    # ``with job.postgres():`` around PostgreSQL's statements (db.unanswered_raised).
    postgres: Callable[[], contextlib.AbstractContextManager[None]]
    progress: Progress
    summary: BackfillSummary
    sleep: Sleep
    max_entry_bytes: int  # what one message may count on this queue


async def _send_remaining_pages(job: _Job, run: state.RunState) -> None:
    """Every page after the saved cursor, then the run's end (cursor forgotten, watermark)."""
    if job.settings.jira.deployment == "cloud":
        job.summary.total = await job.jira.count(run.effective_jql)
        job.progress.set_total(job.summary.total)
    try:
        if not run.fetched_all_pages:
            try:
                await _pages_to_queue(job, run)
            except JiraRequestError as exc:
                if not _saved_token_refused(job.settings, run, job.summary, exc):
                    raise
                # Cloud's nextPageToken expires after 7 days: start the same run again at
                # page one (same JQL and start time); the pages re-sent are duplicates.
                log.warning("backfill_token_expired", reason=exc.reason, pages_done=run.pages_done)
                with job.postgres():
                    run = await state.start_run(
                        job.conn,
                        job.key,
                        effective_jql=run.effective_jql,
                        covers_from=run.covers_from,
                        started_at=run.started_at,
                    )
                job.summary.restarted_after_expired_token = True
                job.summary.issues_sent_total = 0
                job.summary.refused_before_resume = 0
                await _pages_to_queue(job, run)
    finally:
        job.progress.finish()  # ends the bar's line before an error message, too
    with job.postgres():
        await _finish(job.conn, job.key, run, job.summary)


async def _pages_to_queue(job: _Job, run: state.RunState) -> None:
    pages: asyncio.Queue[SearchPage | BaseException | None] = asyncio.Queue(maxsize=PREFETCH_PAGES)

    async def fetch_pages() -> None:
        cursor = run.next_cursor
        try:
            while True:
                page = await job.jira.search_page(run.effective_jql, cursor, expand=job.request.expand)
                await pages.put(page)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            await pages.put(None)
        except Exception as exc:  # handed to the sender, which raises it after the pages before it
            await pages.put(exc)

    fetcher = asyncio.create_task(fetch_pages(), name="backfill-page-fetcher")
    pages_done = run.pages_done
    try:
        while True:
            item = await pages.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            if item.total is not None:
                job.summary.total = item.total
                job.progress.set_total(item.total)
            envelopes = _envelopes(item, job.summary)
            outcome = await send_envelopes(
                job.sqs,
                job.settings.queue_url,
                envelopes,
                attempts=job.settings.sqs_attempts,
                sleep=job.sleep,
                max_bytes=job.max_entry_bytes,
                call_timeout_s=PROMPT_CALL_TIMEOUT_S,
            )
            job.summary.refused.extend(outcome.refused)
            for refused in outcome.refused:
                log.warning("snapshot_refused", issue_id=refused.issue_id, reason=refused.reason)
            pages_done += 1
            job.summary.pages += 1
            job.summary.sent += outcome.sent
            job.summary.issues_sent_total += outcome.sent
            with job.postgres():
                await state.save_page(
                    job.conn,
                    job.key,
                    next_cursor=item.next_cursor,
                    pages_done=pages_done,
                    issues_sent=job.summary.issues_sent_total,
                    issues_refused=job.summary.refused_before_resume + len(job.summary.refused),
                )
            job.progress.advance(len(item.issues))
    finally:
        fetcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fetcher


def _envelopes(page: SearchPage, summary: BackfillSummary) -> list[Envelope]:
    now_ms = int(time.time() * 1000)
    envelopes: list[Envelope] = []
    for issue in page.issues:
        try:
            envelopes.append(snapshot_envelope(issue, received_at_ms=now_ms))
        except InvalidSnapshot as exc:
            issue_id = str(issue.get("id", "?"))[:40]
            summary.refused.append(Refused(issue_id, str(exc)))
            log.warning("snapshot_invalid", issue_id=issue_id, reason=str(exc))
    return envelopes


async def _covers_from(conn: asyncpg.Connection, key: state.RunKey, since: Since) -> datetime | None:
    if not isinstance(since, str):
        return since
    watermark = await state.load_watermark(conn, key.jira_url, key.request_jql)
    if watermark is None:
        log.info("no_watermark", detail="no complete backfill of this JQL yet: fetching every issue")
        return None
    return watermark - WATERMARK_OVERLAP


async def _finish(
    conn: asyncpg.Connection, key: state.RunKey, run: state.RunState, summary: BackfillSummary
) -> None:
    """Forget the cursor; store a watermark when the run reached back at least to the previous one (a
    later --updated-since date would leave a gap). A refused snapshot (too large for SQS, no
    ``updated``) does not hold it back: the refusal is the issue's own, fetching it again unchanged
    would be refused again, and once it changes its ``updated`` is past the watermark, so the next
    last-run fetches it. Held back, one such issue turned every last-run into a full scan."""
    previous = await state.load_watermark(conn, key.jira_url, key.request_jql)
    store = run.covers_from is None or (previous is not None and run.covers_from <= previous)
    await state.finish_run(conn, key, run, issues_sent=summary.issues_sent_total, store_watermark=store)
    summary.complete = True
    summary.watermark = run.started_at if store else None
    log.info(
        "backfill_finished",
        pages=summary.pages,
        sent=summary.sent,
        refused=len(summary.refused),
        watermark=summary.watermark.isoformat() if summary.watermark else None,
    )


def _saved_token_refused(
    settings: BackfillSettings, run: state.RunState, summary: BackfillSummary, exc: JiraRequestError
) -> bool:
    """Jira answered 400 to the very first request of a Cloud run resumed at a saved token: the
    token expired (or is invalid). Page one with the same JQL is then worth one try."""
    return (
        settings.jira.deployment == "cloud"
        and exc.status == 400
        and run.next_cursor is not None
        and summary.pages == 0
    )


def _since_key(since: Since) -> str:
    if since is None:
        return ""
    if isinstance(since, str):
        return since
    return since.astimezone(UTC).isoformat()
