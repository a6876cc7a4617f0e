"""What every benchmark stage shares: medians, the summary line, the machine description, a scratch
database, moto's server, and measuring child processes (wall time, CPU seconds, peak RSS).

Child processes are reaped with ``os.wait4``, which returns that one child's own CPU seconds
(``ru_utime + ru_stime``), so a figure never mixes in the bench process or another child. Peak RSS is
NOT taken from ``ru_maxrss``: Linux carries the forking process's high-water mark into the child's
``ru_maxrss`` across exec (fs/exec.c keeps the old mm's hiwater), so every child would report at
least the bench process's own size. It is read instead from the child's ``/proc/<pid>/status``
``VmHWM`` (the high-water mark of the child's own address space), sampled every 10 ms until it exits.
A process that must be measured while it keeps running (the receiver under a burst) is read from
``/proc`` through psutil before and after.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ops.local_aws import LocalAws
from shared import migrate
from shared.settings import AwsSettings

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
REGION = "us-east-1"
# moto accepts any credentials; boto and the AWS CLI need some to sign requests.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
}
MB = 1_000_000
RSS_SAMPLE_S = 0.01
MIB = 1024 * 1024


# -- statistics and the summary line --


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def spread(values: Sequence[float], fmt: str = "{:,.2f}") -> str:
    """``median (min-max, n runs)`` for the detail tables."""
    return (
        f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))}, n={len(values)})"
    )


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


def fmt_ratio(value: float, threshold: float | None = None) -> str:
    """Two decimals, or three when two would round onto the threshold and hide which side it is on."""
    text = f"{value:.2f}"
    if threshold is not None and value != threshold and float(text) == threshold:
        text = f"{value:.3f}"
    return text


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


@dataclass(frozen=True)
class Figure:
    """One figure of one stage, printed as one summary line that can be compared across runs.

    ``passed`` is None for a figure that has no target (reported for context, e.g. latency)."""

    name: str
    headline: str
    target: str | None = None
    passed: bool | None = None

    def line(self) -> str:
        if self.target is None:
            return f"{self.name}: {self.headline} [no target]"
        verdict = "PASS" if self.passed else "MISS"
        return f"{self.name}: {self.headline} [target {self.target}] {verdict}"


@dataclass
class StageResult:
    """A stage's figures, its detail table (markdown rows), and what bounds each figure (prose)."""

    stage: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    table_header: tuple[str, ...] = ()
    table_rows: list[tuple[str, ...]] = field(default_factory=list)
    method: str = ""
    bounds: str = ""
    findings: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0


@dataclass(frozen=True)
class BenchContext:
    """What run_all hands every stage."""

    dsn: str  # the PostgreSQL server (scratch databases are created there)
    quick: bool = False
    reps: int | None = None  # overrides each stage's own number of runs

    def runs(self, full: int, quick: int = 2) -> int:
        return self.reps if self.reps is not None else (quick if self.quick else full)


# -- the machine --


def machine_description(postgres_version: str) -> dict[str, str]:
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{_mem_total_bytes() / 1024**3:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgres": postgres_version,
        "moto": _version("moto"),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


# -- PostgreSQL --


def server_dsn(env: Mapping[str, str] = os.environ) -> str:
    """``DATABASE_URL``, else libpq's PG* variables, else the local server as user postgres."""
    url = env.get("DATABASE_URL")
    if url:
        return url
    host = env.get("PGHOST", "127.0.0.1")
    port = env.get("PGPORT", "5432")
    user = env.get("PGUSER", "postgres")
    password = env.get("PGPASSWORD", "")
    dbname = env.get("PGDATABASE", "postgres")
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@{host}:{port}/{dbname}"


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def postgres_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


@asynccontextmanager
async def scratch_database(dsn: str, label: str) -> AsyncIterator[str]:
    """A new database with the jiralake schema, dropped afterwards; yields its URL."""
    name = f"jiralake_bench_{label}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(dsn, name)
        try:
            conn = await asyncpg.connect(url)
            try:
                await migrate.apply(conn)
            finally:
                await conn.close()
            yield url
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# -- moto --


@contextmanager
def local_aws(log_name: str) -> Iterator[AwsSettings]:
    """moto's server as a child process (HTTP), with bench credentials in this process's environment."""
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    server = LocalAws(log_path=RESULTS_DIR / f"moto-{log_name}.log")
    try:
        with server:
            yield AwsSettings(region=REGION, endpoint_url=server.endpoint_url)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def child_env(aws: AwsSettings | None = None, **extra: str) -> dict[str, str]:
    """The environment for a measured child: ours, bench credentials, the endpoint, and ``extra``."""
    env = dict(os.environ, **AWS_ENV)
    env.pop("AWS_PROFILE", None)
    if aws is not None and aws.endpoint_url:
        env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# -- child processes --


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    wall_s: float
    cpu_s: float
    max_rss_bytes: int
    stdout: str
    stderr: str

    def check(self, what: str) -> ChildRun:
        if self.returncode != 0:
            raise RuntimeError(f"{what} exited with {self.returncode}: {self.stderr[-2000:]}")
        return self


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout_path: str | os.PathLike[str] | None = None,
    capture_stdout: bool = True,
    stdin_path: str | os.PathLike[str] | None = None,
) -> ChildRun:
    """Run a child to completion and return its own wall time, CPU seconds and peak RSS.

    stdout goes to ``stdout_path`` when given, else (``capture_stdout``) to a temporary file that is
    returned as text, else to /dev/null. Blocking: call it through ``asyncio.to_thread`` from async code.
    """
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as captured:
        if stdout_path is not None:
            out: Any = open(stdout_path, "wb")  # noqa: SIM115 - closed below
        elif capture_stdout:
            out = captured
        else:
            out = subprocess.DEVNULL
        stdin: Any = open(stdin_path, "rb") if stdin_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            started = time.perf_counter()
            proc = subprocess.Popen(
                list(argv), stdout=out, stderr=err, stdin=stdin, env=dict(env or os.environ)
            )
            peak_kib = 0
            while True:
                done, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if done:
                    break
                peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
                time.sleep(RSS_SAMPLE_S)
            wall_s = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if stdout_path is not None:
                out.close()
            if stdin_path is not None:
                stdin.close()
        captured.seek(0)
        err.seek(0)
        return ChildRun(
            returncode=proc.returncode,
            wall_s=wall_s,
            cpu_s=usage.ru_utime + usage.ru_stime,
            max_rss_bytes=peak_kib * 1024,
            stdout=captured.read().decode("utf-8", "replace"),
            stderr=err.read().decode("utf-8", "replace"),
        )


