"""Stage 3, the receiver under a concurrent burst from a separate load-generator process
(bench/loadgen.py), against two baseline servers run the same way:

- ``bare``: an aiohttp handler that reads the body and answers 202 (the CPU floor of taking a webhook);
- ``send-one``: an aiohttp handler that sends one ``SendMessage`` per webhook, then answers 202 (the
  SQS-call baseline: 1.0 per event).

The receiver is ``jiralake receiver`` with a webhook secret (every request signed, as Jira does) and
its default micro-batching; its SQS calls come from its own ``/metrics`` (``jiralake_sqs_requests_total``),
its CPU seconds from /proc before and after the burst (startup excluded), for every server alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    RESULTS_DIR,
    BenchContext,
    Figure,
    StageResult,
    child_env,
    fmt_ratio,
    local_aws,
    median,
    process_cpu_s,
    python_argv,
    ratio,
    run_measured,
    spread,
)
from bench.consumer_e2e import delete_queue, new_queue
from bench.events import BASE_TS_MS
from ops.local_aws import free_port
from shared import aws
from shared.jira_event import Routed, route
from shared.settings import AwsSettings

SECRET = "bench-webhook-secret"
CONCURRENCY = 50
TARGET_CALLS_PER_EVENT = 0.15
TARGET_CPU_OF_BARE = 2.5
SERVERS = ("receiver", "send-one", "bare")
START_DEADLINE_S = 30.0
SQS_TIMEOUT_S = 60.0


# -- the baseline servers (child processes) --


def bare_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202)

    app = web.Application(client_max_size=1_048_576)
    app.router.add_post("/webhooks/jira", handle)
    app.router.add_get("/healthz", lambda _: _ok())
    return app


async def _ok() -> web.Response:
    return web.json_response({"status": "ok"})


def send_one_app(sqs: object, queue_url: str) -> web.Application:
    calls = {"SendMessage": 0}

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        text = body.decode("utf-8")
        routed = route(json.loads(text))
        if not isinstance(routed, Routed):
            return web.Response(status=202)
        await sqs.send_message(  # type: ignore[attr-defined]
            QueueUrl=queue_url,
            MessageBody=text,
            MessageGroupId=routed.issue_id,
            MessageDeduplicationId=request.headers["X-Atlassian-Webhook-Identifier"],
        )
        calls["SendMessage"] += 1
        return web.Response(status=202)

    async def count(_: web.Request) -> web.Response:
        return web.json_response(calls)

    app = web.Application(client_max_size=1_048_576)
    app.router.add_post("/webhooks/jira", handle)
    app.router.add_get("/healthz", lambda _: _ok())
    app.router.add_get("/calls", count)
    return app


async def serve_baseline(kind: str, port: int, endpoint: str | None, queue_url: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if kind == "bare":
        runner = web.AppRunner(bare_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await stop.wait()
        await runner.cleanup()
        return
    assert queue_url is not None
    async with aws.sqs_client(AwsSettings(endpoint_url=endpoint)) as sqs:
        runner = web.AppRunner(send_one_app(sqs, queue_url), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await stop.wait()
        await runner.cleanup()


def server_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["bare", "send-one"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--endpoint")
    parser.add_argument("--queue-url")
    args = parser.parse_args(argv)
    asyncio.run(serve_baseline(args.kind, args.port, args.endpoint, args.queue_url))
    return 0


# -- the parent --


@dataclass
class Server:
    kind: str
    process: subprocess.Popen[bytes]
    url: str
    admin_url: str  # where /healthz and the call counts are read


def start_server(kind: str, settings_aws: AwsSettings, queue_url: str | None) -> Server:
    port = free_port()
    log = open(RESULTS_DIR / f"receiver-{kind}.log", "ab")  # noqa: SIM115 - the child owns it
    if kind == "receiver":
        admin_port = free_port()
        assert queue_url is not None
        env = child_env(
            settings_aws,
            JIRALAKE_QUEUE_URL=queue_url,
            JIRALAKE_WEBHOOK_SECRET=SECRET,
            JIRALAKE_RECEIVER_HOST="127.0.0.1",
            JIRALAKE_RECEIVER_PORT=str(port),
            JIRALAKE_RECEIVER_ADMIN_PORT=str(admin_port),
            # As long as the send-one handler waits (aiobotocore's 60 s read timeout): with the default
            # 5 s, a machine on which moto answers a 50-webhook burst slowly turned part of the burst
            # into 503s, and the figures into those of fewer, cheaper requests.
            JIRALAKE_RECEIVER_SQS_TIMEOUT_S=str(SQS_TIMEOUT_S),
        )
        argv = [str(Path(sys.executable).with_name("jiralake")), "receiver"]
        admin_url = f"http://127.0.0.1:{admin_port}"
    else:
        argv = python_argv("bench.receiver_load", "server", kind, f"--port={port}")
        if kind == "send-one":
            argv += [f"--endpoint={settings_aws.endpoint_url}", f"--queue-url={queue_url}"]
        env = child_env(settings_aws)
        admin_url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    return Server(kind, process, f"http://127.0.0.1:{port}/webhooks/jira", admin_url)


async def wait_healthy(session: aiohttp.ClientSession, server: Server) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.kind} exited with {server.process.returncode} (see bench/results/)")
        try:
            async with session.get(server.admin_url + "/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.kind} did not answer /healthz within {START_DEADLINE_S:g}s")


async def sqs_calls(session: aiohttp.ClientSession, server: Server) -> tuple[float, float]:
    """(SQS calls so far, SendMessageBatch entries so far) as the server itself counts them."""
    if server.kind == "bare":
        return 0.0, 0.0
    if server.kind == "send-one":
        async with session.get(server.admin_url + "/calls") as resp:
            count = float(sum((await resp.json()).values()))
            return count, count
    async with session.get(server.admin_url + "/metrics") as resp:
        text = await resp.text()
    calls = entries = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "jiralake_sqs_requests_total":
                calls += sample.value
            elif sample.name == "jiralake_receiver_batch_entries_sum":
                entries += sample.value
    return calls, entries


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


async def measure(kind: str, settings_aws: AwsSettings, count: int, ts_ms: int) -> dict[str, float]:
    pair = await new_queue(settings_aws) if kind != "bare" else None
    server = start_server(kind, settings_aws, pair.queue_url if pair else None)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, server)
            calls_before, entries_before = await sqs_calls(session, server)
            cpu_before = process_cpu_s(server.process.pid)
            argv = python_argv(
                "bench.loadgen",
                f"--url={server.url}",
                f"--count={count}",
                f"--concurrency={CONCURRENCY}",
                f"--ts-ms={ts_ms}",
                f"--first-issue={ts_ms % 1_000_000_000}",
                *([f"--secret={SECRET}"] if kind == "receiver" else []),
            )
            load = (await asyncio.to_thread(run_measured, argv, env=child_env(settings_aws))).check("loadgen")
            cpu = process_cpu_s(server.process.pid) - cpu_before
            calls_after, entries_after = await sqs_calls(session, server)
    finally:
        stop_server(server)
        if pair is not None:
            await delete_queue(settings_aws, pair)
    out = json.loads(load.stdout.strip().splitlines()[-1])
    accepted = int(out["statuses"].get("202", 0))
    return {
        "events": count,
        "accepted": accepted,
        "rejected": count - accepted,
        "wall_s": out["wall_s"],
        "p50_ms": out["p50_ms"],
        "p99_ms": out["p99_ms"],
        "cpu_s": cpu,
        "sqs_calls": calls_after - calls_before,
        "batched_entries": entries_after - entries_before,
    }


async def run(ctx: BenchContext) -> StageResult:
    rounds = ctx.runs(3, quick=2)
    count = 100 if ctx.quick else 300
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in SERVERS}
    ts_ms = BASE_TS_MS
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with local_aws("receiver") as settings_aws:
        for round_no in range(rounds):
            shift = round_no % len(SERVERS)
            for kind in SERVERS[shift:] + SERVERS[:shift]:
                ts_ms += 10 * count
                results[kind].append(await measure(kind, settings_aws, count, ts_ms))
    return from_raw({"results": results, "rounds": rounds, "count": count, "sqs_timeout_s": SQS_TIMEOUT_S})


def from_raw(raw: dict[str, Any]) -> StageResult:
    """The stage's figures and report from its measurements (also used to re-render a saved run)."""
    results: dict[str, list[dict[str, float]]] = raw["results"]
    rounds, count = raw["rounds"], raw["count"]
    sqs_timeout_s = raw.get("sqs_timeout_s")  # absent: a run before 2026-12-07, with the default 5 s

    def values(kind: str, key: str) -> list[float]:
        return [r[key] for r in results[kind]]

    def per_event(kind: str) -> list[float]:
        return [r["sqs_calls"] / max(1, r["accepted"]) for r in results[kind]]

    def cpu_per_k(kind: str) -> list[float]:
        return [r["cpu_s"] * 1000 / max(1, r["accepted"]) for r in results[kind]]

    calls, one_each = median(per_event("receiver")), median(per_event("send-one"))
    cpu, bare_cpu, send_cpu = (median(cpu_per_k(k)) for k in ("receiver", "bare", "send-one"))
    cpu_ratio = ratio(cpu, bare_cpu)
    rejected = sum(r["rejected"] for kind in SERVERS for r in results[kind])
    p50, p99 = median(values("receiver", "p50_ms")), median(values("receiver", "p99_ms"))
    result = StageResult(
        stage="receiver",
        title="Receiver under a concurrent burst",
        table_header=("measure", "receiver", "one SendMessage per webhook", "bare 202 handler"),
        raw=raw,
    )
    result.figures += [
        Figure(
            "receiver sqs_calls",
            f"{calls:.3f} SQS calls per event with micro-batching vs {one_each:.2f} "
            "one SendMessage per webhook",
            f"<={TARGET_CALLS_PER_EVENT} vs 1.0",
            calls <= TARGET_CALLS_PER_EVENT,
        ),
        Figure(
            "receiver cpu",
            f"{fmt_ratio(cpu_ratio, TARGET_CPU_OF_BARE)}x bare aiohttp handler "
            f"({cpu:.2f} vs {bare_cpu:.2f} CPU-s per 1,000 events; "
            f"one-SendMessage handler {send_cpu:.2f})",
            f"<={TARGET_CPU_OF_BARE}x",
            cpu_ratio <= TARGET_CPU_OF_BARE,
        ),
        Figure(
            "receiver latency",
            f"p50 {p50:,.0f} ms, p99 {p99:,.0f} ms at {CONCURRENCY} concurrent (one-SendMessage handler p50 "
            f"{median(values('send-one', 'p50_ms')):,.0f} ms, "
            f"p99 {median(values('send-one', 'p99_ms')):,.0f} ms; "
            f"bare p50 {median(values('bare', 'p50_ms')):,.1f} ms), moto-bound",
        ),
    ]

    def row(label: str, fn: object, fmt: str) -> tuple[str, ...]:
        return (label, *(spread(fn(kind), fmt) for kind in SERVERS))  # type: ignore[operator]

    result.table_rows += [
        row("SQS calls per event", per_event, "{:.3f}"),
        row("CPU-s per 1,000 events (server process)", cpu_per_k, "{:.2f}"),
        row("p50 latency, ms", lambda k: values(k, "p50_ms"), "{:,.1f}"),
        row("p99 latency, ms", lambda k: values(k, "p99_ms"), "{:,.1f}"),
        row("burst wall time, s", lambda k: values(k, "wall_s"), "{:,.2f}"),
        row("answers other than 202", lambda k: values(k, "rejected"), "{:,.0f}"),
    ]
    batches = [r["sqs_calls"] for r in results["receiver"]]
    entries = [r["batched_entries"] for r in results["receiver"]]
    mean_batch = sum(entries) / sum(batches) if sum(batches) else 0.0
    result.method = (
        f"{rounds} rounds; in each, the three servers (order rotated) each take a burst of {count} real "
        f"webhook bodies (every fixture that concerns an issue, varied issue ids, unique delivery ids) "
        f"sent by `python -m bench.loadgen` over {CONCURRENCY} concurrent connections, each connection "
        "sending its next request as soon as the previous one is answered. Requests to the receiver carry "
        "a valid `X-Hub-Signature`. The receiver runs as `jiralake receiver` with default settings "
        "(5 ms batch window, 8 batches in flight) and INFO logs (one JSON line per webhook) to a file"
        + (
            f", except that it waits up to {sqs_timeout_s:g} s for SQS (`JIRALAKE_RECEIVER_SQS_TIMEOUT_S`, "
            "default 5) as the send-one handler does, so a slow moto delays answers instead of turning "
            "them into 503s; "
            if sqs_timeout_s is not None
            else "; "
        )
        + "each server gets a fresh FIFO queue on one moto server. CPU seconds are the server process's "
        "own, read from /proc just before and just after the burst. "
        f"The receiver's SendMessageBatch calls carried {mean_batch:.1f} entries on average."
    )
    result.bounds = (
        "moto bounds the latencies and the burst wall time of both SQS-backed servers: a webhook is "
        "answered only after SQS stored it, and moto stored only "
        f"{median([r['accepted'] / r['wall_s'] for r in results['receiver']]):,.0f} messages/s in "
        "batches and "
        f"{median([r['accepted'] / r['wall_s'] for r in results['send-one']]):,.0f}/s one by one here, so "
        "requests queue behind moto (p50 is about concurrency / moto's rate). "
        "The micro-batcher's 5 ms window adds at most 5 ms. SQS calls per event do not depend on moto's "
        "speed except through batch fill: the slower SQS answers, the more requests wait and the fuller "
        "each batch. CPU seconds per event are the server's own cost and do not depend on moto, except "
        "that the receiver's and send-one's include making the SQS requests (aiobotocore signing and "
        "parsing), which the bare handler does not do."
    )
    if cpu_ratio > TARGET_CPU_OF_BARE:
        result.findings.append(
            f"Receiver CPU per webhook: {cpu:.2f} ms, against {bare_cpu:.2f} ms for the bare handler "
            f"(aiohttp parsing and answering) and {send_cpu:.2f} ms for the one-SendMessage handler. "
            f"Batches carried {mean_batch:.1f} entries on average. Profiled with py-spy under this burst "
            "(2026-11-22), the receiver's CPU splits into about 0.33 ms per webhook (aiohttp's server "
            "side ~0.10, the event loop ~0.06, our code ~0.16: reading and HMAC-checking the body, "
            "routing, the envelope and its SQS entry, one JSON log line) and about 3 ms per "
            "SendMessageBatch call (botocore serialising ~90 KB of JSON, SigV4 hashing it, aiohttp's "
            "exchange, parsing the answer, and a new TCP connection per call: moto's werkzeug server "
            "answers every request with `Connection: close`, which SQS does not). A botocore-free call "
            "(aiohttp keep-alive, botocore's SigV4Auth, orjson), tried outside the repo, halves the "
            "per-call cost; but the per-webhook part alone is already ~4.7x the bare handler, so 2.5x "
            "is out of reach for a handler that verifies, routes and logs in Python, whatever the SQS "
            "client. Fuller batches (more webhooks per call) are the lever that remains."
        )
    if calls > TARGET_CALLS_PER_EVENT:
        result.findings.append(
            f"SQS calls per event: the micro-batcher sends a batch as soon as a slot of the "
            f"{8} allowed in flight is free and its 5 ms window has passed, so while moto answers slowly "
            f"the {CONCURRENCY} waiting requests spread over up to 8 calls in flight: about "
            f"{CONCURRENCY}/8 = {CONCURRENCY / 8:.1f} entries per call (measured {mean_batch:.1f}). "
            "Bursts with more concurrent requests than 10 per batch in flight fill batches to 10; fewer "
            "in flight (JIRALAKE_RECEIVER_MAX_INFLIGHT_BATCHES) or waiting for a full batch while others "
            "are in flight would raise the fill."
        )
    if rejected:
        result.findings.append(
            f"{rejected} requests across all runs were answered with something other than 202; see the table."
        )
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        sys.exit(server_main(sys.argv[2:]))
    print("usage: python -m bench.run_all --only receiver", file=sys.stderr)
    sys.exit(2)
