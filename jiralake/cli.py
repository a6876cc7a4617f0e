"""``jiralake <command>``: argument parsing and dispatch. Each command lives beside its service
(``receiver/command.py``, ``consumer/command.py``, ...) and registers itself with :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence

import structlog

from shared import argtypes
from shared import logging as jl_logging
from shared.db import schema_hint
from shared.errors import CommandError, one_line
from shared.settings import ConfigError, env_str

# Modules that each define ``add_parser(subparsers)``; their parsers set ``func(args) -> int``.
COMMAND_MODULES = (
    "ops.setup",
    "receiver.command",
    "consumer.command",
    "exporter.command",
    "ops.dlq_command",
    "ops.queue_stats",
    "ops.history_prune",
    "ops.forget_user_command",
    "backfill.command",
    "ops.up_command",
)

# Infrastructure failures a person can act on: reported in one line, not as a traceback.
_ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jiralake",
        description="Jira webhooks -> SQS FIFO -> PostgreSQL -> S3. Configuration comes from the "
        "environment (see README.md); AWS credentials from the standard AWS chain.",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)} (default JIRALAKE_LOG_LEVEL or INFO)",
    )
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON logs even on a TTY")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:  # building the parser imports every command's modules: a Ctrl-C lands here first
        parser = build_parser()
    except KeyboardInterrupt:
        return 130
    args = parser.parse_args(argv)
    argtypes.refuse_ignored(args, os.environ)  # an option the chosen mode would not use: usage error
    try:
        jl_logging.configure(args.log_level or _log_level_from_env(os.environ), json=args.log_json)
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"jiralake: configuration error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"jiralake: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except _ONE_LINE_ERRORS as exc:
        print(f"jiralake: {type(exc).__name__}: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:
        if _is_infrastructure_error(exc):
            print(f"jiralake: {type(exc).__name__}: {one_line(str(exc))}{schema_hint(exc)}", file=sys.stderr)
            return 1
        structlog.get_logger().exception("command_crashed", command=args.command)
        return 70


def _reader_gone() -> int:
    """The reader of the output went away (`jiralake dlq list | head -1`): end quietly with the exit
    status of a Unix tool SIGPIPE ended, not as a failure of jiralake. Python ignores SIGPIPE, so the
    write raised instead; what is left in stdout's buffer goes to /dev/null, or the flush at exit would
    raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _normalized_level(raw: str) -> str | None:
    """The level's name, or None when logging would silently fall back to INFO for it."""
    level = raw.strip().upper()
    level = "WARNING" if level == "WARN" else level
    return level if level in LOG_LEVELS else None


def _log_level(raw: str) -> str:
    level = _normalized_level(raw)
    if level is None:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return level


def _log_level_from_env(env: Mapping[str, str]) -> str:
    raw = env_str(env, "JIRALAKE_LOG_LEVEL", "INFO") or "INFO"
    level = _normalized_level(raw)
    if level is None:
        raise ConfigError(f"JIRALAKE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return level


def _is_infrastructure_error(exc: Exception) -> bool:
    module = type(exc).__module__
    return module.startswith(("asyncpg", "botocore", "aiobotocore", "aiohttp"))
