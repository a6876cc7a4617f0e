"""``jiralake consumer``: apply queued Jira events to Postgres until SIGTERM (or until the queue is idle)."""

from __future__ import annotations

import argparse
import os

from consumer import main
from shared import argtypes


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "consumer",
        help="apply queued Jira events to Postgres (ap_jira_task) until SIGTERM",
        description="Receive from JIRALAKE_QUEUE_URL, apply to DATABASE_URL, dead-letter to "
        "JIRALAKE_DLQ_URL. Settings come from JIRALAKE_CONSUMER_* variables (README.md); the options "
        "below override them.",
    )
    parser.add_argument(
        "--pollers", type=argtypes.positive_int, help="concurrent receive loops (JIRALAKE_CONSUMER_POLLERS)"
    )
    parser.add_argument(
        "--admin-port",
        type=argtypes.port,
        help="port of /healthz, /readyz, /metrics; 0 disables (default JIRALAKE_CONSUMER_ADMIN_PORT or 9091)",
    )
    parser.add_argument(
        "--exit-when-idle",
        type=argtypes.positive_number,
        metavar="SECONDS",
        help="stop and exit 0 once receives have found the queue empty for SECONDS (at least one long "
        "poll), e.g. a scheduled catch-up run (JIRALAKE_CONSUMER_EXIT_WHEN_IDLE_S; default: until SIGTERM)",
    )
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.pollers is not None:
        env["JIRALAKE_CONSUMER_POLLERS"] = str(args.pollers)
    if args.admin_port is not None:
        env["JIRALAKE_CONSUMER_ADMIN_PORT"] = str(args.admin_port)
    if args.exit_when_idle is not None:
        env["JIRALAKE_CONSUMER_EXIT_WHEN_IDLE_S"] = repr(args.exit_when_idle)
    main.main(env)
    return 0
