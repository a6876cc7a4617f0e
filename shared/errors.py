"""Failures a command reports as one line and a non-zero exit, never as a traceback."""

from __future__ import annotations


class CommandError(Exception):
    """A command cannot do what was asked; the message says why. Exit code 1 unless given."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