def vm_hwm_kib(pid: int | str) -> int:
    """The peak resident set of a live process's address space (``VmHWM``), KiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far, to the nanosecond.

    The kernel's per-thread run time (``/proc/PID/task/*/schedstat``, nanoseconds) rather than
    utime + stime, which count 10 ms ticks: a burst that costs the bare handler 30 ms of CPU would
    read as 2, 3 or 4 ticks. Threads that already exited are not in the sum, so it is for reading a
    running server before and after a burst (its threads live as long as it does); where schedstat
    is missing, the tick counts."""
    try:
        total_ns = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            total_ns += int((task / "schedstat").read_text().split()[0])
        return total_ns / 1e9
    except (OSError, ValueError, IndexError):
        import psutil  # type: ignore[import-untyped]

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)


def python_argv(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter (the project's venv)."""
    return [sys.executable, "-m", module, *args]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return float(ordered[rank - 1])


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_mb(value_bytes: float) -> str:
    return f"{value_bytes / MB:,.0f} MB"


# PostgreSQL's parallel query workers: "postgres: 15/main: parallel worker for PID 1234".
_PARALLEL_WORKER = re.compile(r"parallel worker for PID (\d+)")


class CpuWatch:
    """CPU seconds used, while the watch runs, by the processes whose command line contains any of
    ``markers`` (e.g. a scratch database's name for its PostgreSQL backends, moto's port).

    A thread samples them every ``interval_s``; a process that exits between samples loses at most
    its last interval. ``with CpuWatch({"postgres": "jiralake_bench_x"}) as watch: ...`` then
    ``watch.cpu_s["postgres"]``."""

    def __init__(self, groups: Mapping[str, str], *, interval_s: float = 0.05) -> None:
        import threading

        self._groups = dict(groups)
        self._interval_s = interval_s
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._group_of: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-watch", daemon=True)
        self.cpu_s: dict[str, float] = {}

    def _sample(self) -> None:
        import psutil

        helpers: list[tuple[psutil.Process, int]] = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or ())
            helper = _PARALLEL_WORKER.search(cmdline)
            if helper:
                helpers.append((proc, int(helper.group(1))))
                continue
            for group, marker in self._groups.items():
                if marker in cmdline:
                    self._record(proc, group)
                    break
        # A parallel query's workers name only their leader: their CPU is the leader's group's.
        for proc, leader in helpers:
            if leader in self._group_of:
                self._record(proc, self._group_of[leader])

    def _record(self, proc: Any, group: str) -> None:
        import psutil

        try:
            times = proc.cpu_times()
        except psutil.Error:
            return
        used = float(times.user + times.system)
        pid = proc.pid
        self._first.setdefault(pid, used)
        self._last[pid] = used
        self._group_of[pid] = group

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def __enter__(self) -> CpuWatch:
        self._sample()  # processes already running count from now; new ones from when first seen
        for pid in self._first:
            self._first[pid] = self._last[pid]
        self._new_baseline = set(self._first)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        totals = dict.fromkeys(self._groups, 0.0)
        for pid, last in self._last.items():
            # A process first seen during the watch started during it: count all of its CPU.
            start = self._first[pid] if pid in self._new_baseline else 0.0
            totals[self._group_of[pid]] += last - start
        self.cpu_s = totals


def run_watched(
    argv: Sequence[str], groups: Mapping[str, str], **kwargs: Any
) -> tuple[ChildRun, dict[str, float]]:
    """:func:`run_measured` while a :class:`CpuWatch` over ``groups`` runs: (the child, CPU-s per group)."""
    with CpuWatch(groups) as watch:
        run = run_measured(argv, **kwargs)
    return run, watch.cpu_s


def moto_marker(aws: AwsSettings) -> str:
    """What identifies this moto server's process on its command line (ops/local_aws.py starts it)."""
    port = urlsplit(aws.endpoint_url or "").port
    return f"moto.server -H 127.0.0.1 -p {port}"


def backend_marker(url: str) -> str:
    """What identifies the PostgreSQL backends of a database on their command line
    (``postgres: 15/main: user DBNAME host(port) state``), and not a client that was given the URL."""
    return " " + urlsplit(url).path.lstrip("/") + " "
