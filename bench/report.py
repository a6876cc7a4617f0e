"""docs/benchmarks.md from one run's results: machine, command, date, the summary lines, then per stage
its method, a detail table, what bounds each figure, and any findings."""

from __future__ import annotations

from collections.abc import Sequence

from bench.common import StageResult

INTRO = """\
Each stage of jiralake measured against a baseline run in the same invocation, on the same machine:
every figure is a ratio (or a cost next to the baseline's cost), and every number is the median of
several runs. Regenerate with `make bench` (this file) or `python -m bench.run_all --quick` (small
sizes, written to bench/results/); the measurements behind this file are kept in
bench/published-run.json. moto stands in for SQS and S3, so where moto is the bottleneck the
figures are costs (SQS calls, CPU seconds) or ratios against a baseline that goes through the same
moto endpoint, and each stage says which figures moto bounds.
"""


def summary_lines(results: Sequence[StageResult]) -> list[str]:
    return [figure.line() for result in results for figure in result.figures]


def render(
    results: Sequence[StageResult],
    *,
    machine: dict[str, str],
    command: str,
    date: str,
    total_s: float,
    failures: Sequence[str] = (),
    rerendered_at: str | None = None,
    note: str | None = None,
) -> str:
    out = ["# Benchmarks", "", INTRO]
    out += [
        "## Run",
        "",
        f"- date: {date}",
        f"- command: `{command}`",
        f"- total time: {total_s / 60:.1f} min",
    ]
    if rerendered_at is not None:
        out.append(
            f"- report text rebuilt on {rerendered_at} from this run's saved measurements "
            "(`python -m bench.run_all --from-json bench/published-run.json`); every number is this run's"
        )
    out += [f"- {key}: {value}" for key, value in machine.items()]
    if note:
        out.append(f"- note: {note}")
    out += ["", "## Summary", "", "```", *summary_lines(results), *failures, "```", ""]
    for result in results:
        out += [f"## {result.title}", "", f"Stage `{result.stage}` ({result.duration_s:.0f} s).", ""]
        if result.method:
            out += ["**Method.** " + result.method, ""]
        if result.table_rows:
            out.append("| " + " | ".join(result.table_header) + " |")
            out.append("|" + "---|" * len(result.table_header))
            out += ["| " + " | ".join(row) + " |" for row in result.table_rows]
            out.append("")
        if result.bounds:
            out += ["**What bounds these figures.** " + result.bounds, ""]
        if result.findings:
            out += ["**Findings.**", ""]
            out += [f"- {finding}" for finding in result.findings]
            out.append("")
    return "\n".join(out).rstrip() + "\n"
