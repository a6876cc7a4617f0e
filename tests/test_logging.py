"""Logging: JSON lines off a terminal, and secrets never written whatever a caller binds."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from shared import logging as jl_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # configure() binds the current sys.stderr (capsys's here): put the previous setup back after.
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


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


# A DSN as a crash or a driver error may quote it: the password in the user-info, or in the query.
_DSN = "postgresql://jiralake:Sup3rS3cret@db.internal:5432/jiralake"
_QUERY_DSN = "postgresql://jiralake@db.internal:5432/jiralake?sslmode=require&password=Qu3ryS3cret"


def _crash_quoting_dsns() -> None:
    raise ValueError(f"cannot use {_DSN} nor {_QUERY_DSN}")


def test_an_exception_logged_as_json_has_its_passwords_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN JSON logging WHEN a crash whose message quotes two DSNs is logged with its traceback
    jl_logging.configure("INFO", json=True)
    try:
        _crash_quoting_dsns()
    except ValueError:
        structlog.get_logger().exception("command_crashed", command="export")
    line = json.loads(capsys.readouterr().err.strip())
    # THEN the traceback is there, without either password
    assert line["event"] == "command_crashed" and "ValueError: cannot use" in line["exception"]
    assert "Sup3rS3cret" not in line["exception"] and "Qu3ryS3cret" not in line["exception"]
    assert "postgresql://jiralake:[redacted]@db.internal:5432/jiralake" in line["exception"]
    assert "?sslmode=require&password=[redacted]" in line["exception"]


def test_an_exception_on_the_console_has_its_passwords_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    jl_logging.configure("INFO", json=False)
    try:
        _crash_quoting_dsns()
    except ValueError:
        structlog.get_logger().exception("command_crashed", command="export")
    text = capsys.readouterr().err
    assert "ValueError: cannot use postgresql://jiralake:[redacted]@db.internal:5432/jiralake" in text
    assert "Sup3rS3cret" not in text and "Qu3ryS3cret" not in text


def test_a_password_in_a_urls_query_string_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    # asyncpg, like libpq, takes the password from the query string too.
    jl_logging.configure("INFO", json=True)
    structlog.get_logger().warning("dependency_unavailable", error=f"cannot reach {_QUERY_DSN}")
    line = json.loads(capsys.readouterr().err.strip())
    assert line["error"] == (
        "cannot reach postgresql://jiralake@db.internal:5432/jiralake?sslmode=require&password=[redacted]"
    )


def test_a_librarys_traceback_is_one_redacted_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN JSON logging WHEN aiohttp's server logs a handler's crash through stdlib logging, as it
    # does for any exception a handler lets out (it answers 500)
    jl_logging.configure("INFO", json=True)
    try:
        _crash_quoting_dsns()
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "203.0.113.9")
    logging.getLogger("botocore.credentials").info("below WARNING: not written")
    # THEN it is one JSON line like every other, with the traceback and without the passwords
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["event"] == "Error handling request from 203.0.113.9"
    assert line["logger"] == "aiohttp.server" and line["level"] == "error"
    assert "ValueError: cannot use postgresql://jiralake:[redacted]@db.internal" in line["exception"]
    assert "Sup3rS3cret" not in lines[0] and "Qu3ryS3cret" not in lines[0]
