"""A private PostgreSQL server for one test, which the test may stop and start again at will (the
machine's shared server must never be restarted): initdb in a scratch folder, then pg_ctl on a fixed
free port, so clients reconnect to the same address after a restart.

Uses the binaries ``ops.local_postgres`` finds (and, as root, runs them as the ``postgres`` user the
same way). :func:`binaries_missing` says why a test must skip.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from ops.local_aws import free_port
from ops.local_postgres import as_server_user, find_bin_dir, prepare_dir

USER = "jiralake"


def binaries_missing() -> str | None:
    """Why no private server can start here, or None."""
    if find_bin_dir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) on this machine"
    return None


class PrivatePostgres:
    def __init__(self, scratch: Path) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(binaries_missing())
        self.bin_dir = bin_dir
        self.data_dir = scratch / "pgdata"
        self.socket_dir = scratch / "pgsocket"
        self.port = free_port()
        self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    async def init(self) -> None:
        prepare_dir(self.data_dir)
        prepare_dir(self.socket_dir)
        await self._run("initdb", "-D", str(self.data_dir), "-U", USER, "--auth=trust", "-E", "UTF8")

    async def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.socket_dir} -c fsync=off "
            "-c max_connections=50"
        )
        log = str(self.data_dir / "postgres.log")
        await self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", log, "-w", "-t", "120", "-o", options, "start"
        )
        self.running = True

    async def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown that ends every session; ``immediate``: like a crash (the next start
        runs crash recovery)."""
        await self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "120", "stop")
        self.running = False

    async def close(self) -> None:
        if self.running:
            await self.stop("immediate")

    def close_now(self) -> None:
        """For a finalizer (no event loop): stop the server if it still runs, as a crash would."""
        if self.running:
            cmd = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"]
            subprocess.run(as_server_user(cmd), capture_output=True, check=False)
            self.running = False

    async def _run(self, program: str, *args: str) -> None:
        cmd = as_server_user([str(self.bin_dir / program), *args])
        done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
