"""``jiralake dlq list|replay|purge``: the dead-letter queue from the command line (see ops/dlq.py and
docs/operations.md). Settings come from the environment: ``JIRALAKE_QUEUE_URL``, ``JIRALAKE_DLQ_URL``
and the standard AWS variables."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import structlog

from ops import dlq
from ops.text_table import format_table
from shared import argtypes
from shared.aws import sqs_client
from shared.errors import CommandError
from shared.jira_event import is_issue_id
from shared.queue_depth import QueueCounts, read_counts
from shared.settings import AwsSettings, QueueSettings
from shared.shutdown import signal_exit_code, stop_on_signals
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S, SQS_ERRORS, describe, no_answer

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

log = structlog.get_logger()

DEFAULT_LIST_LIMIT = 100
_UNANSWERED = f"not answering a call within {PROMPT_CALL_TIMEOUT_S:g} s"
LIST_EXIT_CODES_HELP = (
    f"Exit codes: 0 listed; 2 bad arguments or configuration; 1 SQS unreachable, refusing or {_UNANSWERED} "
    f"(what the listing held is visible again within {dlq.LIST_HOLD_S} s); 130/143 stopped by "
    "SIGINT/SIGTERM, the held messages made visible again."
)
REPLAY_EXIT_CODES_HELP = (
    "Exit codes: 0 done (also with --dry-run); 2 bad arguments or configuration; 1 a message could not "
    f"be replayed, or SQS unreachable, refusing or {_UNANSWERED} (the replay stops: what it could not "
    "be sure of stays in the dead-letter queue, run it again); 130/143 stopped by SIGINT/SIGTERM between "
    "batches (run it again to go on)."
)
PURGE_EXIT_CODES_HELP = (
    f"Exit codes: 0 purged (or a purge already under way); 2 without --yes, bad arguments or "
    f"configuration; 1 SQS unreachable, refusing or {_UNANSWERED} (the line says whether anything "
    "may have been purged)."
)


def issue_id(raw: str) -> str:
    """``--issue``: a Jira issue's numeric id. Anything else is refused rather than matching nothing
    (a key like ABC-1) or, when empty (``--issue "$UNSET"``), being taken as no filter at all."""
    value = raw.strip()
    if not is_issue_id(value):
        raise argparse.ArgumentTypeError(
            f"not a numeric Jira issue id (the ISSUE column of dlq list, not the key): {raw!r}"
        )
    return str(int(value))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "dlq",
        help="list, replay or purge the dead-letter queue",
        description="Inspect and repair the dead-letter queue. See docs/operations.md.",
    )
    actions = parser.add_subparsers(dest="dlq_action", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list",
        help="show what is in the dead-letter queue without consuming it",
        description="Receives the messages, shows them and makes them visible again at once. While it "
        "runs, the listed messages (and their issues' later ones) are hidden from other readers.",
        epilog=LIST_EXIT_CODES_HELP,
    )
    listing.add_argument(
        "--limit",
        type=argtypes.positive_int,
        default=DEFAULT_LIST_LIMIT,
        help="at most N messages (default 100)",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_list_command)

    replay = actions.add_parser(
        "replay",
        help="move dead-lettered events back to the main queue, in order per issue",
        description="Sends each message back to the main queue (same body, group and envelope "
        "attributes, a new deduplication id), then deletes it from the dead-letter queue. A failure "
        "between the two leaves a harmless duplicate, never a loss.",
        epilog=REPLAY_EXIT_CODES_HELP,
    )
    replay.add_argument("--limit", type=argtypes.positive_int, help="replay at most N messages")
    replay.add_argument(
        "--issue", metavar="ID", type=issue_id, help="only this Jira issue id (the numeric id, not the key)"
    )
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed; change nothing")
    replay.set_defaults(func=_replay_command)

    purge = actions.add_parser(
        "purge",
        help="delete everything in the dead-letter queue for good",
        description="Deletes every message in the dead-letter queue. Refuses without --yes.",
        epilog=PURGE_EXIT_CODES_HELP,
    )
    purge.add_argument("--yes", action="store_true", help="yes, delete them all")
    purge.set_defaults(func=_purge_command)


def _settings() -> tuple[AwsSettings, QueueSettings]:
    return AwsSettings.from_env(os.environ), QueueSettings.from_env(os.environ)


# -- list --


def _list_command(args: argparse.Namespace) -> int:
    aws, queues = _settings()
    letters, counts, stopped_by = asyncio.run(_list(aws, queues.dlq_url, args.limit))
    if stopped_by is not None:
        raise _list_stopped(stopped_by)
    if args.json:
        print(
            json.dumps(
                {
                    "queue_url": queues.dlq_url,
                    "approximate_messages": counts.total,
                    "messages": [letter.to_json() for letter in letters],
                },
                indent=2,
            )
        )
        return 0
    print(render_list(letters, counts, queues.dlq_url))
    return 0


async def _list(
    aws: AwsSettings, dlq_url: str, limit: int
) -> tuple[list[dlq.DeadLetter], QueueCounts, signal.Signals | None]:
    async with sqs_client(aws) as sqs:
        with stop_on_signals() as stop:
            receiving = False
            try:
                counts = await read_counts(sqs, dlq_url, timeout_s=PROMPT_CALL_TIMEOUT_S)
                receiving = True
                letters = (
                    await dlq.list_dead_letters(
                        sqs, dlq_url, limit=limit, stop=stop.event, call_timeout_s=PROMPT_CALL_TIMEOUT_S
                    )
                    if counts.total
                    else []
                )
            except Exception as exc:
                if stop.signal is None:
                    if isinstance(exc, TimeoutError):
                        # The count comes first and holds nothing; a receive given up may have been
                        # carried out, its messages hidden for LIST_HOLD_S.
                        held = (
                            f"what it may have held is visible again within {dlq.LIST_HOLD_S} s"
                            if receiving
                            else "it held no message"
                        )
                        raise CommandError(f"dlq list got {describe(exc)}; {held}") from None
                    raise
                # SQS failed while the listing stopped (the receive it finished, or the release): the
                # stop is what the user did, and the held messages come back by themselves anyway
                raise _list_stopped(stop.signal) from None
        return letters, counts, stop.signal


def _list_stopped(by: signal.Signals) -> CommandError:
    return CommandError(
        f"dlq list stopped by {by.name}; the messages it held are visible again (at the latest 60 s after "
        "it received them)",
        exit_code=signal_exit_code(by),
    )


def render_list(letters: list[dlq.DeadLetter], counts: QueueCounts, dlq_url: str) -> str:
    if not letters:
        if counts.total:
            return (
                f"no message could be received from {dlq_url}, which holds about {counts.total} "
                f"({counts.in_flight} in flight: another reader holds them; try again shortly)"
            )
        return f"the dead-letter queue is empty ({dlq_url})"
    rows = []
    for letter in letters:
        shown = letter.to_json()
        rows.append(
            [
                letter.issue_id or letter.group_id or "-",
                letter.event_type or "-",
                _field(shown["event_time"]),
                _field(shown["sent_at"]),
                str(letter.receive_count),
                letter.reason,
            ]
        )
    table = format_table(["ISSUE", "EVENT", "EVENT TIME", "SENT", "RECEIVES", "REASON"], rows)
    footer = (
        f"{len(letters)} listed of about {counts.total} in {dlq_url}; "
        "they are visible again (listing held them for a moment)"
    )
    return f"{table}\n{footer}"


def _field(value: Any) -> str:
    return "-" if value is None else str(value)


# -- replay --


def _replay_command(args: argparse.Namespace) -> int:
    aws, queues = _settings()
    summary, counts, stopped_by = asyncio.run(
        _replay(aws, queues, limit=args.limit, issue_id=args.issue, dry_run=args.dry_run)
    )
    print(render_replay(summary, counts))
    if stopped_by is not None and summary.stopped:
        # The signal came while SQS left a call unanswered: what that means for the messages matters more
        # than the count, and the exit code is still the signal's.
        raise CommandError(
            f"dlq replay stopped by {stopped_by.name}; {summary.stopped}",
            exit_code=signal_exit_code(stopped_by),
        )
    if stopped_by is not None:
        raise CommandError(
            f"dlq replay stopped by {stopped_by.name} after {summary.replayed + summary.failed} "
            "message(s); the rest stay in the dead-letter queue; run the same command again to go on",
            exit_code=signal_exit_code(stopped_by),
        )
    # The summary above is the command's output; why it did not finish goes to stderr, as every
    # command's error does (cron mails it, a script sees it apart from the output).
    if summary.stopped:
        raise CommandError(f"dlq replay stopped early: {summary.stopped}")
    if summary.failed:
        raise CommandError(f"dlq replay could not replay {_where_failed(summary)}")
    return 0


async def _replay(
    aws: AwsSettings, queues: QueueSettings, *, limit: int | None, issue_id: str | None, dry_run: bool
) -> tuple[dlq.ReplaySummary, QueueCounts | None, signal.Signals | None]:
    """The summary; the DLQ's counts (before a dry run, which cannot see all of it; after a replay,
    which shows what someone else held meanwhile), or None where SQS did not give them; and the
    signal that stopped the replay between batches, if one did."""
    async with sqs_client(aws) as sqs:
        with stop_on_signals() as stop:
            counts = await _counts(sqs, queues.dlq_url) if dry_run else None
            summary = await dlq.replay_dead_letters(
                sqs,
                queues,
                limit=limit,
                issue_id=issue_id,
                dry_run=dry_run,
                stop=stop.event,
                call_timeout_s=PROMPT_CALL_TIMEOUT_S,
            )
            if not dry_run and not summary.stopped and stop.signal is None:
                counts = await _counts(sqs, queues.dlq_url)
        return summary, counts, stop.signal


async def _counts(sqs: SQSClient, dlq_url: str) -> QueueCounts | None:
    try:
        return await read_counts(sqs, dlq_url, timeout_s=PROMPT_CALL_TIMEOUT_S)
    except SQS_ERRORS as exc:
        error = describe(exc)
        log.warning("dlq_counts_unavailable", error_class=type(exc).__name__, error=error)
        return None


def _where_failed(summary: dlq.ReplaySummary) -> str:
    """Where the messages that failed are: in the dead-letter queue, and (SQS's answer to their send or
    delete lost) maybe in the main queue as well."""
    failed, in_doubt = summary.failed, summary.in_doubt
    if not in_doubt:
        return (
            f"{failed} message(s); they stay in the dead-letter queue (reasons above); run the same "
            "command again once the cause is fixed"
        )
    others = "" if in_doubt == failed else "; the others stay in the dead-letter queue"
    return (
        f"{failed} message(s) (reasons above): SQS's answer was lost for {in_doubt} of them, so each of "
        f"those may be in both queues, which is harmless{others}; run the same command again once the "
        "cause is fixed"
    )


def render_replay(summary: dlq.ReplaySummary, counts: QueueCounts | None = None) -> str:
    lines = [
        f"{r.outcome.replace('_', ' ')}: issue {r.issue_id or '-'} {r.event_type or '-'} "
        f"(message {r.message_id})" + (f": {r.reason}" if r.reason else "")
        for r in summary.results
        if r.outcome in ("failed", "skipped") or summary.dry_run
    ]
    outcome = f"replayed {summary.replayed}, skipped {summary.skipped}, failed {summary.failed}"
    if summary.in_doubt:
        outcome += f" ({summary.in_doubt} of them may be in both queues, which is harmless)"
    if summary.dry_run:
        outcome = f"dry run, nothing changed: would replay {summary.replayed}, skipped {summary.skipped}"
    if summary.other_issues:
        outcome += f"; {summary.other_issues} message(s) of other issues left in place"
    lines.append(outcome)
    seen = len(summary.results) + summary.other_issues
    if summary.dry_run and counts is not None and counts.total > seen:
        lines.append(
            f"the dead-letter queue holds about {counts.total}: a dry run may see only the first events "
            "of an issue (SQS hands out no more of an issue while its first ones are held), so the "
            "replay itself may move more"
        )
    if not summary.dry_run and counts is not None and counts.in_flight:
        lines.append(
            f"the dead-letter queue still holds about {counts.in_flight} message(s) in flight, which "
            "this replay could not see: another reader holds them (a dlq list, another replay) or SQS's "
            f"answer to a receive was lost; they are visible again within {dlq.REPLAY_HOLD_S // 60} "
            "minutes: run the same command again then"
        )
    if summary.stopped:
        lines.append(f"stopped early: {summary.stopped}")
    return "\n".join(lines)


# -- purge --


def _purge_command(args: argparse.Namespace) -> int:
    if not args.yes:
        raise CommandError(
            "dlq purge deletes every message in the dead-letter queue for good; add --yes to do it",
            exit_code=2,
        )
    aws, queues = _settings()
    try:
        result = asyncio.run(_purge(aws, queues.dlq_url))
    except TimeoutError:
        raise CommandError(
            f"dlq purge got {no_answer(PROMPT_CALL_TIMEOUT_S)} when it read the dead-letter queue's "
            "count; nothing was purged"
        ) from None
    if result.unanswered:
        raise CommandError(
            f"dlq purge got {no_answer(PROMPT_CALL_TIMEOUT_S)} to the purge (the dead-letter queue held "
            f"about {result.approximate_messages} message(s)); whether it was purged is unknown: check with "
            "dlq list in a minute"
        )
    print(render_purge(queues.dlq_url, result), file=sys.stdout)
    return 0


async def _purge(aws: AwsSettings, dlq_url: str) -> dlq.PurgeResult:
    async with sqs_client(aws) as sqs:
        return await dlq.purge_dead_letters(sqs, dlq_url, call_timeout_s=PROMPT_CALL_TIMEOUT_S)


def render_purge(dlq_url: str, result: dlq.PurgeResult) -> str:
    held = f"it held about {result.approximate_messages} message(s)"
    if not result.already_under_way:
        return f"purged {dlq_url} ({held})"
    return (
        f"a purge of {dlq_url} is already under way ({held}; SQS runs one per queue per minute): what "
        "was dead-lettered after it began may remain; check with dlq list in a minute"
    )
