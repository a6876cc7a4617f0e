"""Stage 2, the consumer end to end: draining a pre-filled SQS FIFO queue (moto) into PostgreSQL,
against a bare receive/delete loop with the same batch size (10) and concurrency (2 pollers) on the
same endpoint. Also: SQS API calls per event, and CPU seconds per 1,000 events of each process.

Both run as a child process (``python -m bench.consumer_e2e child ...``) that times itself from the
first receive to the last acknowledged batch and reports its own CPU seconds (getrusage) and the SQS
calls it made, after which it waits for the queue to stay empty (the idle tail, counted in calls and
CPU, not in the drain time). Every run gets a fresh queue, filled with real webhook bodies (all the
fixtures that concern an issue, each event its own issue) before the timer starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import uuid
from typing import Any

from bench.common import (
    BenchContext,
    Figure,
    StageResult,
    child_env,
    fmt_int,
    fmt_ratio,
    local_aws,
    median,
    python_argv,
    rate,
    ratio,
    run_measured,
    scratch_database,
    spread,
)
from bench.events import BASE_TS_MS, envelopes
from shared import aws, provision
from shared.settings import AwsSettings, DatabaseSettings, QueueSettings
from shared.sqs_batch import send_entries

POLLERS = 2
BATCH = 10
IDLE_S = 1.0
TARGET_OF_BARE = 0.9
TARGET_CALLS_PER_EVENT = 0.25


# -- the child processes --


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def child_consumer(
    settings_aws: AwsSettings, queue: QueueSettings, database_url: str
) -> dict[str, float]:
    """The product's pollers (consumer.worker.Consumer, as ``jiralake consumer`` runs them)."""
    from consumer.settings import ConsumerSettings
    from consumer.worker import APPLICATION_NAME, Consumer
    from shared import db
    from shared.metrics import SQS_CALLS

    settings = ConsumerSettings(
        aws=settings_aws,
        queue=queue,
        database=DatabaseSettings(url=database_url),
        pollers=POLLERS,
        wait_time_s=1,
        admin_port=None,
        queue_stats_interval_s=0,
        export_freshness_interval_s=0,
        exit_when_idle_s=IDLE_S,
    )
    async with aws.sqs_client(settings.aws, max_pool=settings.pollers * 2 + 4) as sqs:
        pool = await db.create_pool(
            settings.database,
            min_size=settings.pollers,
            max_size=settings.pollers + 1,
            command_timeout=settings.statement_timeout_s,
            server_settings={"application_name": APPLICATION_NAME},
        )
        try:
            consumer = Consumer(settings, pool, sqs)
            calls_before = _sqs_calls(SQS_CALLS)
            cpu_before = _cpu_s()
            started = time.monotonic()
            await consumer.run(asyncio.Event())
            cpu = _cpu_s() - cpu_before
            drain_s = consumer.activity.last_busy - started
            calls = _sqs_calls(SQS_CALLS) - calls_before
            stats = consumer.stats
        finally:
            await pool.close()
    handled = stats.applied + stats.skipped_stale + stats.duplicate + stats.history_only
    return {
        "events": handled - stats.duplicate,
        "deliveries": handled,
        "drain_s": drain_s,
        "cpu_s": cpu,
        "sqs_calls": calls,
        "dead_lettered": stats.dead_lettered,
    }


def _sqs_calls(counter: object) -> float:
    total = 0.0
    for metric in counter.collect():  # type: ignore[attr-defined]
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total


async def child_bare(settings_aws: AwsSettings, queue_url: str) -> dict[str, float]:
    """The baseline: POLLERS loops of ReceiveMessage(10) -> DeleteMessageBatch, nothing else."""
    calls = 0
    seen: set[str] = set()
    deliveries = 0
    last_done = 0.0

    async def loop(sqs: object) -> None:
        nonlocal calls, deliveries, last_done
        while True:
            resp = await sqs.receive_message(  # type: ignore[attr-defined]
                QueueUrl=queue_url,
                MaxNumberOfMessages=BATCH,
                WaitTimeSeconds=1,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
                ReceiveRequestAttemptId=uuid.uuid4().hex,
            )
            calls += 1
            messages = resp.get("Messages", [])
            if not messages:
                return
            await sqs.delete_message_batch(  # type: ignore[attr-defined]
                QueueUrl=queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )
            calls += 1
            deliveries += len(messages)
            seen.update(m["MessageId"] for m in messages)
            last_done = time.monotonic()

    async with aws.sqs_client(settings_aws, max_pool=POLLERS * 2 + 4) as sqs:
        cpu_before = _cpu_s()
        started = time.monotonic()
        await asyncio.gather(*(loop(sqs) for _ in range(POLLERS)))
        cpu = _cpu_s() - cpu_before
    return {
        "events": len(seen),
        "deliveries": deliveries,
        "drain_s": last_done - started,
        "cpu_s": cpu,
        "sqs_calls": calls,
        "dead_lettered": 0,
    }


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["consumer", "bare"])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--queue-url", required=True)
    parser.add_argument("--dlq-url", required=True)
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args(argv)
    from shared import logging as jl_logging

    jl_logging.configure("WARNING", json=True)
    settings_aws = AwsSettings(endpoint_url=args.endpoint)
    if args.mode == "consumer":
        queue = QueueSettings(queue_url=args.queue_url, dlq_url=args.dlq_url)
        out = asyncio.run(child_consumer(settings_aws, queue, args.database_url))
    else:
        out = asyncio.run(child_bare(settings_aws, args.queue_url))
    print(json.dumps(out))
    return 0


