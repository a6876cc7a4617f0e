"""The benchmark package imports and its pure helpers work (no benchmark runs here, no timing asserts)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from bench import events
from bench.common import Figure, StageResult, fmt_ratio, median, percentile, run_measured, spread
from bench.report import render, summary_lines
from bench.run_all import STAGES, _without_note, parse_args
from shared.jira_event import Routed, route


@pytest.mark.parametrize("module", [*STAGES.values(), "bench.loadgen", "bench.fill", "bench.run_all"])
def test_every_bench_module_imports(module: str) -> None:
    # WHEN the module is imported THEN it exposes what run_all or its caller needs
    imported = importlib.import_module(module)
    if module in STAGES.values():
        assert callable(imported.run)


def test_median_spread_and_percentile() -> None:
    # GIVEN five runs
    values = [3.0, 1.0, 2.0, 5.0, 4.0]
    # THEN the median, the spread text and nearest-rank percentiles are exact
    assert median(values) == 3.0
    assert median([1.0, 2.0]) == 1.5
    assert spread(values, "{:.1f}") == "3.0 (1.0-5.0, n=5)"
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == 5.0
    assert percentile(values, 0) == 1.0
    with pytest.raises(ValueError):
        median([])


def test_summary_lines_name_the_figure_the_target_and_the_verdict() -> None:
    # GIVEN a figure that met its target, one that missed and one without a target
    figures = [
        Figure("consumer_apply batch=10", "0.93x of ceiling", ">=0.8", True),
        Figure("exporter peak_rss", "170 MiB peak", "<=150 MiB", False),
        Figure("receiver latency", "p50 12 ms"),
    ]
    # THEN each prints as one comparable line
    assert [f.line() for f in figures] == [
        "consumer_apply batch=10: 0.93x of ceiling [target >=0.8] PASS",
        "exporter peak_rss: 170 MiB peak [target <=150 MiB] MISS",
        "receiver latency: p50 12 ms [no target]",
    ]


def test_ratio_gets_a_third_decimal_only_when_two_would_land_on_the_threshold() -> None:
    assert fmt_ratio(0.934, 0.8) == "0.93"
    assert fmt_ratio(0.897, 0.9) == "0.897"
    assert fmt_ratio(0.9, 0.9) == "0.90"
    assert fmt_ratio(1.5) == "1.50"


def test_report_holds_machine_command_date_and_every_summary_line() -> None:
    # GIVEN one stage's result
    result = StageResult(
        stage="consumer_apply",
        title="Consumer apply step",
        figures=[Figure("consumer_apply batch=10", "0.93x of ceiling", ">=0.8", True)],
        table_header=("variant", "events/s"),
        table_rows=[("consumer 10", "1,000")],
        method="How.",
        bounds="PostgreSQL.",
        findings=["Something."],
    )
    # WHEN the report is rendered
    text = render(
        [result], machine={"cores": "2"}, command="make bench", date="2026-01-01 00:00 UTC", total_s=60
    )
    # THEN it names the run and carries the line, the table and the prose
    assert "- date: 2026-01-01 00:00 UTC" in text
    assert "- command: `make bench`" in text
    assert "- cores: 2" in text
    assert summary_lines([result]) == ["consumer_apply batch=10: 0.93x of ceiling [target >=0.8] PASS"]
    assert "consumer_apply batch=10: 0.93x of ceiling [target >=0.8] PASS" in text
    assert "| consumer 10 | 1,000 |" in text
    assert "**What bounds these figures.** PostgreSQL." in text
    assert "- Something." in text


def test_a_note_shows_in_the_run_section_and_leaves_the_run_make_bench_s() -> None:
    # GIVEN a full run started with a note about the machine
    given = ["--note", "this VM is slower", "--note=kept once"]
    # THEN the command recorded is still make bench's (no argument that changes what is measured)
    assert _without_note(given) == []
    assert _without_note(["--runs", "3", "--note", "x"]) == ["--runs", "3"]
    assert parse_args(given).note == "kept once"
    # AND the report carries the note after the machine
    text = render([], machine={"cores": "2"}, command="make bench", date="d", total_s=60, note="slower VM")
    assert "- cores: 2\n- note: slower VM\n" in text
    assert "- note:" not in render([], machine={}, command="make bench", date="d", total_s=60)


def test_run_all_arguments() -> None:
    assert parse_args(["--from-json", "saved.json"]).from_json.name == "saved.json"
    args = parse_args(["--quick", "--only", "exporter", "--only", "receiver"])
    assert args.quick is True
    assert args.only == ["exporter", "receiver"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "nonsense"])


@pytest.mark.parametrize("mix", ["full_issue", "all"])
def test_bench_events_route_to_the_issue_and_time_they_were_given(mix: str) -> None:
    # GIVEN one webhook per fixture of the mix
    count = len(events.templates(mix))
    hooks = list(events.webhooks(mix, count, first_issue_id=900, issue_ids=count, ts_ms=events.BASE_TS_MS))
    # THEN every body routes to its own issue id and timestamp, and delivery ids are unique
    for i, hook in enumerate(hooks):
        routed = route(json.loads(hook.body))
        assert isinstance(routed, Routed)
        assert (routed.issue_id, routed.event_ts_ms) == (str(900 + i), events.BASE_TS_MS + i)
    assert len({h.delivery_id for h in hooks}) == count
    envelope = events.envelope_of(hooks[0])
    assert (envelope.issue_id, envelope.event_ts_ms, envelope.delivery_id) == (
        "900",
        events.BASE_TS_MS,
        hooks[0].delivery_id,
    )


def test_run_measured_reports_the_childs_own_exit_code_output_and_usage() -> None:
    # WHEN a tiny child runs
    run = run_measured([sys.executable, "-c", "print('hi'); raise SystemExit(3)"])
    # THEN its own exit code, stdout and resource usage come back
    assert run.returncode == 3
    assert run.stdout.strip() == "hi"
    assert run.max_rss_bytes > 0
    assert run.cpu_s >= 0


def test_consumer_apply_figures_from_measurements() -> None:
    # GIVEN rates where the consumer reaches 0.9 of the ceiling at batch 10 and 0.5 at batch 100
    from bench import consumer_apply

    raw = {
        "rates": {
            "consumer 10": [900.0, 880.0, 920.0],
            "consumer 100": [1000.0],
            "ceiling 10": [1000.0],
            "ceiling 100": [2000.0],
            "naive": [100.0],
            "decode only": [10_000.0],
        },
        "rounds": 3,
        "per_run": 6000,
        "naive_per_run": 2000,
        "prefill": 100_000,
    }
    # WHEN the stage's result is built
    result = consumer_apply.from_raw(raw)
    # THEN one line per batch size, with the verdict of both targets
    assert [f.line() for f in result.figures] == [
        "consumer_apply batch=10: 0.90x of ceiling (900 ev/s vs 1,000 ev/s), 9.0x naive (100 ev/s) "
        "[target >=0.8 of ceiling, >=5x naive] PASS",
        "consumer_apply batch=100: 0.50x of ceiling (1,000 ev/s vs 2,000 ev/s), 10.0x naive (100 ev/s) "
        "[target >=0.8 of ceiling, >=5x naive] MISS",
    ]
    assert result.findings  # a miss comes with what was found


def test_receiver_and_consumer_e2e_figures_from_measurements() -> None:
    from bench import consumer_e2e, receiver_load

    # GIVEN one run of each server: 100 events, the receiver making 10 SQS calls
    def run(cpu_s: float, calls: float, p50: float) -> dict[str, float]:
        return {
            "events": 100,
            "accepted": 100,
            "rejected": 0,
            "wall_s": 2.0,
            "p50_ms": p50,
            "p99_ms": 2 * p50,
            "cpu_s": cpu_s,
            "sqs_calls": calls,
            "batched_entries": 100 if calls else 0,
        }

    receiver = receiver_load.from_raw(
        {
            "results": {
                "receiver": [run(0.02, 10, 400)],
                "send-one": [run(0.3, 100, 500)],
                "bare": [run(0.01, 0, 4)],
            },
            "rounds": 1,
            "count": 100,
        }
    )
    lines = [f.line() for f in receiver.figures]
    assert lines[0] == (
        "receiver sqs_calls: 0.100 SQS calls per event with micro-batching vs 1.00 one SendMessage per "
        "webhook [target <=0.15 vs 1.0] PASS"
    )
    assert lines[1].startswith(
        "receiver cpu: 2.00x bare aiohttp handler (0.20 vs 0.10 CPU-s per 1,000 events"
    )
    assert lines[1].endswith("[target <=2.5x] PASS")
    # AND the method says with which SQS timeout the receiver ran: the default for a run saved without one
    assert "JIRALAKE_RECEIVER_SQS_TIMEOUT_S" not in receiver.method
    longer = receiver_load.from_raw({**receiver.raw, "sqs_timeout_s": 60.0})
    assert "waits up to 60 s for SQS (`JIRALAKE_RECEIVER_SQS_TIMEOUT_S`, default 5)" in longer.method

    # GIVEN a consumer draining 500 events at 90% of the bare loop's rate
    def drain(seconds: float, calls: float) -> dict[str, float]:
        return {"events": 500, "deliveries": 500, "drain_s": seconds, "cpu_s": 0.5, "sqs_calls": calls}

    e2e = consumer_e2e.from_raw(
        {"results": {"consumer": [drain(10.0, 110)], "bare": [drain(9.0, 102)]}, "rounds": 1, "count": 500}
    )
    assert [f.passed for f in e2e.figures] == [True, True, None]
    drain_line = e2e.figures[0].line()
    assert drain_line.startswith("consumer_e2e drain: 0.90x of bare receive/delete loop, median of 1 paired")
    # AND over several rounds each consumer run is compared with the bare run of its own round: a round
    # where moto was slow for the consumer alone moves the median of those ratios, not the figure
    rounds = consumer_e2e.from_raw(
        {
            "results": {
                "consumer": [drain(10.0, 110), drain(5.0, 110), drain(500 / 30, 110)],
                "bare": [drain(10.0, 102), drain(5.0, 102), drain(5.0, 102)],
            },
            "rounds": 3,
            "count": 500,
        }
    )
    assert rounds.figures[0].line().startswith("consumer_e2e drain: 1.00x of bare receive/delete loop")


def test_exporter_figures_from_measurements() -> None:
    from bench import exporter

    # GIVEN one size where the export takes 11 s against halves of 8 s (COPY) and 10 s (upload)
    mib = 1024 * 1024
    sample = {
        "export": [11.0],
        "stream": [10.5],
        "rss": [100.0 * mib],
        "copy": [8.0],
        "copy_rss": [9.0 * mib],
        "two-step": [18.0],
        "upload": [10.0],
        "upload_rss": [90.0 * mib],
        "to_file": [8.0],
        "export_cpu": [5.0],
        "export_pg_cpu": [5.0],
        "export_moto_cpu": [10.0],
        "copy_pg_cpu": [5.0],
        "upload_cpu": [2.0],
        "upload_moto_cpu": [6.0],
    }
    facts = {"bytes": 1_100_000_000, "rows": 1_000_000, "parts": 66, "file_bytes": 1_100_000_000}
    result = exporter.from_raw({"samples": {"1000000": sample}, "facts": {"1000000": facts}, "rounds": 1})
    lines = [f.line() for f in result.figures]
    assert lines[0] == (
        "exporter 1M rows time: 1.10x the slower half (11.0 s vs upload 10.0 s; COPY 8.0 s, upload 10.0 s), "
        "100 MB/s for 1,100 MB [target <=1.15x] PASS"
    )
    assert lines[1] == (
        "exporter 1M rows vs two-step: 1.64x the speed of psql COPY > file + aws s3 cp (11.0 s vs 18.0 s) "
        "[target >=1.25x] PASS"
    )
    assert lines[-1] == (
        "exporter peak_rss: 100 MiB at most; medians 100 MiB at 1,000,000 rows, 100 MiB at 1,000,000 rows: "
        "+0% [target <=150 MiB, within 20%] PASS"
    )
    assert result.findings == []
