"""``jiralake queue stats``: how many messages the main queue and the dead-letter queue hold (visible,
in flight, delayed) and how old the oldest is where that can be known; a table on a terminal, plain
``key=value`` lines otherwise, JSON with ``--json``. ``--max-visible`` / ``--max-dlq`` make it a check
for cron or a health checker: exit 3 with a one-line reason when exceeded.

Exit codes, distinct so that a check can tell "the queue is too deep" from "the check could not run":
0 within the thresholds; 3 a threshold exceeded (no other path of any jiralake command uses 3);
2 bad arguments or configuration (argparse's usage error, and ``ConfigError`` in jiralake/cli.py, as
for every command); 1 the queues could not be read (SQS unreachable, credentials, permissions, no such
queue, or a call SQS took and did not answer within PROMPT_CALL_TIMEOUT_S, 10 s: botocore alone waits
minutes for it, and a check must answer within seconds). Not Nagios's 0/1/2/3: there 2 is CRITICAL
and 3 UNKNOWN, but 2 is every jiralake command's usage error already. An unexpected error exits 70
and Ctrl-C 130, as for every command.

The main queue's oldest age is "unknown" on purpose: peeking there would count toward its
``maxReceiveCount`` (see shared/queue_depth.py); CloudWatch's ``ApproximateAgeOfOldestMessage`` has it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from ops.text_table import format_age, format_table
from shared import argtypes
from shared.aws import sqs_client
from shared.errors import CommandError
from shared.queue_depth import DEAD_LETTER_QUEUE, MAIN_QUEUE, QueueDepth, read_depth
from shared.settings import AwsSettings, QueueSettings
from shared.sqs_requests import PROMPT_CALL_TIMEOUT_S, SQS_ERRORS, describe, no_such_queue

OK_EXIT_CODE = 0
UNAVAILABLE_EXIT_CODE = 1  # CommandError's default, and cli.py's for OSError and botocore errors
USAGE_EXIT_CODE = 2  # argparse, and cli.py for ConfigError: never raised here
THRESHOLD_EXIT_CODE = 3
# The shortest --watch interval: SQS's approximate counts move about once a minute.
WATCH_MIN_S = 1.0
EXIT_CODES_HELP = (
    f"Exit codes: {OK_EXIT_CODE} within the thresholds (or no thresholds); {THRESHOLD_EXIT_CODE} a "
    f"threshold exceeded; {USAGE_EXIT_CODE} bad arguments or configuration (e.g. JIRALAKE_QUEUE_URL "
    f"unset); {UNAVAILABLE_EXIT_CODE} the queues could not be read (SQS unreachable, refusing, or not "
    f"answering a call within {PROMPT_CALL_TIMEOUT_S:g} s). "
    f"--watch exits 0 on Ctrl-C, {UNAVAILABLE_EXIT_CODE} when a queue does not exist."
)
UNKNOWN_AGE_NOTE = (
    "the main queue's oldest age is not peeked (a receive there counts toward maxReceiveCount); "
    "CloudWatch's ApproximateAgeOfOldestMessage has it"
)
_LABELS = {MAIN_QUEUE: "main queue", DEAD_LETTER_QUEUE: "dead-letter queue"}
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


@dataclass(frozen=True)
class Thresholds:
    # Alert when the main queue has more than this many visible messages.
    max_visible: int | None = None
    # Alert when the dead-letter queue holds more than this many messages (any state).
    max_dlq: int | None = None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("queue", help="queue statistics", description="Queue statistics.")
    actions = parser.add_subparsers(dest="queue_action", metavar="ACTION", required=True)
    stats = actions.add_parser(
        "stats",
        help="messages in the main queue and the dead-letter queue",
        description="Visible, in-flight and delayed messages of the main queue and the dead-letter "
        "queue, and the oldest message's age where it can be known. With --max-visible or --max-dlq, "
        f"exits {THRESHOLD_EXIT_CODE} with a one-line reason when a threshold is exceeded.",
        epilog=EXIT_CODES_HELP,
    )
    stats.add_argument("--json", action="store_true", help="print JSON (one object per round with --watch)")
    stats.add_argument(
        "--watch",
        type=argtypes.seconds_at_least(WATCH_MIN_S),
        metavar="SECONDS",
        help=f"print again every SECONDS (at least {WATCH_MIN_S:g}) until Ctrl-C",
    )
    stats.add_argument(
        "--max-visible",
        type=argtypes.non_negative_int,
        metavar="N",
        help=f"exit {THRESHOLD_EXIT_CODE} if the main queue has more visible",
    )
    stats.add_argument(
        "--max-dlq",
        type=argtypes.non_negative_int,
        metavar="N",
        help=f"exit {THRESHOLD_EXIT_CODE} if the dead-letter queue holds more",
    )
    stats.set_defaults(func=_stats_command)


async def read_stats(
    aws: AwsSettings, queues: QueueSettings, *, call_timeout_s: float | None = None
) -> list[QueueDepth]:
    """Main queue (never peeked) then dead-letter queue (peeked for its oldest age). A count SQS does
    not answer within ``call_timeout_s`` (None: botocore's own limits) raises :class:`TimeoutError`;
    a peek it does not answer leaves the age unknown."""
    async with sqs_client(aws) as sqs:
        return [
            await read_depth(sqs, MAIN_QUEUE, queues.queue_url, peek_oldest=False, timeout_s=call_timeout_s),
            await read_depth(
                sqs, DEAD_LETTER_QUEUE, queues.dlq_url, peek_oldest=True, timeout_s=call_timeout_s
            ),
        ]


def exceeded(depths: Sequence[QueueDepth], thresholds: Thresholds) -> list[str]:
    """One phrase per threshold exceeded, e.g. ``"main queue has 12 visible messages (max 10)"``."""
    reasons = []
    for depth in depths:
        if depth.queue == MAIN_QUEUE and thresholds.max_visible is not None:
            if depth.visible > thresholds.max_visible:
                reasons.append(
                    f"main queue has {depth.visible} visible messages (max {thresholds.max_visible})"
                )
        if depth.queue == DEAD_LETTER_QUEUE and thresholds.max_dlq is not None:
            if depth.total > thresholds.max_dlq:
                reasons.append(f"dead-letter queue holds {depth.total} messages (max {thresholds.max_dlq})")
    return reasons


def render_table(depths: Sequence[QueueDepth]) -> str:
    rows = [
        [
            _LABELS.get(d.queue, d.queue),
            str(d.visible),
            str(d.in_flight),
            str(d.delayed),
            format_age(d.oldest_age_s),
        ]
        for d in depths
    ]
    text = format_table(["QUEUE", "VISIBLE", "IN FLIGHT", "DELAYED", "OLDEST"], rows)
    if any(d.oldest_age_s is None for d in depths):
        text += f"\n{UNKNOWN_AGE_NOTE}"
    return text


def render_lines(depths: Sequence[QueueDepth]) -> str:
    return "\n".join(
        f"queue={d.queue} visible={d.visible} in_flight={d.in_flight} delayed={d.delayed} "
        f"oldest_age_s={'unknown' if d.oldest_age_s is None else int(d.oldest_age_s)} url={d.url}"
        for d in depths
    )


def render_json(depths: Sequence[QueueDepth], reasons: Sequence[str], *, indent: int | None = 2) -> str:
    return json.dumps(
        {
            "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "queues": [d.to_json() for d in depths],
            "exceeded": list(reasons),
        },
        indent=indent,
    )


def _stats_command(args: argparse.Namespace) -> int:
    aws = AwsSettings.from_env(os.environ)
    queues = QueueSettings.from_env(os.environ)
    thresholds = Thresholds(max_visible=args.max_visible, max_dlq=args.max_dlq)
    style = "json" if args.json else ("table" if sys.stdout.isatty() else "lines")
    if args.watch:
        try:
            asyncio.run(
                watch(
                    aws,
                    queues,
                    thresholds,
                    interval_s=args.watch,
                    style=style,
                    call_timeout_s=PROMPT_CALL_TIMEOUT_S,
                )
            )
        except KeyboardInterrupt:
            pass
        return 0
    try:
        depths = asyncio.run(read_stats(aws, queues, call_timeout_s=PROMPT_CALL_TIMEOUT_S))
    except SQS_ERRORS as exc:
        # Said here, not left to cli.py's generic mapping: "could not check" must never look like a
        # threshold, whatever the error is.
        raise CommandError(
            f"cannot read the queues: {describe(exc)}", exit_code=UNAVAILABLE_EXIT_CODE
        ) from None
    reasons = exceeded(depths, thresholds)
    print(render(depths, reasons, style))
    if reasons:
        raise CommandError("threshold exceeded: " + "; ".join(reasons), exit_code=THRESHOLD_EXIT_CODE)
    return 0


def render(
    depths: Sequence[QueueDepth], reasons: Sequence[str], style: str, *, indent: int | None = 2
) -> str:
    if style == "json":
        return render_json(depths, reasons, indent=indent)
    return render_table(depths) if style == "table" else render_lines(depths)


async def watch(
    aws: AwsSettings,
    queues: QueueSettings,
    thresholds: Thresholds,
    *,
    interval_s: float,
    style: str,
    rounds: int | None = None,
    out: TextIO | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    call_timeout_s: float | None = None,
) -> None:
    """Print the stats every ``interval_s`` (``rounds`` times, or until cancelled). Thresholds are
    reported on each round, not by the exit code: a watch is for people, the check is for cron. A
    round SQS fails is reported as such and the watch goes on: it is watched during incidents; so is a
    round whose call SQS did not answer within ``call_timeout_s``. A queue that does not exist (a typo
    in its URL) ends the watch: no later round can read it."""
    stream = out or sys.stdout
    done = 0
    while rounds is None or done < rounds:
        stamp = now().isoformat(timespec="seconds").replace("+00:00", "Z")
        try:
            depths = await read_stats(aws, queues, call_timeout_s=call_timeout_s)
        except SQS_ERRORS as exc:
            failure = describe(exc)
            if no_such_queue(exc):
                raise CommandError(
                    f"cannot read the queues: {failure}", exit_code=UNAVAILABLE_EXIT_CODE
                ) from None
            if style == "json":
                text = json.dumps({"time": stamp, "error": failure})
            else:
                text = f"time={stamp} SQS unavailable: {failure}; trying again in {interval_s:g}s"
            print(text, file=stream, flush=True)
            done += 1
            if rounds is None or done < rounds:
                await asyncio.sleep(interval_s)
            continue
        reasons = exceeded(depths, thresholds)
        if style == "json":
            text = render(depths, reasons, style, indent=None)
        elif style == "table":
            text = f"{_CLEAR_SCREEN}{stamp}  (every {interval_s:g}s, Ctrl-C to stop)\n{render_table(depths)}"
        else:
            text = "\n".join(f"time={stamp} {line}" for line in render_lines(depths).splitlines())
        if reasons and style != "json":
            text += "\nthreshold exceeded: " + "; ".join(reasons)
        print(text, file=stream, flush=True)
        done += 1
        if rounds is None or done < rounds:
            await asyncio.sleep(interval_s)