# -- the parent --


async def fill_queue(
    settings_aws: AwsSettings, queue_url: str, count: int, *, ts_ms: int, first_issue: int
) -> None:
    items = envelopes("all", count, first_issue_id=first_issue, issue_ids=count, ts_ms=ts_ms)
    entries = [e.send_entry(str(i)) for i, e in enumerate(items)]
    semaphore = asyncio.Semaphore(4)
    async with aws.sqs_client(settings_aws) as sqs:

        async def send(chunk: list[dict[str, object]]) -> None:
            async with semaphore:
                results = await send_entries(sqs, queue_url, chunk)
            failed = [r for r in results if not r.ok]
            if failed:
                raise RuntimeError(f"filling the queue: {failed[0].error}")

        await asyncio.gather(*(send(entries[i : i + 10]) for i in range(0, len(entries), 10)))


async def new_queue(settings_aws: AwsSettings) -> provision.QueuePair:
    name = f"bench-{uuid.uuid4().hex[:12]}"
    async with aws.sqs_client(settings_aws) as sqs:
        return await provision.ensure_queues(
            sqs,
            queue_name=f"{name}.fifo",
            dlq_name=f"{name}-dlq.fifo",
            max_receive_count=5,
            visibility_timeout_s=60,
        )


async def delete_queue(settings_aws: AwsSettings, pair: provision.QueuePair) -> None:
    async with aws.sqs_client(settings_aws) as sqs:
        await sqs.delete_queue(QueueUrl=pair.queue_url)
        await sqs.delete_queue(QueueUrl=pair.dlq_url)


async def measure(
    settings_aws: AwsSettings, mode: str, database_url: str, count: int, ts_ms: int
) -> dict[str, float]:
    pair = await new_queue(settings_aws)
    try:
        await fill_queue(settings_aws, pair.queue_url, count, ts_ms=ts_ms, first_issue=ts_ms % 1_000_000_000)
        argv = python_argv(
            "bench.consumer_e2e",
            "child",
            mode,
            f"--endpoint={settings_aws.endpoint_url}",
            f"--queue-url={pair.queue_url}",
            f"--dlq-url={pair.dlq_url}",
            f"--database-url={database_url}",
        )
        run = (await asyncio.to_thread(run_measured, argv, env=child_env(settings_aws))).check(
            f"consumer_e2e {mode}"
        )
        out: dict[str, float] = json.loads(run.stdout.strip().splitlines()[-1])
        # A message delivered twice (moto has redelivered one now and then) counts once.
        if out["events"] != count or out["dead_lettered"]:
            raise RuntimeError(
                f"{mode} handled {out['events']} of {count} events ({out['dead_lettered']} dead-lettered)"
            )
        return out
    finally:
        await delete_queue(settings_aws, pair)


async def run(ctx: BenchContext) -> StageResult:
    rounds = ctx.runs(5, quick=2)
    count = 100 if ctx.quick else 500
    results: dict[str, list[dict[str, float]]] = {"consumer": [], "bare": []}
    ts_ms = BASE_TS_MS
    async with scratch_database(ctx.dsn, "e2e") as url:
        with local_aws("consumer_e2e") as settings_aws:
            for round_no in range(rounds):
                order = ["consumer", "bare"] if round_no % 2 == 0 else ["bare", "consumer"]
                for mode in order:
                    ts_ms += 10 * count
                    results[mode].append(await measure(settings_aws, mode, url, count, ts_ms))
    return from_raw({"results": results, "rounds": rounds, "count": count})


