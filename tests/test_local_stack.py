"""``jiralake up``: the one-command local stack, run as a user runs it (a subprocess, with a time limit)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from botocore.utils import should_bypass_proxies
from structlog.testing import capture_logs

from consumer.apply import apply_envelopes
from ops import demo
from ops import local_aws as local_aws_module
from ops import local_postgres as local_postgres_module
from ops.local_aws import LocalAws
from ops.local_postgres import find_bin_dir, local_postgres
from ops.local_stack import _demo_beside, _local_aws_environment, _redacted, _webhook_secret
from shared import migrate
from shared.errors import CommandError
from tests.conftest import _with_database, empty_database
from tests.jira_fixtures import make_event
from tests.tcp_proxy import postgres_proxy, through
from tests.test_consumer_helpers import envelope_of, holds, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none"


@pytest.fixture
async def stack_database(pg_server_dsn: str) -> AsyncIterator[str]:
    """A database of its own: the stack migrates and fills it like a user's."""
    async with empty_database(pg_server_dsn, "up") as url:
        yield url


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
    # and its output ends as the README shows it
    assert _ends_like(_readme_demo_sample(), out.rstrip("\n").splitlines())
    # and the secret it generated is in a private file, never in the output or the logs
    secret = (tmp_path / "state" / "webhook-secret").read_text().strip()
    assert oct((tmp_path / "state" / "webhook-secret").stat().st_mode & 0o777) == "0o600"
    assert secret not in out and secret not in result.stderr


def _normalized(line: str) -> str:
    """Today's date and the manifests' sizes (they hold the run's times) vary between runs."""
    line = re.sub(r"dt=\d{4}-\d{2}-\d{2}", "dt=DATE", line)
    return re.sub(r"(_manifest\.json)  \(\d+ bytes\)", r"\1  (N bytes)", line)


def _readme_demo_sample() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"`--keep-running` leaves the stack up.*?```\n(.*?)```", readme, re.DOTALL)
    assert found, "README.md no longer shows the demo's output"
    return found.group(1).rstrip("\n").splitlines()


def _ends_like(sample: list[str], actual: list[str]) -> bool:
    """The output ends with the sample's lines, where a ``...`` line stands for one or more lines."""
    any_lines = r"[^\n]*(?:\n[^\n]*)*?"
    pattern = "\n".join(
        any_lines if line.strip() == "..." else re.escape(_normalized(line)) for line in sample
    )
    text = "\n".join(_normalized(line) for line in actual)
    return re.search(rf"(?:\A|\n){pattern}\Z", text) is not None


