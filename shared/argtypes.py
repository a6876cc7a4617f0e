"""argparse ``type=`` converters the command modules share: a bad value is refused by argparse with
its usual usage line and exit code 2, naming the option and what it takes."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {raw!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return convert


def positive_number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {raw}")
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {raw}")
    return value


def seconds_at_least(minimum: float) -> Callable[[str], float]:
    """A finite number of seconds, ``minimum`` or more."""

    def convert(raw: str) -> float:
        value = positive_number(raw)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g} (seconds), got {raw}")
        return value

    return convert


def non_blank(raw: str) -> str:
    """A value that must say something: an empty one (an unset shell variable, ``--jql "$JQL"``) would
    otherwise read as "not given" and fall back to the default or the environment without a word."""
    if not raw.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return raw


def folder(raw: str) -> Path:
    """A folder to use or create: not empty (that would be the current folder), not an existing file."""
    path = Path(non_blank(raw))
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{raw!r} is a file, not a folder")
    return path


port = integer(0, 65535)
positive_int = integer(1)
non_negative_int = integer(0)


def add_batch_size(parser: argparse.ArgumentParser, *, default: int, maximum: int) -> None:
    """``--batch-size N`` of the commands that change rows in batches (forget-user, history prune)."""
    parser.add_argument(
        "--batch-size",
        type=integer(1, maximum),
        default=default,
        metavar="N",
        help=f"rows per batch, each its own transaction (default {default})",
    )


class Once(argparse.Action):
    """``action=Once``: an option that may be given once. argparse's default keeps the last of several,
    which drops the others without a word (``forget-user --account-id A --account-id B`` forgot B
    only)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, "given more than once; one per run")
        setattr(namespace, self.dest, values)


# -- options that only some modes of a command use --

# Whether a mode that uses the option is in effect: the parsed command line and the environment (a
# mode can come from a variable, such as export's JIRALAKE_EXPORT_SCHEDULE).
Applies = Callable[[argparse.Namespace, Mapping[str, str]], bool]

# The namespace attribute the rules of the parsed command travel in (see only_with).
_RULES_DEST = "_only_with_rules"


@dataclass(frozen=True)
class _Rule:
    parser: argparse.ArgumentParser
    option: str
    dest: str
    where: str
    applies: Applies


def only_with(parser: argparse.ArgumentParser, option: str, where: str, applies: Applies) -> None:
    """Refuse ``option`` given on the command line where ``applies`` says the mode in effect ignores it:
    ``parser``'s usage error, exit 2, ``<option> applies only <where>`` (``--admin-port applies only
    with --schedule``). Only the option is refused: the same setting from an environment variable is
    for whichever mode uses it (compose and deploy/ set them for every mode). The option must default
    to None (False for a flag), so that a value equal to the default still counts as given. The rules
    ride in the parser's defaults, so a parsed command line carries its own command's rules only;
    :func:`refuse_ignored` checks them."""
    (action,) = (a for a in parser._actions if option in a.option_strings)
    if action.default is not None and action.default is not False:
        raise ValueError(f"{option} defaults to {action.default!r}: only_with cannot tell it was given")
    rules = parser.get_default(_RULES_DEST) or ()
    rule = _Rule(parser, option, action.dest, where, applies)
    parser.set_defaults(**{_RULES_DEST: (*rules, rule)})


def refuse_ignored(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """The usage error (SystemExit 2) of the first option of ``args`` that its mode would ignore."""
    for rule in getattr(args, _RULES_DEST, ()):
        value = getattr(args, rule.dest)
        if value is not None and value is not False and not rule.applies(args, environ):
            rule.parser.error(f"{rule.option} applies only {rule.where}")
