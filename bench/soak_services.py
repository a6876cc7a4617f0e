"""Soak the long-running services and look for leaks: ``python -m bench.soak_services`` (``make
soak-services``; docs/reliability.md, "Soaking the services for leaks").

Starts moto's server, a scratch database on the PostgreSQL server (``DATABASE_URL``, else the PG*
variables, else postgres@127.0.0.1:5432), then ``jiralake receiver``, ``jiralake consumer`` and
``jiralake export --schedule "* * * * *"`` as real processes (each under bench/soak_probe.py, which
only adds a thread that counts the event loop's tasks), and sends them steady signed webhook traffic
for ``--duration-s``: every issue-related fixture in tests/fixtures/jira-webhooks with random issue
ids, unique delivery ids and rising timestamps, plus redeliveries, ignored events (some with made-up
event names), events PostgreSQL refuses (they end in the DLQ, which is drained), bad signatures,
wrong content types, oversized and malformed bodies and unknown paths.

Every ``--sample-s`` it records per process: RSS (``VmRSS``), open file descriptors, threads, the
distinct series on its ``/metrics``, asyncio tasks and gc-tracked objects (from the probe), and the
consumer's and exporter's PostgreSQL sessions (``pg_stat_activity``). After the warm-up it compares
the first and the last third of the samples and fits a slope per 10k webhooks sent, prints one line
per process, and exits 1 when something grew past a limit (``LIMITS``), 2 when a service died or
the run could not be set up, 0 otherwise. The samples go to bench/results/soak-services-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.common import REPO, RESULTS_DIR, child_env, local_aws, scratch_database, server_dsn
from bench.soak_load import BODY_TIMEOUT_S, SECRET, Load, LoadStats
from bench.soak_probe import PROBE_FILE_ENV, PROBE_INTERVAL_ENV
from ops.local_aws import free_port
from shared import aws, provision
from shared import logging as jl_logging
from shared.settings import AwsSettings

CONSUMER_POLLERS = 2
# The load generator starts no new request while more messages than this wait on the main queue:
# moto's FIFO ReceiveMessage scans the whole queue, and a deep queue would slow everything down.
MAX_QUEUE_DEPTH = 300
PER = 10_000  # slopes are per this many webhooks sent
WARMUP_MIN_S = 75.0


@dataclass(frozen=True)
class Limit:
    """Growth beyond which a measure is reported as a leak: the last third's median minus the first
    third's must exceed ``growth`` AND the fitted slope must exceed ``slope`` per 10k webhooks."""

    growth: float
    slope: float


# RSS in MiB: a leak of 200 bytes per webhook is ~2 MiB per 10k; warmed-up services drifted by less
# than 1 MiB per 10k in the runs in docs/reliability.md. gc_objects are counted after a full
# collection: a leak of one object per 3 webhooks is 3,000 per 10k.
LIMITS = {
    "rss_mib": Limit(growth=3.0, slope=2.0),
    "fds": Limit(growth=4, slope=2),
    "threads": Limit(growth=2, slope=1),
    # The main queue's oldest-age series is there while the queue is empty, gone while it is not.
    "series": Limit(growth=2, slope=1),
    "tasks": Limit(growth=8, slope=4),  # one per request in flight in the receiver (16 at most)
    "gc_objects": Limit(growth=5_000, slope=3_000),
    "py_blocks": Limit(growth=10_000, slope=5_000),
}
MEASURES = tuple(LIMITS)


# -- the services --


@dataclass
class Service:
    name: str
    args: list[str]
    env: dict[str, str]
    admin_port: int
    workdir: Path
    proc: asyncio.subprocess.Process | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def probe_path(self) -> Path:
        return self.workdir / f"{self.name}.probe.jsonl"

    async def start(self, probe_s: float) -> None:
        env = self.env | {PROBE_FILE_ENV: str(self.probe_path), PROBE_INTERVAL_ENV: str(probe_s)}
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.soak_probe", "--log-json", *self.args,
                env=env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        finally:
            os.close(log)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, timeout_s: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def wait_healthy(http: aiohttp.ClientSession, service: Service, timeout_s: float = 60) -> None:
    url = f"http://127.0.0.1:{service.admin_port}/healthz"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not service.running:
            raise RuntimeError(f"{service.name} exited while starting:\n{service.tail()}")
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{service.name} did not answer {url} within {timeout_s:g}s:\n{service.tail()}")


# -- sampling --


def proc_status(pid: int) -> dict[str, float]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                fields[key] = float(value.split()[0])
    return {
        "rss_mib": fields["VmRSS"] / 1024,
        "threads": fields["Threads"],
        "fds": float(len(os.listdir(f"/proc/{pid}/fd"))),
    }