@pytest.mark.timeout(120)
def test_up_stops_cleanly_on_ctrl_c(stack_database: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "jiralake", "up", "--port", "0", "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(stack_database),
        cwd=ROOT,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(2)]
        assert "webhook URL (paste into Jira)" in banner[1]
        # Ctrl-C once both services have started (their signal handlers are in place by then)
        assert proc.stderr is not None
        waiting_for = {'"event": "consumer_starting"', '"event": "receiver_started"'}
        while waiting_for:
            line = proc.stderr.readline()
            assert line, f"the stack ended before starting its services (exit {proc.wait()})"
            waiting_for = {event for event in waiting_for if event not in line}
        # to the whole process group, as a terminal's Ctrl-C does
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert '"event": "consumer_stopped"' in err and '"event": "receiver_stopped"' in err
    # AND the services drained against a moto still running (it is in a session of its own, stopped
    # last), not one the Ctrl-C had already ended
    assert "dependency_unavailable" not in err and "EndpointConnectionError" not in err, err[-2000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
async def test_a_signal_while_up_starts_stops_what_it_had_started(
    stack_database: str, tmp_path: Path, sig: signal.Signals
) -> None:
    # GIVEN `jiralake up` starting: its database answered the first check, then froze (setup waits on
    # it), and moto's server has started
    proxy = await postgres_proxy(stack_database)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "up", "--port", "0", "--state-dir", str(tmp_path / "state"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(through(proxy, stack_database)),
        cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    moto: int | None = None
    try:
        await wait_for(holds(lambda: proxy.accepted > 0 and proxy.open_connections == 0), what="the check")
        proxy.freeze()
        await wait_for(holds(lambda: _child_of(proc.pid, "moto.server") is not None), what="moto's server")
        moto = _child_of(proc.pid, "moto.server")
        # WHEN the signal arrives (SIGHUP: the terminal was closed)
        proc.send_signal(sig)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proxy.close()
        left = moto is not None and _alive(moto)
        if left:
            os.kill(moto, signal.SIGKILL)  # type: ignore[arg-type]
    # THEN it exits with the signal's code and one line, and moto's server did not outlive it
    assert proc.returncode == 128 + sig, err.decode()[-2000:]
    assert err.decode().splitlines()[-1] == (
        f"jiralake: up stopped by {sig.name} while starting; what it had started is stopped"
    )
    assert not left


def _child_of(parent: int, marker: str) -> int | None:
    """The pid of a child process of ``parent`` whose command line holds ``marker``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and marker in command:
            return int(entry.name)
    return None


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_moto_server_that_cannot_start_is_one_line_naming_its_log(tmp_path: Path) -> None:
    # GIVEN a port already bound (not listening, so nothing answers there), for moto's server to fail on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        local = LocalAws(port=port, log_path=tmp_path / "moto.log", start_timeout_s=20)
        # WHEN the local stack starts it
        with pytest.raises(CommandError) as failed:
            local.start()
    # THEN the command's one line says so and where to look (not a crash with a traceback)
    assert re.fullmatch(
        rf"moto's server exited with code \d+; see {re.escape(str(tmp_path))}/moto.log", str(failed.value)
    )


def _up(tmp_path: Path, *args: str, database_url: str = UNREACHABLE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jiralake", "up", "--state-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        env=_env(database_url),
        cwd=ROOT,
        timeout=60,
    )


def test_up_with_a_host_that_is_not_this_machine_says_so_not_port_in_use(tmp_path: Path) -> None:
    # GIVEN an address of no interface here (TEST-NET-3), and one that does not resolve
    for host in ("203.0.113.1", "no-such-host.invalid"):
        # WHEN the stack is asked to listen there
        result = _up(tmp_path, "--host", host, "--port", "0")
        # THEN it refuses before starting anything, naming the host, not a port in use
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"jiralake: cannot listen on {host}: "), line
        assert line.endswith("pass --host with an IPv4 address of this machine (default 127.0.0.1)")


def test_up_on_a_port_in_use_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _up(tmp_path, "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"jiralake: port {port} on 127.0.0.1 is in use; pass --port with a free one (0 = any)"
    )


@pytest.mark.parametrize(
    ("schedule", "why"),
    [
        ("every day", "is not a valid cron expression (5 fields: minute hour day month weekday)"),
        ("0 0 31 2 *", "never fires (no such date)"),
    ],
)
def test_up_refuses_a_bad_export_schedule_before_starting_anything(
    tmp_path: Path, schedule: str, why: str
) -> None:
    result = _up(tmp_path, "--port", "0", "--export-schedule", schedule)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"jiralake up: error: argument --export-schedule: schedule {schedule!r} {why} (e.g. '*/15 * * * *')"
    )
    assert not (tmp_path / "moto.log").exists()


def test_up_with_a_malformed_database_url_says_so_in_one_line(tmp_path: Path) -> None:
    # GIVEN a DATABASE_URL whose port is not a number (and which holds a password)
    result = _up(tmp_path, "--port", "0", database_url="postgresql://me:s3cret@127.0.0.1:54x2/jiralake")
    # THEN one line, exit 2, no traceback and no password
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "jiralake: configuration error: DATABASE_URL has a port that is not a number 1..65535 "
        "(percent-encode any #, ? or / in the password)"
    )


def test_up_with_a_missing_database_says_what_postgres_answered(pg_server_dsn: str, tmp_path: Path) -> None:
    # GIVEN a server that answers, and a database it does not have
    missing = f"jiralake_missing_{uuid.uuid4().hex[:8]}"
    result = _up(tmp_path, "--port", "0", database_url=_with_database(pg_server_dsn, missing))
    # THEN the line says what PostgreSQL answered, not that it does not answer
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f'jiralake: DATABASE_URL is set but PostgreSQL refused the connection: database "{missing}" '
        "does not exist"
    )


def test_an_empty_secret_file_gets_a_new_secret_not_an_empty_one(tmp_path: Path) -> None:
    # GIVEN the secret file of a run interrupted between creating and writing it
    (tmp_path / "webhook-secret").touch(mode=0o600)
    # WHEN the stack picks its secret
    secret, path = _webhook_secret({"JIRALAKE_WEBHOOK_SECRET": "  "}, tmp_path)
    # THEN it is a fresh one, kept in that file (a blank variable counts as unset)
    assert len(secret) >= 32
    assert path.read_text() == secret


def test_the_secret_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    # GIVEN an empty secret file that others can read (touch's mode applies to new files only)
    path = tmp_path / "webhook-secret"
    path.touch()
    path.chmod(0o644)
    # WHEN the stack writes its secret there THEN only its owner can read it
    _webhook_secret({}, tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    # AND a secret file left readable by others is made private when it is used
    path.chmod(0o644)
    secret, _ = _webhook_secret({}, tmp_path)
    assert (path.stat().st_mode & 0o777, path.read_text()) == (0o600, secret)


def test_the_banner_hides_a_password_in_either_place_of_the_url() -> None:
    assert "S3cret" not in _redacted("postgresql://jl@db/x?password=S3cret")
    assert "S3cret" not in _redacted("postgresql://jl:S3cret@db/x")
    assert _redacted(None) == "(libpq defaults)"


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
    socket_dir = pg.socket_dir
    try:
        conn = await asyncpg.connect(pg.url)
        assert await conn.fetchval("SELECT current_database()") == "jiralake"
        # AND it trusts connections only on its socket, in a folder nobody but its own user may enter
        assert await conn.fetchval("SHOW listen_addresses") == ""
        await conn.close()
        assert socket_dir is not None and (socket_dir / ".s.PGSQL.5432").is_socket()
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        assert pg.url == f"postgresql://jiralake@/jiralake?host={socket_dir}&port=5432"
    finally:
        pg.stop()
    assert not socket_dir.exists()
    # AND stopping it stops the server (as root too: pg_ctl must run as the server user), so the next
    # `jiralake up` in the same folder starts it again instead of finding its lock file taken
    with pytest.raises(OSError):
        await asyncpg.connect(pg.url, timeout=3)
    again = await module._start_private(tmp_path, "jiralake")
    again.stop()


async def test_a_private_postgres_an_earlier_up_left_running_is_stopped_and_started_again(
    tmp_path: Path,
) -> None:
    if find_bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries on this machine")
    from ops import local_postgres as module

    # GIVEN the private server of an `up` that was killed (SIGKILL): it runs on, holding its lock file
    killed = await module._start_private(tmp_path, "jiralake")
    try:
        # WHEN the next `up` starts in the same folder
        with capture_logs() as logs:
            pg = await module._start_private(tmp_path, "jiralake")
        try:
            # THEN it stopped the leftover and runs its own
            conn = await asyncpg.connect(pg.url)
            assert await conn.fetchval("SELECT current_database()") == "jiralake"
            await conn.close()
        finally:
            pg.stop()
    finally:
        killed.stop()  # its socket folder (and, if the test failed, its server)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["private_postgres_leftover_stopped"]


async def test_a_stop_while_the_private_postgres_starts_stops_it_once_it_has(tmp_path: Path) -> None:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries on this machine")
    from ops import local_postgres as module

    # GIVEN the private server starting (pg_ctl start has begun writing its log)
    starting = asyncio.create_task(module._start_private(tmp_path, "jiralake"))
    log = tmp_path / "pgdata" / "postgres.log"
    await wait_for(holds(lambda: log.exists() or starting.done()), what="pg_ctl start", timeout_s=60)
    # WHEN Ctrl-C comes, twice
    starting.cancel()
    await asyncio.sleep(0)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    # THEN no server is left running in the folder (the next `up` could not start one)
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(tmp_path / "pgdata")]
    status = await module._run([*pg_ctl, "status"])
    if status.returncode == 0:
        await module._run([*pg_ctl, "-m", "immediate", "-w", "stop"])
    assert status.returncode == 3, status.stdout  # 3: no server running


def test_the_demo_finds_the_samples_of_the_checkout_it_runs_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN jiralake installed as a plain package (no samples beside its code), run from a checkout
    monkeypatch.setattr(demo, "DEFAULT_FIXTURES", tmp_path / "site-packages" / "tests" / "fixtures")
    monkeypatch.chdir(ROOT)
    # WHEN the demo looks for its samples, THEN it takes the checkout's
    assert demo.fixtures_dir(None) == ROOT / "tests" / "fixtures" / "jira-webhooks"
    # AND elsewhere it names both places it looked
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CommandError, match=r"^no sample webhooks in .*site-packages.* or .*: run from a"):
        demo.fixtures_dir(None)


async def test_the_demo_stops_at_once_when_a_service_ends_before_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a demo that would wait for ever (for events the stack will never apply), and a receiver
    # that fails at start (its port taken after the pre-check)
    async def receiver() -> None:
        raise OSError(98, "error while attempting to bind on address ('127.0.0.1', 8080): address in use")

    waiting = asyncio.Event()
    services = [asyncio.create_task(receiver(), name="receiver")]
    # WHEN the demo runs beside the services, THEN it ends with exit code 1 as soon as the receiver does
    stop = asyncio.Event()
    assert await asyncio.wait_for(_demo_beside(services, _wait_then(waiting, 0), stop), timeout=10) == 1
    assert "The demo stopped: receiver ended before it finished" in capsys.readouterr().out
    assert isinstance(services[0].exception(), OSError)
    # AND a demo that finishes first gives its own exit code
    idle = [asyncio.create_task(asyncio.Event().wait(), name="consumer")]
    waiting.set()
    assert await _demo_beside(idle, _wait_then(waiting, 0), stop) == 0
    idle[0].cancel()
    # AND a stop request (Ctrl-C) that ends the services is named as such, not as a service failing
    stop.set()
    stopping = [asyncio.create_task(stop.wait(), name="receiver")]
    assert await _demo_beside(stopping, _wait_then(asyncio.Event(), 0), stop) is None
    assert capsys.readouterr().out.strip().endswith("The demo was stopped before it finished.")


async def _wait_then(event: asyncio.Event, code: int) -> int:
    await event.wait()
    return code


def test_moto_ignores_a_terminal_s_ctrl_c_but_shares_the_stack_s_process_group(tmp_path: Path) -> None:
    # GIVEN the local stack's moto server, started
    with LocalAws(log_path=tmp_path / "moto.log") as local:
        assert local._process is not None
        pid = local._process.pid
        status = Path(f"/proc/{pid}/status").read_text()
        blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.MULTILINE)[1], 16)  # type: ignore[index]
        # THEN SIGINT is blocked there (a terminal's Ctrl-C reaches the stack, which stops moto last) ...
        assert blocked & (1 << (signal.SIGINT - 1))
        # ... while it stays in this process's group, so a kill of the group or a closed terminal's
        # SIGHUP ends it too (in a session of its own it outlived a killed stack)
        assert os.getpgid(pid) == os.getpgid(0)
        # AND this process's own signal mask is as it was
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_a_second_ctrl_c_while_moto_starts_stops_moto_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN moto's server starting, and a second Ctrl-C (asyncio raises KeyboardInterrupt at once)
    # landing while the stack waits for it to listen
    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(popen(*args, **kwargs))
        return started[-1]

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("subprocess.Popen", recording_popen)
    monkeypatch.setattr("socket.create_connection", interrupted)
    # WHEN it is started, THEN the interrupt goes on, and moto's server is stopped, not orphaned
    try:
        with pytest.raises(KeyboardInterrupt):
            LocalAws(log_path=tmp_path / "moto.log").start()
        [process] = started
        assert process.poll() is not None
    finally:
        for leftover in started:
            if leftover.poll() is None:
                leftover.kill()
                leftover.wait()


@pytest.mark.timeout(120)
async def test_the_demo_refuses_a_database_that_holds_real_issues(
    stack_database: str, tmp_path: Path
) -> None:
    # GIVEN DATABASE_URL left pointing at a jiralake database that holds a real issue
    conn = await asyncpg.connect(stack_database)
    try:
        await migrate.apply(conn)
        event = make_event("mattermost-plugin-jira__webhook-issue-created.json", issue_id=999001, ts=1000)
        assert (await apply_envelopes(conn, [envelope_of(event)])).counts() == {"applied": 1}
        # WHEN a newcomer runs the demo
        result = await asyncio.to_thread(_up, tmp_path, "--demo", "--port", "0", database_url=stack_database)
        # THEN it refuses in one line before touching the table: no sample issue was added
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == (
            "jiralake: the database holds 1 issue(s) that are not the demo's samples (DATABASE_URL "
            "pointing at a real jiralake database?): the demo would add its sample issues to that table "
            "and its exports; unset DATABASE_URL or point it at an empty database"
        )
        assert await conn.fetchval("SELECT count(*) FROM ap_jira_task") == 1
    finally:
        await conn.close()


def test_a_second_up_on_the_same_state_folder_is_refused(tmp_path: Path) -> None:
    # GIVEN an `up` running with a state folder (its lock held)
    fd = os.open(tmp_path / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # WHEN another starts on it, THEN it refuses before starting anything: it would have stopped
        # the first one's private PostgreSQL as a leftover
        result = _up(tmp_path, "--port", "0")
    finally:
        os.close(fd)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"jiralake: another `jiralake up` is running with the state folder {tmp_path}: stop it, or give this "
        "one another --state-dir"
    )


@pytest.mark.parametrize("option", ["--host", "--state-dir"])
def test_up_refuses_an_empty_host_or_state_folder(tmp_path: Path, option: str) -> None:
    # WHEN `--host ""` (every interface) or `--state-dir ""` (the current folder) is given
    result = _up(tmp_path, option, "")
    # THEN argparse refuses it in one line
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1] == f"jiralake up: error: argument {option}: must not be empty"
    )


def test_up_refuses_a_state_folder_that_is_a_file(tmp_path: Path) -> None:
    # GIVEN a file where the state folder should be
    (tmp_path / "state").write_text("not a folder")
    # WHEN `up` is given it THEN argparse refuses it in one line, before anything starts
    result = _up(tmp_path, "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"jiralake up: error: argument --state-dir: '{tmp_path / 'state'}' is a file, not a folder"
    )


def test_a_secret_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "webhook-secret").write_bytes(b"caf\xe9secret")
    with pytest.raises(CommandError) as refused:
        _webhook_secret({}, tmp_path)
    assert refused.value.exit_code == 2
    assert str(refused.value).startswith(
        f"the webhook secret file {tmp_path / 'webhook-secret'} is not UTF-8"
    )


async def test_a_lock_file_naming_another_process_is_removed_and_that_process_left_alone(
    tmp_path: Path,
) -> None:
    # GIVEN a private server's folder whose lock file names a process id that now belongs to another
    # process (ids are reused after a reboot): here one running in another folder
    data_dir = tmp_path / "pgdata"
    data_dir.mkdir()
    other = await asyncio.create_subprocess_exec("sleep", "30", cwd=tmp_path)
    try:
        (data_dir / "postmaster.pid").write_text(f"{other.pid}\n{data_dir}\n")
        # WHEN the next `up` looks for a leftover server there
        with capture_logs() as logs:
            await local_postgres_module._stop_leftover(tmp_path / "no-bin", data_dir)
        # THEN the lock file is taken for stale and removed, and the other process is not signalled
        assert not (data_dir / "postmaster.pid").exists()
        assert other.returncode is None
        assert [e["event"] for e in logs] == ["private_postgres_stale_lock_file_removed"]
    finally:
        other.kill()
        await other.wait()


@pytest.mark.timeout(120)
async def test_a_signal_to_the_whole_group_while_the_private_postgres_starts_leaves_it_stopped(
    tmp_path: Path,
) -> None:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries on this machine")
    # GIVEN `jiralake up` in a terminal's process group, starting a private server (no server answers
    # where libpq's variables point)
    env = {k: v for k, v in _env(UNREACHABLE).items() if k != "DATABASE_URL"}
    env |= {"PGHOST": str(tmp_path / "no-server"), "PGPORT": "5432"}
    state = tmp_path / "state"
    lock_file = state / "pgdata" / "postmaster.pid"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "up", "--port", "0", "--state-dir", str(state),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    try:
        log_file = lock_file.parent / "postgres.log"
        for _ in range(30_000):  # the moment the server is ready, before pg_ctl (polling) notices
            if log_file.exists() and "ready to accept connections" in log_file.read_text():
                break
            await asyncio.sleep(0.002)
        # WHEN the whole group gets SIGHUP (the terminal was closed) while pg_ctl waits for the server
        os.killpg(proc.pid, signal.SIGHUP)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        leaked = lock_file.exists()
        if leaked:
            stopping = await asyncio.create_subprocess_exec(
                *local_postgres_module.as_server_user(
                    [str(bin_dir / "pg_ctl"), "-D", str(lock_file.parent), "-m", "immediate", "stop"]
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await stopping.wait()
    # THEN it exits with SIGHUP's code, and the server it was starting is stopped (pg_ctl, out of the
    # group, ran to its end; a killed pg_ctl left the server running, unreachable)
    assert proc.returncode == 128 + signal.SIGHUP, err.decode()[-2000:]
    assert not leaked


def test_the_local_stack_s_aws_requests_go_past_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a machine whose environment sends HTTP through a proxy, for other hosts than its own list
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    monkeypatch.delenv("no_proxy", raising=False)
    moto = "http://127.0.0.1:5000/"
    assert not should_bypass_proxies(moto)
    # WHEN the local stack runs, THEN the SDK goes to moto directly, and the list is kept
    with _local_aws_environment():
        assert should_bypass_proxies(moto)
        assert os.environ["NO_PROXY"] == "internal.example,127.0.0.1"
    # AND afterwards the environment is as it was
    assert os.environ["NO_PROXY"] == "internal.example" and "no_proxy" not in os.environ


async def test_a_moto_server_a_killed_up_left_running_is_stopped_by_the_next_one(tmp_path: Path) -> None:
    # GIVEN the pid file of a killed `up`'s moto server, still running, and one naming a process id
    # since reused by something else
    left = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", "moto.server"
    )
    other = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        (tmp_path / "moto.pid").write_text(f"{left.pid}\n")
        (tmp_path / "other.pid").write_text(f"{other.pid}\n")
        # WHEN the next start looks at them
        with capture_logs() as logs:
            local_aws_module._stop_leftover(tmp_path / "moto.pid")
            local_aws_module._stop_leftover(tmp_path / "other.pid")
        # THEN the moto server is stopped, the other process is left alone, and both files are gone
        assert await asyncio.wait_for(left.wait(), 10) == -signal.SIGTERM
        assert other.returncode is None
        assert not (tmp_path / "moto.pid").exists() and not (tmp_path / "other.pid").exists()
        assert [e["event"] for e in logs] == ["local_aws_leftover_stopped"]
    finally:
        for process in (left, other):
            if process.returncode is None:
                process.kill()
                await process.wait()
