"""``jiralake --log-level`` and ``JIRALAKE_LOG_LEVEL``: a level logging does not know is refused in one
line, not silently replaced by INFO."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _jiralake(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "JIRALAKE_"))}
    return subprocess.run(
        [sys.executable, "-m", "jiralake", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=ROOT,
        timeout=60,
    )


def test_an_unknown_log_level_option_is_refused() -> None:
    result = _jiralake("--log-level", "verbose", "setup")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "jiralake: error: argument --log-level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, "
        "got 'verbose'"
    )


def test_an_unknown_log_level_variable_is_a_configuration_error() -> None:
    result = _jiralake("setup", JIRALAKE_LOG_LEVEL="debg")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "jiralake: configuration error: JIRALAKE_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, "
        "CRITICAL, got 'debg'"
    )


def test_known_levels_in_any_case_are_accepted_and_the_option_wins() -> None:
    # GIVEN a valid level (and WARN, which logging accepts too) THEN the command itself runs: here it
    # stops at its own missing setting, which shows the level was accepted
    for args, env in (
        (("--log-level", "debug"), {}),
        ((), {"JIRALAKE_LOG_LEVEL": "warn"}),
        (("--log-level", "ERROR"), {"JIRALAKE_LOG_LEVEL": "nonsense"}),
    ):
        result = _jiralake(*args, "setup", **env)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            "jiralake: configuration error: JIRALAKE_QUEUE_URL is not set "
            "(see the configuration table in README.md)"
        ), (args, env)
