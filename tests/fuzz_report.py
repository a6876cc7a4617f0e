"""Counts the inputs the hostile-input tests tried and prints them in pytest's terminal summary.

Tests call :func:`tried` once per input. ``FuzzReport`` is registered on first use (no conftest
change needed), so the summary shows in a plain ``pytest -q`` run:

    hostile inputs tried: 412 (mutated_payloads 160, random_bytes 120, ...)
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

# Examples per property in the default run; `make soak` raises it (JIRALAKE_FUZZ_EXAMPLES=2000).
FUZZ_EXAMPLES = int(os.environ.get("JIRALAKE_FUZZ_EXAMPLES", "60"))


class FuzzReport:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.counts:
            return
        parts = ", ".join(f"{kind} {n}" for kind, n in sorted(self.counts.items()))
        terminalreporter.write_line(f"hostile inputs tried: {sum(self.counts.values())} ({parts})")


_PLUGIN_NAME = "jiralake-fuzz-report"


def report(config: pytest.Config) -> FuzzReport:
    """The session's report, registered with pytest the first time it is asked for."""
    plugin = config.pluginmanager.get_plugin(_PLUGIN_NAME)
    if plugin is None:
        plugin = FuzzReport()
        config.pluginmanager.register(plugin, _PLUGIN_NAME)
    assert isinstance(plugin, FuzzReport)
    return plugin
