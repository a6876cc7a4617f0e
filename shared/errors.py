"""Failures a command reports as one line and a non-zero exit, never as a traceback."""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, line breaks included, made one space: an error text can
    quote what a server answered (an HTML error page from a wrong endpoint path, a multi-line SQL
    error), and the user sees one line."""
    return " ".join(text.split())


class CommandError(Exception):
    """A command cannot do what was asked; the message says why. Exit code 1 unless given."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