def from_raw(raw: dict[str, Any]) -> StageResult:
    """The stage's figures and report from its measurements (also used to re-render a saved run)."""
    results: dict[str, list[dict[str, float]]] = raw["results"]
    rounds, count = raw["rounds"], raw["count"]

    def rates(mode: str) -> list[float]:
        return [rate(r["events"], r["drain_s"]) for r in results[mode]]

    def per_event(mode: str) -> list[float]:
        return [r["sqs_calls"] / r["events"] for r in results[mode]]

    def cpu_per_k(mode: str) -> list[float]:
        return [r["cpu_s"] * 1000 / r["events"] for r in results[mode]]

    # Each round's consumer run against the bare run of the same round (back to back, same moto
    # server): moto's speed drifts between rounds more than the consumer's cost does.
    paired = [ratio(ours, bare) for ours, bare in zip(rates("consumer"), rates("bare"), strict=True)]
    ours, bare = median(rates("consumer")), median(rates("bare"))
    calls, bare_calls = median(per_event("consumer")), median(per_event("bare"))
    cpu, bare_cpu = median(cpu_per_k("consumer")), median(cpu_per_k("bare"))
    of_bare = median(paired)
    result = StageResult(
        stage="consumer_e2e",
        title="Consumer end to end (SQS on moto -> PostgreSQL)",
        table_header=("measure", "consumer", "bare receive/delete loop"),
        raw=raw,
    )
    result.figures += [
        Figure(
            "consumer_e2e drain",
            f"{fmt_ratio(of_bare, TARGET_OF_BARE)}x of bare receive/delete loop, median of {rounds} "
            f"paired rounds ({fmt_int(ours)} ev/s vs {fmt_int(bare)} ev/s, moto-bound)",
            f">={TARGET_OF_BARE}",
            of_bare >= TARGET_OF_BARE,
        ),
        Figure(
            "consumer_e2e sqs_calls",
            f"{calls:.3f} SQS calls per event (bare loop {bare_calls:.3f})",
            f"<={TARGET_CALLS_PER_EVENT}",
            calls <= TARGET_CALLS_PER_EVENT,
        ),
        Figure(
            "consumer_e2e cpu",
            f"{cpu:.2f} CPU-s per 1,000 events, {ratio(cpu, bare_cpu):.1f}x bare loop ({bare_cpu:.2f})",
        ),
    ]
    result.table_rows += [
        ("events/s while draining", spread(rates("consumer"), "{:,.1f}"), spread(rates("bare"), "{:,.1f}")),
        ("drain rate / same round's bare loop rate", spread(paired, "{:.2f}"), "(baseline)"),
        ("SQS calls per event", spread(per_event("consumer"), "{:.3f}"), spread(per_event("bare"), "{:.3f}")),
        (
            "CPU-s per 1,000 events",
            spread(cpu_per_k("consumer"), "{:.2f}"),
            spread(cpu_per_k("bare"), "{:.2f}"),
        ),
        (
            "messages delivered twice by moto (all runs)",
            str(sum(int(r["deliveries"] - r["events"]) for r in results["consumer"])),
            str(sum(int(r["deliveries"] - r["events"]) for r in results["bare"])),
        ),
    ]
    result.method = (
        f"{rounds} rounds of one consumer run and one baseline run (order alternating), each on a fresh "
        f"FIFO queue pre-filled with {count} real webhook bodies (every fixture that concerns an issue, one "
        f"issue per event, so FIFO groups never hold a poller back). The consumer is "
        f"`consumer.worker.Consumer` with {POLLERS} pollers (the default), ReceiveMessage of {BATCH} and "
        "1 s long polls; the baseline is the same number of loops doing ReceiveMessage(10) then "
        "DeleteMessageBatch and nothing else. Both are child processes; drain time runs from the first "
        "receive to the last acknowledged batch; the drain figure is the median over rounds of the "
        "consumer's rate divided by the bare loop's rate in the same round. SQS calls and CPU seconds "
        "cover the whole run, including "
        f"the idle tail (about {IDLE_S:g} s of empty receives before the run ends) and, for the "
        "consumer, the Postgres check before each receive (one round trip: `SELECT 1` until 2026-12-07, "
        "since then the schema's last migration)."
    )
    result.bounds = (
        "moto bounds the drain rate of both (its FIFO ReceiveMessage scans the queue in Python on the "
        "same 2 cores), so the ratio says how much the consumer's own work (decode, one Postgres "
        "transaction per batch, DeleteMessageBatch after the commit) slows draining relative to doing "
        "nothing; it is not a throughput claim for real SQS. SQS calls per event are a cost that does not "
        "depend on moto: one ReceiveMessage and one DeleteMessageBatch per 10 messages is 0.2, the idle "
        "tail's empty receives add the rest. CPU seconds are the consumer process's own (getrusage), "
        "including aiobotocore's request signing and parsing, which the baseline pays too."
    )
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2:]))
    print("usage: python -m bench.run_all --only consumer_e2e", file=sys.stderr)
    sys.exit(2)
