"""``jiralake receiver [--host H] [--port P] [--insecure-no-signature]``."""

from __future__ import annotations

import argparse
import asyncio
import os

import structlog

from receiver.main import serve
from receiver.settings import ReceiverSettings
from shared import argtypes

log = structlog.get_logger()


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "receiver",
        help="receive Jira webhooks and put them on the SQS FIFO queue",
        description="Serve POST /webhooks/jira, /healthz and /readyz on the main port and "
        "/metrics, /healthz, /readyz on the admin port (JIRALAKE_RECEIVER_ADMIN_PORT). Requires "
        "JIRALAKE_QUEUE_URL and JIRALAKE_WEBHOOK_SECRET. Stops gracefully on SIGTERM.",
    )
    parser.add_argument(
        "--host",
        type=argtypes.non_blank,
        help="interface to listen on (default JIRALAKE_RECEIVER_HOST or 0.0.0.0)",
    )
    parser.add_argument(
        "--port",
        type=argtypes.port,
        help="port for webhooks, 0: any free one, named in the receiver_started log line "
        "(default JIRALAKE_RECEIVER_PORT or 8080)",
    )
    parser.add_argument(
        "--insecure-no-signature",
        action="store_true",
        help="start without JIRALAKE_WEBHOOK_SECRET and accept unsigned webhooks (local use only); "
        "when the secret is set, signatures are required regardless",
    )
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    settings = ReceiverSettings.from_env(os.environ, allow_unsigned=args.insecure_no_signature).with_ports(
        host=args.host, port=args.port
    )
    if args.insecure_no_signature and settings.webhook_secret is not None:
        log.warning(
            "insecure_flag_ignored",
            detail="JIRALAKE_WEBHOOK_SECRET is set, so webhook signatures are required",
        )
    asyncio.run(serve(settings))
    return 0
