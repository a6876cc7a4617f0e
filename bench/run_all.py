"""``python -m bench.run_all [--quick] [--only STAGE ...] [--runs N] [--output PATH] [--from-json PATH]
[--note TEXT]``

Runs the stages in order, prints one summary line per figure, and writes the report: a full run
(all stages, full sizes) writes docs/benchmarks.md; a ``--quick`` or ``--only`` run writes
bench/results/benchmarks-<kind>.md instead, so a smoke run never replaces the published figures.
The raw measurements of every run go to bench/results/last-run.json (and, for the published run, to
bench/published-run.json beside this file); ``--from-json`` rebuilds a report
from such a file without measuring (the figures and their numbers are recomputed from the saved
measurements, so only the prose can change). Exit code 1 when a stage failed (a missed target is
reported, not an error).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    RESULTS_DIR,
    BenchContext,
    StageResult,
    machine_description,
    postgres_version,
    server_dsn,
)
from bench.report import render, summary_lines
from shared import logging as jl_logging

# Stage name -> module with ``async def run(ctx) -> StageResult``, in the order they run.
STAGES = {
    "consumer_apply": "bench.consumer_apply",
    "consumer_e2e": "bench.consumer_e2e",
    "receiver": "bench.receiver_load",
    "exporter": "bench.exporter",
}
PUBLISHED = REPO / "docs" / "benchmarks.md"
PUBLISHED_RUN = REPO / "bench" / "published-run.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small sizes and 2 runs: a smoke run")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(STAGES),
        metavar="STAGE",
        help=f"run only this stage (repeatable): {', '.join(STAGES)}",
    )
    parser.add_argument("--runs", type=int, metavar="N", help="runs per figure (default: each stage's own)")
    parser.add_argument("--output", type=Path, help="where to write the markdown report")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="measure nothing: rebuild the report from a saved run (bench/results/last-run.json), e.g. "
        "after editing its prose; a full `make bench` run goes back to docs/benchmarks.md",
    )
    parser.add_argument(
        "--note",
        metavar="TEXT",
        help="a line for the report's Run section, kept with the run (e.g. how this machine differs from "
        "the one of the previous published run); with --from-json, shown instead of the saved one",
    )
    return parser.parse_args(argv)


def _without_note(given: list[str]) -> list[str]:
    """The arguments that change what is measured: a note alone still makes the run `make bench`'s."""
    kept: list[str] = []
    skip = False
    for arg in given:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            kept.append(arg)
    return kept


async def run_stages(ctx: BenchContext, names: Sequence[str]) -> tuple[list[StageResult], list[str]]:
    results: list[StageResult] = []
    failures: list[str] = []
    for name in names:
        module = importlib.import_module(STAGES[name])
        stage: Callable[[BenchContext], Awaitable[StageResult]] = module.run
        print(f"== {name} ...", flush=True)
        started = time.monotonic()
        try:
            result = await stage(ctx)
        except Exception as exc:
            traceback.print_exc()
            failures.append(f"{name}: FAILED ({type(exc).__name__}: {exc})")
            print(failures[-1], flush=True)
            continue
        result.duration_s = time.monotonic() - started
        results.append(result)
        for line in summary_lines([result]):
            print(line, flush=True)
    return results, failures


def rerender(path: Path) -> tuple[list[StageResult], dict[str, Any]]:
    """The stages' results rebuilt from a saved run's measurements, with the current report text."""
    saved: dict[str, Any] = json.loads(path.read_text())
    results = []
    for stage in saved["stages"]:
        result: StageResult = importlib.import_module(STAGES[stage["stage"]]).from_raw(stage["raw"])
        result.duration_s = stage["duration_s"]
        results.append(result)
    return results, saved


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    jl_logging.configure("WARNING")
    names = [n for n in STAGES if not args.only or n in args.only]
    ctx = BenchContext(dsn=server_dsn(), quick=args.quick, reps=args.runs)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.from_json is not None:
        results, saved = rerender(args.from_json)
        date, command, machine = saved["date"], saved["command"], saved["machine"]
        failures: list[str] = saved.get("failures", [])
        note: str | None = args.note if args.note is not None else saved.get("note")
        total_s = saved.get("total_s", sum(r.duration_s for r in results))
        published = command == "make bench" and not failures and len(results) == len(STAGES)
        output = args.output or (PUBLISHED if published else RESULTS_DIR / "benchmarks-rerendered.md")
    else:
        if args.output is not None:
            output = args.output
        elif args.quick or args.only or args.runs is not None:
            kind = "quick" if args.quick else "partial"
            output = RESULTS_DIR / f"benchmarks-{kind}.md"
        else:
            output = PUBLISHED
        date = now
        note = args.note
        given = _without_note(list(argv if argv is not None else sys.argv[1:]))
        command = "make bench" if not given else shlex.join(["python", "-m", "bench.run_all", *given])
        machine = machine_description(asyncio.run(postgres_version(ctx.dsn)))
        started = time.monotonic()
        results, failures = asyncio.run(run_stages(ctx, names))
        total_s = time.monotonic() - started
        machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        saved_run = {
            "date": date,
            "command": command,
            "machine": machine,
            "total_s": total_s,
            "failures": failures,
            "note": note,
            "stages": [asdict(r) for r in results],
        }
        saved_text = json.dumps(saved_run, indent=2, default=str)
        (RESULTS_DIR / "last-run.json").write_text(saved_text)
        if output == PUBLISHED:
            # Committed with docs/benchmarks.md: the measurements behind the published figures.
            PUBLISHED_RUN.write_text(saved_text + "\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        render(
            results,
            machine=machine,
            command=command,
            date=date,
            total_s=total_s,
            failures=failures,
            rerendered_at=now if args.from_json is not None else None,
            note=note,
        )
    )
    shown = output.relative_to(REPO) if output.is_relative_to(REPO) else output
    print(f"\n== summary ({total_s / 60:.1f} min; report: {shown})")
    for line in [*summary_lines(results), *failures]:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
