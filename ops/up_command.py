"""``jiralake up [--demo] [--keep-running]``: the one-command local stack (see ops/local_stack.py)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from zoneinfo import ZoneInfo

from exporter.settings import check_schedule
from ops.local_aws import require_moto_server
from ops.local_stack import DEFAULT_DEMO_TIMEOUT_S, StackOptions, run_stack
from shared import argtypes
from shared.errors import CommandError
from shared.settings import ConfigError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run receiver, consumer and exporter locally on an embedded SQS/S3 (no AWS account needed)",
    )
    parser.add_argument("--demo", action="store_true", help="send the sample webhooks, export, print, exit")
    parser.add_argument("--keep-running", action="store_true", help="with --demo: leave the stack up")
    parser.add_argument(
        "--host",
        type=argtypes.non_blank,  # "" would listen on every interface
        default="127.0.0.1",
        help="IPv4 address the receiver and the admin ports listen on (default 127.0.0.1)",
    )
    parser.add_argument("--port", type=argtypes.port, default=8080, help="receiver port (0 = any free port)")
    parser.add_argument(
        "--fixtures", type=Path, metavar="DIR", help="with --demo: folder of sample webhooks to send"
    )
    parser.add_argument(
        "--state-dir",
        type=argtypes.folder,
        default=Path(".jiralake"),
        help="scratch folder, not a file (one `up` at a time per folder)",
    )
    parser.add_argument(
        "--export-schedule",
        type=_cron,
        default="*/15 * * * *",
        help="cron expression for the exporter, in UTC (default every 15 minutes)",
    )
    parser.add_argument(
        "--demo-timeout",
        type=argtypes.positive_number,
        metavar="SECONDS",
        help=f"with --demo: seconds to wait for the consumer (default {DEFAULT_DEMO_TIMEOUT_S:g})",
    )
    # Said, not ignored: without --demo no webhook is sent, and the stack keeps running anyway.
    argtypes.only_with(
        parser, "--keep-running", "with --demo (without --demo the stack keeps running)", _demo
    )
    argtypes.only_with(parser, "--fixtures", "with --demo", _demo)
    argtypes.only_with(parser, "--demo-timeout", "with --demo", _demo)
    parser.set_defaults(func=_command)


def _demo(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    return bool(args.demo)


def _command(args: argparse.Namespace) -> int:
    require_moto_server()
    _fail_if_cannot_listen(args.host, args.port)
    options = StackOptions(
        scratch_dir=args.state_dir.resolve(),
        host=args.host,
        port=args.port,
        demo=args.demo,
        keep_running=args.keep_running,
        fixtures_dir=args.fixtures,
        export_schedule=args.export_schedule,
        demo_timeout_s=DEFAULT_DEMO_TIMEOUT_S if args.demo_timeout is None else args.demo_timeout,
    )
    return asyncio.run(run_stack(options, dict(os.environ)))


def _cron(raw: str) -> str:
    try:
        check_schedule(raw, ZoneInfo("UTC"))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. '*/15 * * * *')") from None
    return raw


def _fail_if_cannot_listen(host: str, port: int) -> None:
    """Refuse before anything starts: a port in use, or a host that is no IPv4 address of this machine."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandError(
                    f"port {port} on {host} is in use; pass --port with a free one (0 = any)", 2
                ) from None
            raise CommandError(
                f"cannot listen on {host}: {exc.strerror or exc}; pass --host with an IPv4 address "
                "of this machine (default 127.0.0.1)",
                2,
            ) from None
