"""A pytest plugin that prints what a test recorded (figures of a fault-injection run) at the end of the
session, in the terminal summary, so the figures show in a plain ``pytest -q`` run.

Tests call :func:`record`. Load it from tests/conftest.py with
``pytest_plugins = ["tests.fault_report"]``; :func:`record` also registers it on first use when it is
not loaded, so it works either way.
"""

from __future__ import annotations

import sys

import pytest

PLUGIN_NAME = "tests.fault_report"
_REPORTS = pytest.StashKey[list[tuple[str, list[str]]]]()


def record(config: pytest.Config, title: str, lines: list[str]) -> None:
    """Print ``lines`` under a ``title`` separator in the terminal summary of this session."""
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(sys.modules[__name__], PLUGIN_NAME)
    config.stash.setdefault(_REPORTS, []).append((title, lines))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for title, lines in config.stash.get(_REPORTS, []):
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)