def series_of(metrics_text: str) -> dict[str, int]:
    """Distinct series (name + label set) per metric name in a Prometheus text exposition."""
    keys: set[str] = set()
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            keys.add(line.rsplit(" ", 1)[0])
    per_name: Counter[str] = Counter(key.split("{", 1)[0] for key in keys)
    return dict(per_name)


def last_probe(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return json.loads(lines[-1]) if lines else {}


async def sample(http: aiohttp.ClientSession, service: Service) -> dict[str, Any]:
    row: dict[str, Any] = dict(proc_status(service.pid))
    admin = f"http://127.0.0.1:{service.admin_port}"
    async with http.get(f"{admin}/metrics") as resp:
        per_name = series_of(await resp.text())
    async with http.get(f"{admin}/readyz") as resp:  # readiness probes are traffic too
        row["ready"] = resp.status == 200
    row["series"] = sum(per_name.values())
    row["series_by_name"] = per_name
    probe = last_probe(service.probe_path)
    row["tasks"] = probe.get("tasks")
    row["task_names"] = probe.get("task_names", {})
    row["gc_objects"] = probe.get("gc_objects")
    row["py_blocks"] = probe.get("py_blocks")
    return row


async def pg_sessions(dsn: str, database: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT coalesce(nullif(application_name, ''), '(none)') AS app, count(*) AS n "
            "FROM pg_stat_activity WHERE datname = $1 GROUP BY 1",
            database,
        )
    finally:
        await conn.close()
    return {r["app"]: int(r["n"]) for r in rows}


async def queue_depth(sqs: Any, url: str) -> int:
    attrs = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]))[
        "Attributes"
    ]
    return int(attrs["ApproximateNumberOfMessages"])


async def drain_dlq(sqs: Any, url: str) -> int:
    drained = 0
    while True:
        resp = await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        messages = resp.get("Messages", [])
        if not messages:
            return drained
        await sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )
        drained += len(messages)


# -- analysis --


@dataclass(frozen=True)
class Trend:
    start: float
    end: float
    growth: float  # median of the last third minus median of the first (after warm-up)
    slope: float  # least squares, per PER webhooks sent
    leak: bool


