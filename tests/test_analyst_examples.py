"""What an analyst reads in the README and docs/consumer.md holds on the real sample webhooks: every SQL
example runs against tables filled by the real consumer and returns what the text says, the column
descriptions match what the consumer writes, and the Athena DDL shown is what `--athena-ddl` prints."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer.apply import apply_envelopes
from exporter.athena_ddl import athena_ddl
from exporter.columns import read_columns, select_columns
from exporter.layout import ExportLayout
from exporter.settings import ExportFormat
from tests import jira_fixtures
from tests.test_consumer_helpers import envelope_of, fixture_envelopes

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONSUMER_DOC = (ROOT / "docs" / "consumer.md").read_text(encoding="utf-8")

CLOSED_AFTER_RESOLUTION = "mattermost-plugin-jira__webhook-server-issue-updated-closed.json"


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def sql_blocks(text: str) -> list[str]:
    return re.findall(r"```sql\n(.*?)```", text, re.DOTALL)


def data_model_query(alias: str) -> str:
    """The README data-model example whose result has a column named ``alias``."""
    found = [b for b in sql_blocks(section(README, "Data model")) if re.search(rf"\bAS {alias}\b", b)]
    assert len(found) == 1, f"README's data model has {len(found)} queries selecting {alias}"
    return found[0]


@pytest.fixture
async def lake(pg: asyncpg.Connection) -> asyncpg.Connection:
    """Both tables as the consumer leaves them after every sample webhook about an issue."""
    result = await apply_envelopes(pg, fixture_envelopes())
    assert {r.outcome for r in result.results} <= {"applied", "skipped_stale", "history_only"}
    return pg


async def test_every_sql_example_in_the_data_model_and_consumer_doc_runs(lake: asyncpg.Connection) -> None:
    # GIVEN the SQL examples an analyst copies from the README's data model and docs/consumer.md
    blocks = sql_blocks(section(README, "Data model")) + sql_blocks(CONSUMER_DOC)
    assert len(blocks) >= 6
    # WHEN each runs against the tables filled from the real samples
    # THEN none fails (a renamed column or a typo breaks this test, not an analyst's dashboard)
    for block in blocks:
        await lake.fetch(block)


async def test_open_issues_per_project_leave_deleted_issues_out(lake: asyncpg.Connection) -> None:
    rows = await lake.fetch(data_model_query("issues"))
    assert [tuple(r) for r in rows] == [
        ("BBCOM", "new", 2),
        ("DTP", "new", 1),
        ("GOLD", "new", 2),
        ("HEY", "new", 1),
        ("INDEV", "new", 3),
        ("KT", "new", 1),
        ("PRJX", "new", 1),
        ("PROD", "indeterminate", 1),
        ("TES", "done", 2),
        ("TES", "new", 3),
    ]
    # the two deleted samples (IDT-19, TIGR-361) keep their rows but are not counted
    deleted = await lake.fetch("SELECT issue_key FROM ap_jira_task WHERE is_deleted ORDER BY issue_key")
    assert [r["issue_key"] for r in deleted] == ["IDT-19", "TIGR-361"]


async def test_previous_keys_of_moved_issues(lake: asyncpg.Connection) -> None:
    rows = await lake.fetch(data_model_query("previous_key"))
    # the three real moves: Pinpoint's TES-82 -> GOLD-208, jira-to-matrix's TCP-2 -> INDEV-130 (issue_moved)
    # and RN-83 -> BBCOM-1233 (a Key change under issue_generic)
    assert [(r["issue_key"], r["previous_key"]) for r in rows] == [
        ("BBCOM-1233", "RN-83"),
        ("GOLD-208", "TES-82"),
        ("INDEV-130", "TCP-2"),
    ]


async def test_issues_known_only_from_their_history(lake: asyncpg.Connection) -> None:
    rows = await lake.fetch(data_model_query("events"))
    ids = [r["issue_id"] for r in rows]
    # comment, worklog, issue link, attachment and trimmed-payload events about issues never seen whole
    assert ids == [10000, 10001, 10014, 10022, 10357, 11442, 11901, 11961, 20192]
    total = await lake.fetchval("SELECT count(DISTINCT issue_id) FROM ap_jira_task_event")
    assert f"{len(ids)} of the {total} issue ids in the sample webhooks" in " ".join(README.split())


async def test_time_in_status_has_no_negative_period_and_no_deleted_issue(lake: asyncpg.Connection) -> None:
    rows = await lake.fetch(data_model_query("time_in_status"))
    assert rows
    assert all(r["time_in_status"] >= timedelta(0) for r in rows), [tuple(r) for r in rows]
    assert not {r["issue_key"] for r in rows} & {"IDT-19", "TIGR-361"}


async def test_cycle_time_is_never_negative_on_the_real_samples(lake: asyncpg.Connection) -> None:
    # GIVEN the samples, where TES-4, TES-19 and BBCOM-1233 were resolved before (or by) the first
    # status change the history holds
    # WHEN the README's cycle-time query runs
    rows = await lake.fetch(data_model_query("cycle_time"))
    # THEN no issue gets a negative cycle time: without a recorded start before the resolution, none
    assert [tuple(r) for r in rows if r["cycle_time"] < timedelta(0)] == []
    assert [tuple(r) for r in rows] == []


async def test_cycle_time_leaves_out_the_change_after_the_resolution(pg: asyncpg.Connection) -> None:
    # GIVEN a Server issue whose only recorded change, Resolved -> Closed, came 4 min after resolutiondate
    await apply_envelopes(pg, [envelope_of(jira_fixtures.raw(CLOSED_AFTER_RESOLUTION))])
    resolved_at, first_change = await pg.fetchrow(
        "SELECT t.resolved_at, min(e.event_at) FROM ap_jira_task t JOIN ap_jira_task_event e USING (issue_id)"
        " GROUP BY t.resolved_at"
    )
    assert first_change > resolved_at
    # WHEN the README's cycle-time query runs THEN it has no start for it, rather than -00:04:56
    assert await pg.fetch(data_model_query("cycle_time")) == []


async def test_column_descriptions_match_what_the_consumer_writes(lake: asyncpg.Connection) -> None:
    rows: list[dict[str, Any]] = [dict(r) for r in await lake.fetch("SELECT * FROM ap_jira_task")]
    # status_category: the category keys only
    assert {r["status_category"] for r in rows} <= {"new", "indeterminate", "done", "undefined"}
    # labels: NULL exactly when the issue object has no labels field, else the list ({} when empty)
    for r in rows:
        fields = r["raw"]["fields"] if isinstance(r["raw"], dict) else await _fields(lake, r["issue_id"])
        assert (r["labels"] is None) == ("labels" not in fields), r["issue_key"]
        for role in ("assignee", "reporter"):
            user = fields.get(role) or {}
            has_id = any(user.get(attr) for attr in ("accountId", "name", "key"))
            assert (r[f"{role}_account_id"] is not None) == has_id, (r["issue_key"], role)
            named = bool(user.get("displayName"))
            assert (r[f"{role}_display_name"] is not None) == named, (r["issue_key"], role)
    by_key = {r["issue_key"]: r for r in rows}
    # resolution and status category disagree on a real sample, as the README says
    paused = by_key["BBCOM-1233"]
    assert (paused["status"], paused["status_category"]) == ("Paused", "new")
    assert paused["resolution"] == "Incomplete"
    assert paused["resolved_at"] is not None
    # a moved issue: key, project and number follow it
    assert (by_key["GOLD-208"]["project_key"], by_key["GOLD-208"]["issue_number"]) == ("GOLD", 208)
    # every live row has what an analyst groups by; is_deleted is never NULL
    assert all(r["is_deleted"] is not None for r in rows)
    live = [r for r in rows if not r["is_deleted"]]
    assert all(r["issue_key"] and r["project_key"] and r["issue_number"] and r["created_at"] for r in live)
    # version is the event's time in ms, not a counter
    assert all(r["version"] > 1_000_000_000_000 for r in rows)


async def _fields(conn: asyncpg.Connection, issue_id: int) -> dict[str, Any]:
    raw = await conn.fetchval("SELECT raw::text FROM ap_jira_task WHERE issue_id = $1", issue_id)
    fields: dict[str, Any] = json.loads(raw)["fields"]
    return fields


@pytest.mark.parametrize("export_format", [ExportFormat.PARQUET, ExportFormat.CSV])
async def test_readme_athena_ddl_is_what_the_exporter_prints(
    lake: asyncpg.Connection, export_format: ExportFormat
) -> None:
    # GIVEN what `jiralake export --athena-ddl` prints for the real table, bucket my-bucket, default prefix
    columns = select_columns(await read_columns(lake), include_raw=export_format is ExportFormat.PARQUET)
    printed = athena_ddl(columns, ExportLayout(bucket="my-bucket", prefix="jiralake", format=export_format))
    printed_lines = printed.splitlines()
    # WHEN the README's abridged example for that format is read, its "-- ..." comments left out
    marker = "STORED AS PARQUET" if export_format is ExportFormat.PARQUET else "OpenCSVSerde"
    examples = [b for b in sql_blocks(section(README, "Querying with Athena")) if marker in b]
    assert len(examples) == 1
    shown = [line for line in examples[0].splitlines() if not line.strip().startswith("--")]
    # THEN every line it shows is a line of the real DDL, in the same order
    position = 0
    for line in shown:
        assert line in printed_lines[position:], f"README's Athena DDL line not printed (in order): {line!r}"
        position = printed_lines.index(line, position) + 1
