"""``jiralake up``: the one-command local stack, run as a user runs it (a subprocess, with a time limit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from ops.local_postgres import find_bin_dir, local_postgres
from shared.errors import CommandError
from tests.conftest import _with_database

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def stack_database(pg_server_dsn: str) -> AsyncIterator[str]:
    """A database of its own: the stack migrates and fills it like a user's."""
    name = f"jiralake_up_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(pg_server_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "JIRALAKE_"))}
    env["DATABASE_URL"] = database_url
    return env


@pytest.mark.timeout(240)
def test_up_demo_runs_the_whole_pipeline_and_exits_0(stack_database: str, tmp_path: Path) -> None:
    # WHEN a newcomer runs the README's first command
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jiralake",
            "up",
            "--demo",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        env=_env(stack_database),
        cwd=ROOT,
        timeout=200,
    )
    # THEN every sample webhook was answered, the issues are in the table and the export is in S3
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    assert "Sent 66 sample webhooks: 50 queued, 16 ignored" in out
    assert "ap_jira_task now holds 19 issues" in out
    assert "Тестовый эпик" in out
    assert "jiralake/ap_jira_task/latest/ap_jira_task.csv" in out
    assert "jiralake/ap_jira_task/history/dt=" in out
    # and the secret it generated is in a private file, never in the output or the logs
    secret = (tmp_path / "state" / "webhook-secret").read_text().strip()
    assert oct((tmp_path / "state" / "webhook-secret").stat().st_mode & 0o777) == "0o600"
    assert secret not in out and secret not in result.stderr


@pytest.mark.timeout(120)
def test_up_stops_cleanly_on_ctrl_c(stack_database: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "jiralake", "up", "--port", "0", "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(stack_database),
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(2)]
        assert "webhook URL (paste into Jira)" in banner[1]
        time.sleep(1.0)  # let the services start listening before the interrupt
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert '"event": "consumer_stopped"' in err and '"event": "receiver_stopped"' in err


def test_up_with_an_unreachable_database_url_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jiralake", "up", "--port", "0", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env("postgresql://nobody@127.0.0.1:1/none"),
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "jiralake: DATABASE_URL is set but PostgreSQL does not answer there"


async def test_without_a_server_a_private_postgres_is_started_from_the_binaries(tmp_path: Path) -> None:
    if find_bin_dir() is None:
        with pytest.raises(CommandError, match="install PostgreSQL"):
            await local_postgres(None, tmp_path)
        return
    from ops import local_postgres as module

    pg = await module._start_private(tmp_path, "jiralake")
    try:
        conn = await asyncpg.connect(pg.url)
        assert await conn.fetchval("SELECT current_database()") == "jiralake"
        await conn.close()
    finally:
        pg.stop()
