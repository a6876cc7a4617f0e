"""The load generator for the receiver stage, run as its own process so its CPU never counts as the
server's: ``python -m bench.loadgen --url URL --count N --concurrency C [--secret S]``.

Builds every request first (real webhook bodies with varied issue ids, a unique
``X-Atlassian-Webhook-Identifier``, the ``X-Hub-Signature`` when a secret is given), then sends them
with C concurrent connections as fast as answers come back, and prints one JSON line: wall time,
status counts and latency percentiles (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

import aiohttp

from bench.common import percentile
from bench.events import webhooks
from receiver.signature import SIGNATURE_HEADER, sign

DELIVERY_HEADER = "X-Atlassian-Webhook-Identifier"


def build_requests(
    count: int, *, secret: str | None, first_issue: int, ts_ms: int
) -> list[tuple[bytes, dict[str, str]]]:
    requests = []
    for hook in webhooks("all", count, first_issue_id=first_issue, issue_ids=count, ts_ms=ts_ms):
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: hook.delivery_id}
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(secret, hook.body)
        requests.append((hook.body, headers))
    return requests


async def burst(
    url: str, requests: list[tuple[bytes, dict[str, str]]], concurrency: int
) -> dict[str, object]:
    latencies_ms: list[float] = []
    statuses: Counter[int] = Counter()
    pending = iter(requests)
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for body, headers in pending:
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                latencies_ms.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return {
        "count": len(requests),
        "wall_s": wall_s,
        "statuses": {str(k): v for k, v in statuses.items()},
        "p50_ms": percentile(latencies_ms, 50),
        "p99_ms": percentile(latencies_ms, 99),
        "max_ms": max(latencies_ms),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--secret")
    parser.add_argument("--first-issue", type=int, default=1)
    parser.add_argument("--ts-ms", type=int, required=True)
    args = parser.parse_args(argv)
    requests = build_requests(args.count, secret=args.secret, first_issue=args.first_issue, ts_ms=args.ts_ms)
    print(json.dumps(asyncio.run(burst(args.url, requests, args.concurrency))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
