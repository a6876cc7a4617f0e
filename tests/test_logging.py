"""Logging: JSON lines off a terminal, and secrets never written whatever a caller binds."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from shared import logging as jl_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # configure() binds the current sys.stderr (capsys's here): put the previous setup back after.
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_json_lines_with_secret_values_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    jl_logging.configure("INFO", json=True)
    structlog.get_logger().info(
        "webhook", issue_id="10040", webhook_secret="s3cr3t", signature="sha256=abc", api_token="t0k3n"
    )
    line = json.loads(capsys.readouterr().err.strip())
    assert line["event"] == "webhook" and line["issue_id"] == "10040" and line["level"] == "info"
    assert line["webhook_secret"] == line["signature"] == line["api_token"] == "[redacted]"


def test_levels_below_the_configured_one_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    jl_logging.configure("WARNING", json=True)
    structlog.get_logger().info("chatty")
    structlog.get_logger().warning("worth_reading")
    lines = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["worth_reading"]