def trend(xs: Sequence[float], ys: Sequence[float], limit: Limit) -> Trend:
    third = max(1, len(ys) // 3)
    growth = statistics.median(ys[-third:]) - statistics.median(ys[:third])
    slope = 0.0
    if len(xs) >= 2 and max(xs) > min(xs):
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx * PER
    return Trend(ys[0], ys[-1], growth, slope, growth > limit.growth and slope > limit.slope)


def analyse(
    samples: list[dict[str, Any]], names: Sequence[str], warmup_s: float
) -> dict[str, dict[str, Trend]]:
    after = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    result: dict[str, dict[str, Trend]] = {}
    for name in names:
        result[name] = {}
        for measure in MEASURES:
            points = [(s["sent"], s[name][measure]) for s in after if s[name].get(measure) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                result[name][measure] = trend(xs, ys, LIMITS[measure])
    return result


def summary_line(name: str, trends: dict[str, Trend]) -> str:
    parts = []
    for measure, t in trends.items():
        fmt = "{:.1f}" if measure == "rss_mib" else "{:,.0f}"
        flag = " LEAK" if t.leak else ""
        parts.append(
            f"{measure} {fmt.format(t.start)}->{fmt.format(t.end)} "
            f"(growth {t.growth:+,.1f}, {t.slope:+,.2f}/10k){flag}"
        )
    verdict = "GROWTH" if any(t.leak for t in trends.values()) else "OK"
    return f"{name}: {verdict}: " + "; ".join(parts)


def grown_series(samples: list[dict[str, Any]], name: str, warmup_s: float) -> dict[str, int]:
    """Metric names whose series count differs between the first sample after warm-up and the last."""
    after = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    first, last = after[0][name]["series_by_name"], after[-1][name]["series_by_name"]
    return {
        k: last.get(k, 0) - first.get(k, 0)
        for k in first.keys() | last.keys()
        if last.get(k, 0) != first.get(k, 0)
    }


# -- the run --


async def soak(args: argparse.Namespace) -> int:
    dsn = server_dsn()
    workdir = Path(tempfile.mkdtemp(prefix="jiralake-soak-"))
    keep = args.keep_logs
    label = uuid.uuid4().hex[:8]
    try:
        with local_aws(f"soak-{label}") as aws_settings:
            async with scratch_database(dsn, "soak") as database_url:
                code = await _soak(args, dsn, database_url, aws_settings, workdir)
                keep = keep or code != 0
                return code
    finally:
        moto_log = RESULTS_DIR / f"moto-soak-{label}.log"  # where local_aws() writes it
        if keep:
            print(f"logs: {workdir}, {moto_log}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            moto_log.unlink(missing_ok=True)


async def _soak(
    args: argparse.Namespace, dsn: str, database_url: str, aws_settings: AwsSettings, workdir: Path
) -> int:
    name = f"soak{uuid.uuid4().hex[:12]}"
    database = database_url.rsplit("/", 1)[-1].split("?", 1)[0]
    async with aws.sqs_client(aws_settings) as sqs, aws.s3_client(aws_settings) as s3:
        pair = await provision.ensure_queues(
            sqs, queue_name=f"{name}.fifo", dlq_name=f"{name}-dlq.fifo", max_receive_count=5
        )
        await sqs.set_queue_attributes(
            QueueUrl=pair.queue_url, Attributes={"ReceiveMessageWaitTimeSeconds": "0"}
        )
        await provision.ensure_bucket(s3, name, aws_settings.region)
        port = free_port()
        common = child_env(aws_settings, DATABASE_URL=database_url, JIRALAKE_QUEUE_URL=pair.queue_url)
        common |= {"JIRALAKE_DLQ_URL": pair.dlq_url}
        services = [
            Service(
                "receiver",
                ["receiver", "--host", "127.0.0.1", "--port", str(port)],
                common
                | {
                    "JIRALAKE_WEBHOOK_SECRET": SECRET,
                    "JIRALAKE_RECEIVER_ADMIN_PORT": str(admin := free_port()),
                    "JIRALAKE_RECEIVER_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
                },
                admin,
                workdir,
            ),
            Service(
                "consumer",
                ["consumer", "--pollers", str(CONSUMER_POLLERS), "--admin-port", str(admin := free_port())],
                # Short polls: moto's long poll busy-waits while any message is visible
                # (docs/reliability.md); the consumer pauses 0.2 s after an empty one.
                common | {"JIRALAKE_CONSUMER_WAIT_S": "0"},
                admin,
                workdir,
            ),
        ]
        if not args.no_exporter:
            services.append(
                Service(
                    "exporter",
                    ["export", "--schedule", "* * * * *", "--admin-port", str(admin := free_port())],
                    common | {"JIRALAKE_BUCKET": name},
                    admin,
                    workdir,
                )
            )
        names = [s.name for s in services]
        samples: list[dict[str, Any]] = []
        load = Load(
            f"http://127.0.0.1:{port}/webhooks/jira", args.rate, args.concurrency, args.issues, args.seed
        )
        dlq_drained = 0
        depth = 0
        died: list[str] = []
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as admin_http,
            aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(limit=args.concurrency)
            ) as load_http,
        ):
            try:
                for service in services:
                    await service.start(probe_s=min(5.0, args.sample_s))
                for service in services:
                    await wait_healthy(admin_http, service)
                loop = asyncio.get_running_loop()
                started = loop.time()
                until = started + args.duration_s
                sending = asyncio.create_task(load.run(load_http, until), name="soak-load")
                next_sample = started
                next_housekeeping = started
                print(
                    f"soaking {', '.join(names)} for {args.duration_s:g} s at {args.rate:g} webhooks/s "
                    f"(samples every {args.sample_s:g} s, warm-up {args.warmup_s:g} s; logs in {workdir})",
                    flush=True,
                )
                while True:
                    now = loop.time()
                    if now >= next_housekeeping:
                        depth = await queue_depth(sqs, pair.queue_url)
                        if depth > MAX_QUEUE_DEPTH:
                            load.gate.clear()
                        elif depth < MAX_QUEUE_DEPTH // 2:
                            load.gate.set()
                        dlq_drained += await drain_dlq(sqs, pair.dlq_url)
                        next_housekeeping = now + 2
                    died = [s.name for s in services if not s.running]
                    if died:
                        break
                    if now >= next_sample:
                        row: dict[str, Any] = {"t": round(now - started, 1), "sent": load.stats.sent}
                        for service in services:
                            row[service.name] = await sample(admin_http, service)
                        row["pg"] = await pg_sessions(dsn, database)
                        row["queue_depth"] = depth
                        samples.append(row)
                        print(_progress(row, names), flush=True)
                        next_sample += args.sample_s
                        if now >= until:
                            break
                    await asyncio.sleep(min(0.5, max(0.0, min(next_sample, next_housekeeping) - loop.time())))
                load.gate.set()
                await sending
            finally:
                exits = {s.name: await s.stop() for s in services}
        elapsed = samples[-1]["t"] if samples else 0.0
        if died:
            for n in died:
                service = next(s for s in services if s.name == n)
                print(f"{n} exited with {exits[n]} during the soak:\n{service.tail()}")
            return 2
        bad_exits = {n: c for n, c in exits.items() if c != 0}
    return report(args, samples, names, load.stats, dlq_drained, elapsed, bad_exits)


def _progress(row: dict[str, Any], names: Sequence[str]) -> str:
    parts = [f"t={row['t']:>6.0f}s sent={row['sent']:>6}"]
    for n in names:
        s = row[n]
        parts.append(
            f"{n[:4]} rss={s['rss_mib']:.1f} fds={s['fds']:.0f} thr={s['threads']:.0f} "
            f"ser={s['series']} tasks={s['tasks']}"
        )
    parts.append(f"pg={row['pg']} depth={row['queue_depth']}")
    return " | ".join(parts)


def report(
    args: argparse.Namespace,
    samples: list[dict[str, Any]],
    names: Sequence[str],
    stats: LoadStats,
    dlq_drained: int,
    elapsed_s: float,
    bad_exits: dict[str, int | None],
) -> int:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = (
        Path(args.json) if args.json else RESULTS_DIR / f"soak-services-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    trends = analyse(samples, names, args.warmup_s)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "samples": samples,
                "answers": {k: dict(v) for k, v in stats.answers.items()},
                "trends": {n: {m: vars(t) for m, t in ts.items()} for n, ts in trends.items()},
            },
            indent=1,
        )
    )
    answers: Counter[str] = Counter()
    for per_kind in stats.answers.values():
        answers.update(per_kind)
    print(
        f"sent {stats.sent:,} webhooks in {elapsed_s:,.0f} s ({stats.sent / max(elapsed_s, 1):.1f}/s; "
        f"paused {stats.paused_s:.0f} s for queue depth); answers {dict(sorted(answers.items()))}; "
        f"DLQ drained {dlq_drained:,}"
    )
    if stats.wrong:
        print(f"unexpected answers: {dict(stats.wrong)}")
    pg_max: Counter[str] = Counter()
    for s in samples:
        for app, n in s["pg"].items():
            pg_max[app] = max(pg_max[app], n)
    print(
        f"PostgreSQL sessions, max per application: {dict(pg_max)} (consumer pool max {CONSUMER_POLLERS + 1})"
    )
    leak = False
    for n in names:
        print(summary_line(n, trends[n]))
        grown = grown_series(samples, n, args.warmup_s)
        if grown:
            print(f"  {n} series count changed per metric: {grown}")
        leak = leak or any(t.leak for t in trends[n].values())
    if pg_max["jiralake-consumer"] > CONSUMER_POLLERS + 1:
        print("consumer holds more PostgreSQL sessions than its pool allows")
        leak = True
    print(f"samples: {out}")
    if bad_exits:
        print(f"services that did not exit 0 on SIGTERM: {bad_exits}")
        return 2
    return 1 if leak else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak_services", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration-s", type=float, default=720, help="load duration (default 720)")
    parser.add_argument("--rate", type=float, default=25, help="webhook requests per second (default 25)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (default 16)")
    parser.add_argument("--sample-s", type=float, default=15, help="seconds between samples (default 15)")
    parser.add_argument(
        "--warmup-s",
        type=float,
        help="samples before this are not compared (default: a sixth of the duration)",
    )
    parser.add_argument("--issues", type=int, default=5000, help="distinct issue ids (default 5000)")
    parser.add_argument("--seed", type=int, default=20260301)
    parser.add_argument("--no-exporter", action="store_true", help="do not run the scheduled exporter")
    parser.add_argument("--keep-logs", action="store_true", help="keep the services' logs (kept on failure)")
    parser.add_argument(
        "--json", help="where to write the samples (default bench/results/soak-services-*.json)"
    )
    args = parser.parse_args(argv)
    if args.warmup_s is None:
        # At least one scheduled export before the comparison starts: the exporter's first run
        # loads what every later run reuses (about 15 MiB).
        args.warmup_s = max(args.duration_s / 6, WARMUP_MIN_S)
    jl_logging.configure("WARNING")  # the scratch database's migration lines are not news
    try:
        return asyncio.run(soak(args))
    except (RuntimeError, OSError, asyncpg.PostgresError) as exc:
        print(f"soak-services: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
