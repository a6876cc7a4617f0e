"""``jiralake forget-user``: the command around ops/forget_user.py. Its arguments and their checks
(before any database is asked), the summary it prints, and its exit codes: 0 done (also a dry run,
and nothing to change); 2 bad arguments or configuration; 1 PostgreSQL unreachable, refusing or not
answering a statement within a minute, a row locked by someone else for too long, a batch deadlocked
4 times in a row, or migration 0009 missing; 130/143 stopped by SIGINT/SIGTERM (run it again to
finish); 70 a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
from collections.abc import Sequence

from ops.forget_user import (
    BATCH_ATTEMPTS,
    DEFAULT_BATCH_SIZE,
    EVENT_TABLE,
    TASK_TABLE,
    ForgetSummary,
    run,
)
from ops.user_scrub import FORMER_USER, Person
from shared import argtypes
from shared.db import CLOSE_TIMEOUT_S, STATEMENT_TIMEOUT_S
from shared.errors import CommandError
from shared.settings import DatabaseSettings
from shared.shutdown import signal_exit_code, stop_name

# Jira Cloud account ids: 24 hex digits, or "557058:<uuid>", "qm:<uuid>:<uuid>", ... at most 128.
ACCOUNT_ID = re.compile(r"[A-Za-z0-9:_-]{1,128}")  # whole value: fullmatch (a "$" lets a final newline by)
MAX_USERNAME_CHARS = 255
MAX_BATCH_SIZE = 10_000
USAGE_EXIT_CODE = 2

EXIT_CODES_HELP = (
    "Exit codes: 0 done (also with --dry-run, and when nothing names the person); 2 bad arguments or "
    "configuration; 1 PostgreSQL unreachable, refusing or not answering a statement within "
    f"{STATEMENT_TIMEOUT_S:g} s, rows locked too long, or a batch deadlocked {BATCH_ATTEMPTS} times in a row "
    "(each batch commits whole or not at all: run it again); 130/143 stopped by SIGINT/SIGTERM, within "
    f"{CLOSE_TIMEOUT_S:g} s even when PostgreSQL does not answer, the batch in progress rolled back (what "
    "was scrubbed stays scrubbed: run it again to finish)."
)


def person_from_arguments(
    account_id: str | None,
    username: str | None,
    pseudonym: str | None = None,
    keys: Sequence[str] = (),
) -> Person:
    """The person named on the command line, or a one-line refusal (exit 2)."""
    if account_id is not None and username is not None:
        raise CommandError(
            "forget-user takes one of --account-id (Jira Cloud) or --username (Server/Data Center), not both",
            USAGE_EXIT_CODE,
        )
    if account_id is None and username is None:
        raise CommandError(
            "forget-user needs --account-id ID (Jira Cloud) or --username NAME (Server/Data Center)",
            USAGE_EXIT_CODE,
        )
    if account_id is not None:
        if pseudonym is not None:
            raise CommandError(
                "--pseudonym goes with --username only: a Cloud account id stays as it is", USAGE_EXIT_CODE
            )
        if keys:
            raise CommandError("--key goes with --username only: a Data Center user key", USAGE_EXIT_CODE)
        if not account_id.strip():
            raise CommandError("--account-id must not be empty", USAGE_EXIT_CODE)
        if not ACCOUNT_ID.fullmatch(account_id):
            # The value itself is not repeated: it may be a person's name pasted by mistake.
            raise CommandError(
                "--account-id must be a Jira Cloud account id (letters, digits, ':', '_', '-'; at most "
                "128), such as 5b10ac8d82e05b22cc7d4ef5; for a Server/Data Center user use --username",
                USAGE_EXIT_CODE,
            )
        return Person(account_id=account_id)
    assert username is not None
    _check_username("--username", username)
    if pseudonym is not None:
        _check_username("--pseudonym", pseudonym)
        if pseudonym.lower() == username.lower():
            raise CommandError("--pseudonym must differ from the username", USAGE_EXIT_CODE)
    for key in keys:
        _check_username("--key", key)
    learned = {key.lower() for key in keys if key.lower() != username.lower()}
    return Person(username=username, pseudonym=pseudonym, learned=learned, keys={key.lower() for key in keys})


def _check_username(option: str, value: str) -> None:
    if not value.strip():
        raise CommandError(f"{option} must not be empty", USAGE_EXIT_CODE)
    if value != value.strip() or len(value) > MAX_USERNAME_CHARS or not value.isprintable():
        raise CommandError(
            f"{option} must be a Jira username: no leading or trailing spaces, no control characters, "
            f"at most {MAX_USERNAME_CHARS} characters",
            USAGE_EXIT_CODE,
        )


def render(summary: ForgetSummary) -> str:
    tasks, events = summary.rows[TASK_TABLE], summary.rows[EVENT_TABLE]
    counts = f"{tasks} row(s) of {TASK_TABLE} and {events} row(s) of {EVENT_TABLE}"
    if summary.dry_run and summary.stopped:
        stopped = f"stopped by {stop_name(summary.stop_signal)} before the end"
        return f"dry run, nothing changed; {stopped}, so far it would scrub {counts}"
    if summary.dry_run:
        return f"dry run, nothing changed: would scrub {counts}"
    text = f"scrubbed {counts} in {summary.batches} batch(es) of up to {summary.batch_size}"
    if summary.stopped:
        return text + f"; stopped by {stop_name(summary.stop_signal)} before the end"
    if not tasks and not events:
        return text + (
            "; nothing left names this person's ids (already forgotten, or check the id; a Data "
            "Center user key: --key)"
        )
    who = f"the username {summary.pseudonym}" if summary.pseudonym else "the same account id"
    return (
        f'{text}\nThe person now appears as "{FORMER_USER}", under {who}.\n'
        "Next: a full export (jiralake export --once, per format you export) so that S3 latest/ no longer "
        "holds the old data; older history/ and changes/ files keep it (docs/runbook.md, Erasing a person)."
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "forget-user",
        help="erase one person's personal data from both tables (GDPR erasure)",
        usage="jiralake forget-user (--account-id ID | --username NAME [--pseudonym NAME] [--key KEY ...]) "
        "[--dry-run] [--batch-size N]",
        description="Scrubs one person from ap_jira_task and ap_jira_task_event: their user objects in "
        'raw and display names become "Former user", their email, avatar and time zone go; a Cloud '
        "account id stays, a Server/Data Center username becomes a stable pseudonym. In batches of "
        "short transactions, safe while the consumer runs; SIGINT/SIGTERM stop it at once. "
        "Never automatic; S3 files already written are not changed (see docs/runbook.md, Erasing a "
        "person). Settings: DATABASE_URL (else libpq's PG* variables).",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument(
        "--account-id", metavar="ID", action=argtypes.Once, help="the person's Jira Cloud accountId"
    )
    parser.add_argument(
        "--username", metavar="NAME", action=argtypes.Once, help="the person's Server/Data Center username"
    )
    parser.add_argument(
        "--pseudonym",
        metavar="NAME",
        action=argtypes.Once,
        help="with --username: the id to put in its place, such as the jirauserNNNNN that Jira's "
        "anonymization gave the person, so that old rows and Jira's new events agree (default: "
        "former-user- and a keyed hash of the username)",
    )
    parser.add_argument(
        "--key",
        metavar="KEY",
        action="append",
        default=[],
        help="with --username, repeatable: the person's Data Center user key where it differs from "
        "the username (JIRAUSER10500 for users created on Jira 8+). Changelog items name people by "
        "key; the command learns it from the person's user objects in ap_jira_task, but not for "
        "someone no current issue shows, nor on a rerun after the first erasure replaced it",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count the rows it would change; change nothing"
    )
    argtypes.add_batch_size(parser, default=DEFAULT_BATCH_SIZE, maximum=MAX_BATCH_SIZE)
    parser.set_defaults(func=_forget_user_command)


def _forget_user_command(args: argparse.Namespace) -> int:
    person = person_from_arguments(args.account_id, args.username, args.pseudonym, args.key)  # no database
    summary = asyncio.run(
        run(DatabaseSettings.from_env(os.environ), person, batch_size=args.batch_size, dry_run=args.dry_run)
    )
    print(render(summary))
    if summary.stopped:
        done = (
            "nothing was changed and the counts are partial"
            if summary.dry_run
            else "what was scrubbed stays scrubbed; run the same command again to finish"
        )
        raise CommandError(
            f"forget-user stopped by {stop_name(summary.stop_signal)} after {summary.batches} batch(es); "
            f"{done}",
            exit_code=signal_exit_code(summary.stop_signal),
        )
    return 0
