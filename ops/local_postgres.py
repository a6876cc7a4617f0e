"""Finds a PostgreSQL for the local stack: ``DATABASE_URL`` or libpq's defaults when reachable, else a
private server started from the machine's PostgreSQL binaries (initdb + pg_ctl) in a scratch folder.

The private server trusts every connection it gets (no password to keep), so it takes them only on
its Unix socket, in a new temporary folder only the server's user can enter (mode 700; short, as a
socket's path must be): no TCP port, and no other local user can connect, let alone as superuser.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import asyncpg
import structlog

from shared.errors import CommandError
from shared.settings import check_database_url
from shared.shutdown import wait_to_the_end

log = structlog.get_logger()

_SERVER_USER = "postgres"
# The private server's "port" only names its socket file (.s.PGSQL.5432) in its own folder: no TCP.
SOCKET_PORT = 5432

INSTALL_HINT = (
    "no PostgreSQL reachable and no PostgreSQL binaries found: set DATABASE_URL to a server, or install "
    "PostgreSQL (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql@16)"
)


@dataclass
class LocalPostgres:
    """A database URL for the local stack, and the private server behind it if one was started."""

    url: str | None
    data_dir: Path | None = None
    bin_dir: Path | None = None
    socket_dir: Path | None = None
    # True while the private server runs (stop() stops it).
    running: bool = field(default=False, repr=False)

    def stop(self) -> None:
        if self.running and self.bin_dir and self.data_dir:
            # As the server user, as it was started: pg_ctl refuses to run as root, and a server left
            # running keeps its lock file, so the next `jiralake up` could not start it.
            stopped = subprocess.run(
                as_server_user(
                    [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if stopped.returncode != 0:
                log.warning(
                    "private_postgres_not_stopped",
                    data_dir=str(self.data_dir),
                    error=" ".join(stopped.stderr.split())[-300:],
                )
            self.running = False
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None


async def reachable(url: str | None) -> bool:
    return await connect_problem(url) is None


async def connect_problem(url: str | None) -> str | None:
    """None when PostgreSQL at ``url`` accepts a connection, else why not, in a few words. The URL is
    never repeated (it may hold a password); a malformed one is a ConfigError, as in every command."""
    if url is not None:
        check_database_url(url)
    try:
        conn = await asyncpg.connect(dsn=url, timeout=3)
    except (TimeoutError, OSError):
        return "PostgreSQL does not answer there"
    except asyncpg.PostgresError as exc:
        return f"PostgreSQL refused the connection: {exc}"
    except ValueError:  # asyncpg's ClientConfigurationError included; its text may quote the password
        return "it is not a valid PostgreSQL URL"
    await conn.close()
    return None


def find_bin_dir() -> Path | None:
    candidates: list[str] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += sorted(glob.glob("/opt/homebrew/opt/postgresql*/bin"), reverse=True)
    for candidate in candidates:
        path = Path(candidate)
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    return None


async def ensure_database(server_url: str | None, name: str) -> str | None:
    """Use database ``name`` on the server (created if missing); returns its URL."""
    conn = await asyncpg.connect(dsn=server_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
        params = conn._params  # noqa: SLF001 - the resolved connection parameters
        addr = conn._addr  # noqa: SLF001
    finally:
        await conn.close()
    if isinstance(addr, tuple):
        return f"postgresql://{params.user}@{addr[0]}:{addr[1]}/{name}"
    return socket_url(params.user, name, Path(addr))


async def _stop_leftover(bin_dir: Path, data_dir: Path) -> None:
    """A server an earlier `jiralake up` left running in this folder (it was killed: SIGKILL, a crash)
    holds its lock file, and no new one could start: stop it first."""
    lock_file = data_dir / "postmaster.pid"
    if not lock_file.exists():
        return
    owner = _postmaster_of(data_dir)
    if owner is False:
        # Its process id is no server in this folder (dead, or reused since a reboot, maybe by
        # the machine's own PostgreSQL, which `pg_ctl stop` would have stopped): a stale file.
        log.warning("private_postgres_stale_lock_file_removed", data_dir=str(data_dir))
        lock_file.unlink(missing_ok=True)
        return
    status = await _run([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "status"])
    if status.returncode != 0:  # a stale lock file: pg_ctl start handles that itself
        return
    log.warning("private_postgres_leftover_stopped", data_dir=str(data_dir))
    await _run([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"])


def _postmaster_of(data_dir: Path) -> bool | None:
    """Whether the process in ``data_dir``'s lock file is a server of that folder (a server's working
    folder is its data folder); None when this process may not look (another user's, not as root)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir.resolve()
    except PermissionError:
        return None
    except (OSError, ValueError):  # no such process, an unreadable or truncated lock file
        return False


def _replace_empty_dir(target: Path, complete: Path) -> None:
    target.rmdir()  # empty: prepare_dir made it for initdb
    complete.rename(target)


def socket_url(user: str, database: str, socket: Path) -> str:
    """The URL of a server's Unix socket (``<folder>/.s.PGSQL.<port>``): its folder and port."""
    query = urlencode({"host": str(socket.parent), "port": socket.name.rpartition(".")[2]}, safe="/")
    return f"postgresql://{user}@/{database}?{query}"


async def local_postgres(
    database_url: str | None, scratch: Path, *, database: str = "jiralake"
) -> LocalPostgres:
    """The stack's database: the given URL as is, else a ``jiralake`` database on a local server."""
    if database_url:
        problem = await connect_problem(database_url)
        if problem is not None:
            raise CommandError(f"DATABASE_URL is set but {problem}", exit_code=2)
        return LocalPostgres(url=database_url)
    if await reachable(None):
        return LocalPostgres(url=await ensure_database(None, database))
    return await _start_private(scratch, database)


async def _run(cmd: list[str], *, own_session: bool = False) -> subprocess.CompletedProcess[str]:
    """``cmd`` as the server's user. ``own_session``: out of the terminal's process group, so a signal
    to the whole group (a closed terminal's SIGHUP, a kill of the group) does not end it half-way:
    `up` waits for it and then stops what it started."""
    return await asyncio.to_thread(
        subprocess.run,
        as_server_user(cmd),
        capture_output=True,
        text=True,
        check=False,
        start_new_session=own_session,
    )


def as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: there, run it as the system's ``postgres`` user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", _SERVER_USER, "--", *cmd]


def prepare_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(_SERVER_USER)
        except KeyError:
            raise CommandError(
                "PostgreSQL cannot run as root and there is no 'postgres' user to run it as; "
                "set DATABASE_URL to a server instead",
                exit_code=2,
            ) from None
        for part in (path, *path.parents):
            if part == Path("/") or part.stat().st_uid == owner.pw_uid:
                break
            if part == path:
                os.chown(part, owner.pw_uid, owner.pw_gid)
            else:
                os.chmod(part, part.stat().st_mode | 0o011)  # let the server user traverse


async def _start_private(scratch: Path, database: str) -> LocalPostgres:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise CommandError(INSTALL_HINT, exit_code=2)
    data_dir = scratch / "pgdata"
    user = "jiralake"
    prepare_dir(data_dir)
    pg = LocalPostgres(url=None, data_dir=data_dir, bin_dir=bin_dir)
    try:
        server_url = await _start_server(pg, bin_dir, data_dir, user)
        pg.url = await ensure_database(server_url, database)
    except BaseException:  # the caller only stops what it got back
        pg.stop()
        raise
    return pg


async def _start_server(pg: LocalPostgres, bin_dir: Path, data_dir: Path, user: str) -> str:
    """Start the server for ``pg`` (initialised first if new); returns the URL of its database
    ``postgres``."""
    # mkdtemp's folder is mode 700: the server trusts whoever reaches its socket, so only its user may.
    socket_dir = pg.socket_dir = Path(tempfile.mkdtemp(prefix="jiralake-pg-"))
    prepare_dir(socket_dir)  # as root, the server's user owns it
    if not (data_dir / "PG_VERSION").exists():
        # Into a folder of its own, renamed when complete: an initdb killed half-way (a crash, an OOM
        # kill) leaves a PG_VERSION in a folder no server can run on, and every later `up` failed.
        building = data_dir.with_name(data_dir.name + ".initdb")
        shutil.rmtree(building, ignore_errors=True)
        prepare_dir(building)
        init = await _run(
            [str(bin_dir / "initdb"), "-D", str(building), "-U", user, "--auth=trust", "-E", "UTF8"],
            own_session=True,
        )
        if init.returncode != 0:
            raise CommandError(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}", exit_code=2)
        await asyncio.to_thread(_replace_empty_dir, data_dir, building)
    port = SOCKET_PORT
    await _stop_leftover(bin_dir, data_dir)
    starting = asyncio.ensure_future(
        _run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data_dir),
                "-l",
                str(data_dir / "postgres.log"),
                "-w",
                "-o",
                f"-p {port} -c listen_addresses='' -k {socket_dir}",
                "start",
            ],
            own_session=True,
        )
    )
    try:
        start = await asyncio.shield(starting)
    except asyncio.CancelledError:
        # Stopped while the server starts (pg_ctl runs on in its thread): once it has, however often
        # asked to stop meanwhile, the caller stops it.
        await wait_to_the_end(starting)
        pg.running = starting.result().returncode == 0 or _postmaster_of(data_dir) is not False
        raise
    if start.returncode != 0:
        raise CommandError(f"could not start PostgreSQL (see {data_dir / 'postgres.log'})", exit_code=2)
    pg.running = True
    log.info("private_postgres_started", socket_dir=str(socket_dir), port=port, data_dir=str(data_dir))
    return socket_url(user, "postgres", socket_dir / f".s.PGSQL.{port}")
