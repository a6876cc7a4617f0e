"""``jiralake backfill`` and ``jiralake reconcile``: parse, run, print a summary.

Bad input (no Jira URL or credentials, a bad ``--updated-since``, Jira answering 401) ends in one
line on stderr and a non-zero exit, never a traceback; so do SQS not answering a send within
PROMPT_CALL_TIMEOUT_S and PostgreSQL not answering a statement within db.STATEMENT_TIMEOUT_S (exit 1:
backfill/enqueue.py, run_backfill and run_reconcile say what that left done). Neither command handles
signals: SIGTERM ends it at once (143), Ctrl-C within db.CLOSE_TIMEOUT_S (130).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from backfill.backfill import LAST_RUN, BackfillRequest, BackfillSummary, Since, run_backfill
from backfill.enqueue import QueueUnavailable
from backfill.jira_client import JiraError
from backfill.jql import parse_since
from backfill.reconcile import DEFAULT_MAX_DELETES, Finding, ReconcileRequest, ReconcileSummary, run_reconcile
from backfill.settings import BackfillSettings
from shared import argtypes
from shared.db import STATEMENT_TIMEOUT_S
from shared.errors import CommandError
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S

_ENV_HELP = (
    "Jira: JIRALAKE_JIRA_URL, and JIRALAKE_JIRA_EMAIL + JIRALAKE_JIRA_API_TOKEN (Cloud) or "
    "JIRALAKE_JIRA_PAT (Data Center). Queue: JIRALAKE_QUEUE_URL, JIRALAKE_DLQ_URL. Postgres: "
    "DATABASE_URL or PG*."
)
_UNANSWERED_HELP = (
    f"SQS not answering a send within {PROMPT_CALL_TIMEOUT_S:g} s, or PostgreSQL unreachable or not "
    f"answering a statement within {STATEMENT_TIMEOUT_S:g} s (what was sent stays sent: run the same "
    "command again)"
)
BACKFILL_EXIT_CODES_HELP = (
    "Exit codes: 0 done (also with --dry-run); 2 bad configuration or --updated-since; 1 Jira or SQS "
    f"failed, credentials rejected, issues that could not be enqueued, {_UNANSWERED_HELP}; 130/143 "
    "stopped by SIGINT/SIGTERM (the same command resumes after the last saved page)."
)
RECONCILE_EXIT_CODES_HELP = (
    "Exit codes: 0 done (also with --dry-run); 2 bad configuration or arguments; 1 Jira or SQS failed, "
    "deletes withheld (more 404s than --max-deletes, or an empty search), rows that could not be "
    f"checked, the failed-webhook replay stopped, {_UNANSWERED_HELP}; 130/143 stopped by SIGINT/SIGTERM."
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backfill = subparsers.add_parser(
        "backfill",
        help="enqueue a snapshot of every issue a JQL matches (resumable)",
        description="Pull issues from the Jira REST API and put each on the queue as a snapshot "
        "event; the consumer applies it unless the table already holds a newer version. "
        "A restarted run with the same arguments continues from its last saved page. " + _ENV_HELP,
        epilog=BACKFILL_EXIT_CODES_HELP,
    )
    backfill.add_argument(
        "--jql", type=argtypes.non_blank, help="issues to fetch (default: every issue the account can browse)"
    )
    backfill.add_argument(
        "--updated-since",
        metavar="DATE|last-run",
        help="only issues updated since a date (2024-05-01, or ISO 8601 time; UTC unless it has an "
        "offset) or since the start of the last complete backfill of the same JQL (last-run)",
    )
    backfill.add_argument(
        "--changelog", action="store_true", help="ask Jira for each issue's changelog too (expand=changelog)"
    )
    backfill.add_argument(
        "--restart", action="store_true", help="ignore a saved cursor and start at page one"
    )
    backfill.add_argument(
        "--dry-run", action="store_true", help="print the JQL and how many issues match; enqueue nothing"
    )
    backfill.set_defaults(func=_backfill_command)

    reconcile = subparsers.add_parser(
        "reconcile",
        help="mark issues Jira deleted (404) as deleted; replay Jira's failed webhooks where it lists them",
        description="Compare the ids Jira returns for a JQL with the live rows of ap_jira_task; look up "
        "each missing one, and enqueue a delete event only when Jira answers 404. " + _ENV_HELP,
        epilog=RECONCILE_EXIT_CODES_HELP,
    )
    reconcile.add_argument(
        "--jql",
        type=argtypes.non_blank,
        help="issues Jira should have (default: every issue the account can browse)",
    )
    reconcile.add_argument("--dry-run", action="store_true", help="print what would change; enqueue nothing")
    reconcile.add_argument(
        "--max-deletes",
        type=int,
        metavar="N",
        help=f"withhold all deletes when more than N issues answer 404 (default {DEFAULT_MAX_DELETES})",
    )
    reconcile.add_argument(
        "--allow-empty-search",
        action="store_true",
        help="let deletes go ahead even when Jira's search returns no issue at all (every issue of "
        "the JQL really is gone); without it such a run withholds them, as an account that lost "
        "access sees the same",
    )
    reconcile.add_argument(
        "--skip-failed-webhooks", action="store_true", help="do not read Jira Cloud's failed-webhook list"
    )
    reconcile.set_defaults(func=_reconcile_command)


def _backfill_command(args: argparse.Namespace) -> int:
    since = _since(args.updated_since)
    settings = BackfillSettings.from_env(os.environ)
    request = BackfillRequest(
        jql=args.jql,
        updated_since=since,
        expand="changelog" if args.changelog else None,
        restart=args.restart,
        dry_run=args.dry_run,
    )
    try:
        summary = asyncio.run(run_backfill(settings, request, progress_stream=sys.stderr))
    except (JiraError, QueueUnavailable) as exc:
        # run_backfill notes on the error when saved pages make a rerun resume.
        notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
        raise CommandError(f"{exc}{notes}") from None
    print("\n".join(backfill_report(summary)))
    if summary.refused or summary.refused_before_resume:
        raise CommandError(
            f"{len(summary.refused) + summary.refused_before_resume} issues could not be enqueued "
            "(listed above, or in the snapshot_refused log lines of the run before the resume)"
        )
    return 0


def _reconcile_command(args: argparse.Namespace) -> int:
    if args.max_deletes is not None and args.max_deletes < 0:
        raise CommandError("--max-deletes must be >= 0", exit_code=2)
    settings = BackfillSettings.from_env(os.environ)
    request = ReconcileRequest(
        jql=args.jql,
        dry_run=args.dry_run,
        max_deletes=DEFAULT_MAX_DELETES if args.max_deletes is None else args.max_deletes,
        allow_empty_search=args.allow_empty_search,
        replay_failed_webhooks=not args.skip_failed_webhooks,
    )
    try:
        summary = asyncio.run(run_reconcile(settings, request, progress_stream=sys.stderr))
    except (JiraError, QueueUnavailable) as exc:
        raise CommandError(str(exc)) from None
    print("\n".join(reconcile_report(summary)))
    if summary.deletes_withheld:
        raise CommandError(
            f"{summary.withheld_because}: no delete {'would be' if request.dry_run else 'was'} enqueued. "
            "Jira also answers 404 for issues the account may not browse; check its permissions, then "
            "rerun with a higher --max-deletes"
        )
    unchecked = len(summary.lookup_failed) + sum(1 for f in summary.forbidden if f.status == 401)
    if unchecked:
        # Rows left alone because Jira could not be asked (retries exhausted) or refused the
        # credentials: the table may hold deleted issues this run could not see. A 403 is a
        # permission on that issue, reported above, not a failed run.
        raise CommandError(
            f"{unchecked} live row(s) could not be checked (lookup kept failing, or HTTP 401: "
            "credentials rejected); they were left alone; rerun when Jira answers"
        )
    if summary.failed_webhooks_error is not None:
        raise CommandError(f"replaying Jira's failed webhooks stopped: {summary.failed_webhooks_error}")
    return 0


def _since(text: str | None) -> Since:
    if text is None:
        return None
    if text.strip().lower() == LAST_RUN:
        return LAST_RUN
    try:
        return parse_since(text)
    except ValueError as exc:
        raise CommandError(str(exc), exit_code=2) from None


def backfill_report(summary: BackfillSummary) -> list[str]:
    if summary.dry_run:
        total = "an unknown number of" if summary.total is None else f"about {summary.total}"
        resumed = (
            f" (a saved run would resume after page {summary.resumed_after_page})"
            if summary.resumed_after_page is not None
            else ""
        )
        return [
            f"backfill dry run: {total} issues match{resumed}",
            f"  jql: {summary.jql}",
            "  nothing was enqueued",
        ]
    resumed = (
        f", resumed after page {summary.resumed_after_page}" if summary.resumed_after_page is not None else ""
    )
    lines = [
        f"backfill complete: {summary.sent} issues enqueued from {summary.pages} pages "
        f"in {summary.duration_s:.1f} s{resumed} ({summary.issues_sent_total} in the whole run)",
        f"  jql: {summary.jql}",
    ]
    if summary.restarted_after_expired_token:
        lines.append(
            f"  Jira no longer accepted the page token saved after page {summary.resumed_after_page}: "
            "started again at page one"
        )
    if summary.jira_retries:
        lines.append(f"  Jira throttled or failed {summary.jira_retries} requests; all were retried")
    lines += [f"  not enqueued: issue {r.issue_id}: {r.reason}" for r in summary.refused]
    if summary.refused_before_resume:
        lines.append(
            f"  not enqueued before the resume: {summary.refused_before_resume} issues "
            "(see that run's snapshot_refused log lines)"
        )
    if summary.watermark is not None:
        lines.append(f"  watermark: {summary.watermark.isoformat()} (for --updated-since last-run)")
    else:
        lines.append("  watermark: unchanged (this run did not cover everything since the last one)")
    return lines


def reconcile_report(summary: ReconcileSummary) -> list[str]:
    prefix = "reconcile dry run" if summary.dry_run else "reconcile"
    lines = [
        f"{prefix}: {summary.jira_ids} issues in Jira, {summary.live_rows} live rows, "
        f"{summary.candidates} live rows missing from Jira's answer",
        f"  jql: {summary.jql}",
    ]
    verb = "would mark deleted" if summary.dry_run or summary.deletes_withheld else "marked deleted"
    lines += _findings(verb, summary.deleted)
    lines += _findings("left alone (no access: permission lost?)", summary.forbidden)
    lines += _findings("left alone (exists, outside the JQL)", summary.still_exist)
    lines += _findings("left alone (lookup kept failing)", summary.lookup_failed)
    if summary.dry_run:
        lines.append("  nothing was enqueued")
    elif not summary.deletes_withheld:
        lines.append(f"  {summary.deletes_enqueued} delete events enqueued")
    if summary.failed_webhooks_error is not None:
        lines.append(f"failed webhooks: stopped: {summary.failed_webhooks_error}")
    report = summary.failed_webhooks
    if report is None:
        return lines
    if not report.available:
        lines.append(
            f"failed webhooks: not available ({report.reason}). Jira Cloud lists failed deliveries only "
            "to Connect apps, for their own webhooks; for admin-registered webhooks (and on Data "
            "Center) run `jiralake backfill --updated-since <outage start>` instead"
        )
        return lines
    replayed = "would replay" if summary.dry_run else "replayed"
    lines.append(
        f"failed webhooks: {report.listed} listed, {replayed} {report.replayed}, ignored {report.ignored} "
        f"(not about an issue), {len(report.without_body)} without a body, {len(report.invalid)} invalid"
    )
    if report.without_body:
        lines.append(
            "  without a body (Jira kept no payload; backfill the outage window): "
            + ", ".join(report.without_body[:20])
            + (" ..." if len(report.without_body) > 20 else "")
        )
    lines += [f"  invalid {webhook_id}: {reason}" for webhook_id, reason in report.invalid[:20]]
    return lines


def _findings(label: str, findings: Sequence[Finding]) -> list[str]:
    lines = []
    for finding in findings:
        status = f"HTTP {finding.status}" if finding.status else finding.detail
        key = f" {finding.issue_key}" if finding.issue_key else ""
        lines.append(f"  {label}: {finding.issue_id}{key} ({status})")
    return lines
