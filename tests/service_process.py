"""A ``jiralake <command>`` child process that a test starts, kills and starts again, like a supervisor.

Each start is a new process with its own log file (``<name>-<n>.log`` in ``log_dir``: JSON lines on
stderr). Every exit is recorded with how it came about: ``sigkill`` / ``sigterm`` when the test sent
the signal, ``unexpected`` when the process ended on its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Exit:
    cause: str  # "sigkill", "sigterm" or "unexpected"
    code: int
    log_path: Path


@dataclass
class ServiceProcess:
    name: str
    args: Sequence[str]
    env: Mapping[str, str]
    log_dir: Path
    starts: int = 0
    exits: list[Exit] = field(default_factory=list)
    _child: asyncio.subprocess.Process | None = None
    _log_path: Path | None = None
    _watch: asyncio.Task[None] | None = None
    _signalled: str | None = None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.returncode is None

    async def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        self._log_path = self.log_dir / f"{self.name}-{self.starts}.log"
        self._signalled = None
        log = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "jiralake", "--log-json", *self.args,
                env=dict(self.env), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        finally:
            os.close(log)
        self._watch = asyncio.create_task(self._wait(self._child, self._log_path), name=f"{self.name}-watch")

    async def _wait(self, child: asyncio.subprocess.Process, log_path: Path) -> None:
        code = await child.wait()
        self.exits.append(Exit(self._signalled or "unexpected", code, log_path))

    async def kill(self) -> None:
        """SIGKILL: no cleanup, no chance to finish anything."""
        await self._signal(signal.SIGKILL, "sigkill")

    async def terminate(self, timeout_s: float = 60.0) -> Exit:
        """SIGTERM and wait for the graceful exit (SIGKILL after ``timeout_s``)."""
        await self._signal(signal.SIGTERM, "sigterm", timeout_s)
        return self.exits[-1]

    async def _signal(self, signum: signal.Signals, cause: str, timeout_s: float = 60.0) -> None:
        child, watch = self._child, self._watch
        assert child is not None and watch is not None
        if child.returncode is None:
            self._signalled = cause
            child.send_signal(signum)
        try:
            await asyncio.wait_for(asyncio.shield(watch), timeout_s)
        except TimeoutError:
            child.kill()
            await watch

    async def wait_until_logged(self, event: str, timeout_s: float = 60.0) -> None:
        """Until the current process logged a line with this event (e.g. ``receiver_started``)."""
        needle = f'"event": "{event}"'.encode()
        async with asyncio.timeout(timeout_s):
            while True:
                assert self._log_path is not None
                if needle in self._log_path.read_bytes():
                    return
                if not self.running:
                    raise AssertionError(f"{self.name} exited before logging {event}: {self.tail()}")
                await asyncio.sleep(0.1)

    def tail(self, lines: int = 20) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    def unexpected_exits(self) -> list[Exit]:
        return [e for e in self.exits if e.cause == "unexpected"]

    async def close(self) -> None:
        if self.running:
            await self.kill()
