"""An embedded AWS endpoint for local runs: moto's server (SQS + S3) in a child process, over HTTP.

Used by ``jiralake up`` and by the test suite, so both talk to the same real HTTP server. moto is
the ``local`` extra, not a base dependency: the production image installs none, so it may be absent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType

import structlog

from shared.errors import CommandError

log = structlog.get_logger()

# jiralake is installed from its checkout (no package index carries it): the extra is installed there.
INSTALL_LOCAL_EXTRA = "pip install '.[local]' in jiralake's checkout (`make install` does)"
# What `python -m moto.server` imports: moto, and the two its `server` extra adds for the HTTP app.
_SERVER_MODULES = ("moto", "flask", "flask_cors")


def _stop_leftover(pid_file: Path) -> None:
    """Stop the moto server a killed owner left running, if ``pid_file`` names one (a process whose
    command line runs moto.server: a process id is reused once its process is gone)."""
    try:
        pid = int(pid_file.read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    if b"moto.server" in command:
        log.warning("local_aws_leftover_stopped", pid=pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    pid_file.unlink(missing_ok=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def require_moto_server() -> None:
    """Refuse in one line, before anything starts, where moto's server is not installed."""
    for name in _SERVER_MODULES:
        if not _importable(name):
            raise CommandError(
                f"the local stack runs moto's server, which is not installed here (no module {name!r}); "
                f"install it with: {INSTALL_LOCAL_EXTRA}"
            )


def _importable(name: str) -> bool:
    """Whether ``import name`` would find the module, without importing it."""
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class LocalAws:
    """``with LocalAws() as aws: aws.endpoint_url`` starts moto's server and stops it on exit."""

    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    start_timeout_s: float = 30.0
    extra_env: dict[str, str] | None = None
    # Where the server's process id is kept while it runs: a server left running by a killed owner
    # (SIGKILL, a crash) is stopped by the next start with the same file.
    pid_file: Path | None = None
    _process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalAws:
        require_moto_server()
        if self.pid_file is not None:
            _stop_leftover(self.pid_file)
        if not self.port:
            self.port = free_port(self.host)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, **(self.extra_env or {}))
        # SIGINT blocked in moto's server (a child inherits the signal mask): a Ctrl-C at the terminal,
        # sent to the whole process group, goes to the stack, which drains its services against a
        # moto still running and then stops it (SIGTERM). It stays in the stack's process group, so
        # whatever else ends the group (a closed terminal's SIGHUP, a kill of the group) ends it too.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if self.pid_file is not None:
            self.pid_file.write_text(f"{self._process.pid}\n")
        try:
            self._wait_until_listening(self._process)
        except BaseException:  # a second Ctrl-C lands here too: `with` never gets to stop it
            self.stop()
            raise
        return self

    def _wait_until_listening(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise CommandError(f"moto's server exited with code {process.returncode}{self._see_log()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise CommandError(
            f"moto's server did not listen on {self.endpoint_url} within {self.start_timeout_s:g}s"
            f"{self._see_log()}"
        )

    def _see_log(self) -> str:
        return f"; see {self.log_path}" if self.log_path else ""

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> LocalAws:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
