"""The apply step against real Postgres: convergence of the real fixtures in any order, stale events,
duplicates, deletes, moves, history-only events, unicode, poison data isolation, the README queries."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog.testing

from backfill.snapshot import reconciled_delete_envelope
from consumer.apply import apply_envelopes
from ops.forget_user import forget
from ops.user_scrub import FORMER_USER, Person
from shared import db
from shared.envelope import Envelope
from shared.jira_event import RECONCILED_DELETE_EVENT, SNAPSHOT_EVENT
from shared.settings import DatabaseSettings
from tests import jira_fixtures
from tests.jira_fixtures import make_event
from tests.test_consumer_helpers import (
    CONSUMER_APP,
    clear_tables,
    consumer_waiting_on_lock,
    envelope_of,
    fixture_envelopes,
    lock_waiters,
    snapshot,
    wait_for,
)

CREATED = "mattermost-plugin-jira__webhook-issue-created.json"
ASSIGNED = "mattermost-plugin-jira__webhook-issue-updated-assigned.json"
RESOLVED = "mattermost-plugin-jira__webhook-issue-updated-resolved.json"
DELETED = "mattermost-plugin-jira__webhook-issue-deleted.json"
MOVED = "pinpoint-jira__jira_issue_updated.project.json"
COMMENT = "mattermost-plugin-jira__webhook-cloud-comment-created.json"
ASSIGNEE = "5c5f880629be9642ba529340"  # the assignee in ASSIGNED


async def apply_in_batches(conn: asyncpg.Connection, envelopes: list[Envelope], size: int) -> list[str]:
    outcomes: list[str] = []
    for start in range(0, len(envelopes), size):
        result = await apply_envelopes(conn, envelopes[start : start + size])
        outcomes += [r.outcome for r in result.results]
    return outcomes


async def row(conn: asyncpg.Connection, issue_id: int) -> dict[str, Any]:
    record = await conn.fetchrow("SELECT * FROM ap_jira_task WHERE issue_id = $1", issue_id)
    assert record is not None
    return dict(record)


async def test_real_fixtures_converge_in_any_delivery_order(pg: asyncpg.Connection) -> None:
    # GIVEN every real issue fixture, as the receiver enqueues it
    envelopes = fixture_envelopes()
    shuffled = envelopes[:]
    random.Random(7).shuffle(shuffled)
    duplicated = [e for pair in zip(shuffled, envelopes, strict=True) for e in pair]
    orders = {
        "in order, batches of 10": (envelopes, 10),
        "reversed, batches of 3": (envelopes[::-1], 3),
        "shuffled, one at a time": (shuffled, 1),
        "duplicated and interleaved, batches of 10": (duplicated, 10),
    }
    # WHEN each order is applied to empty tables
    snapshots = {}
    for name, (order, size) in orders.items():
        await clear_tables(pg)
        outcomes = await apply_in_batches(pg, order, size)
        assert "invalid" not in outcomes, name
        snapshots[name] = await snapshot(pg)
    # THEN both tables hold exactly the same content every time
    first = snapshots["in order, batches of 10"]
    for name, content in snapshots.items():
        assert content == first, name
    tasks, events = first
    assert len(events) == len(envelopes) == 50
    assert len(tasks) == 19  # issues with a full issue object or a delete among the fixtures
    assert sum(t["is_deleted"] for t in tasks) == 2


async def test_a_stale_event_changes_nothing(pg: asyncpg.Connection) -> None:
    # GIVEN an issue updated at t=2000
    newer = envelope_of(make_event(ASSIGNED, ts=2000))
    older = envelope_of(make_event(CREATED, ts=1000))
    assert (await apply_envelopes(pg, [newer])).results[0].outcome == "applied"
    before = await row(pg, 10040)
    # WHEN an event from t=1000 arrives late
    result = await apply_envelopes(pg, [older])
    # THEN it is recorded in the history but the row keeps the newer state
    assert result.results[0].outcome == "skipped_stale"
    assert await row(pg, 10040) == before
    assert before["version"] == 2000 and before["assignee_display_name"] == "Test User"
    history = await pg.fetch("SELECT event_version, applied FROM ap_jira_task_event ORDER BY event_version")
    assert [tuple(r) for r in history] == [(1000, False), (2000, True)]


async def test_a_duplicate_delivery_changes_nothing(pg: asyncpg.Connection) -> None:
    envelope = envelope_of(make_event(CREATED, ts=1000), delivery_id="d-1")
    await apply_envelopes(pg, [envelope])
    before = await row(pg, 10040)
    # WHEN the same delivery arrives again, alone and twice within one batch
    again = await apply_envelopes(pg, [envelope])
    twice = await apply_envelopes(pg, [envelope, envelope])
    # THEN nothing changes, not even ingested_at, and the history keeps one row
    assert [r.outcome for r in again.results + twice.results] == ["duplicate"] * 3
    assert await row(pg, 10040) == before
    assert await pg.fetchval("SELECT count(*) FROM ap_jira_task_event") == 1


@pytest.mark.parametrize(
    ("batches", "expected"),
    [
        ([[0, 1]], ["duplicate", "applied"]),
        ([[1, 0]], ["applied", "duplicate"]),
        # the later batch's newer event moves the row, but its id is in the history already
        ([[0], [1]], ["applied", "duplicate"]),
        ([[1], [0]], ["applied", "duplicate"]),
    ],
    ids=str,
)
async def test_two_events_under_one_delivery_id_leave_the_newer_however_they_are_batched(
    pg: asyncpg.Connection, batches: list[list[int]], expected: list[str]
) -> None:
    # GIVEN two different events of one issue sent under one delivery id (a producer reusing ids)
    events = [envelope_of(make_event(CREATED, ts=ts), delivery_id="reused") for ts in (1000, 2000)]
    # WHEN they are applied in one batch or two, in either order
    outcomes = [
        r.outcome
        for batch in batches
        for r in (await apply_envelopes(pg, [events[i] for i in batch])).results
    ]
    # THEN the row holds the newer one, as it would under two ids; the history keeps one row for the id
    assert (await row(pg, 10040))["version"] == 2000
    assert await pg.fetchval("SELECT count(*) FROM ap_jira_task_event") == 1
    assert outcomes == expected


async def test_same_content_under_another_delivery_id_is_recorded_but_changes_nothing(
    pg: asyncpg.Connection,
) -> None:
    body = make_event(CREATED, ts=1000)
    await apply_envelopes(pg, [envelope_of(body, delivery_id="a")])
    before = await row(pg, 10040)
    result = await apply_envelopes(pg, [envelope_of(body, delivery_id="b")])
    assert result.results[0].outcome == "skipped_stale"
    assert await row(pg, 10040) == before
    assert await pg.fetchval("SELECT count(*) FROM ap_jira_task_event") == 2


async def test_delete_then_late_update_never_resurrects(pg: asyncpg.Connection) -> None:
    # GIVEN an issue created at 1000 and deleted at 3000 (the delete carries the full issue)
    await apply_envelopes(pg, [envelope_of(make_event(CREATED, ts=1000))])
    await apply_envelopes(pg, [envelope_of(make_event(DELETED, issue_id=10040, ts=3000))])
    deleted = await row(pg, 10040)
    assert (deleted["is_deleted"], deleted["deleted_version"], deleted["last_event_type"]) == (
        True,
        3000,
        "jira:issue_deleted",
    )
    assert deleted["deleted_at"].isoformat() == "1970-01-01T00:00:03+00:00"
    # WHEN an update from 2000 arrives after the delete
    result = await apply_envelopes(pg, [envelope_of(make_event(ASSIGNED, ts=2000))])
    # THEN the row stays deleted and keeps its data
    assert result.results[0].outcome == "skipped_stale"
    assert await row(pg, 10040) == deleted
    assert deleted["issue_key"] == "IDT-19"  # the data the delete carried


async def test_a_slim_delete_flags_the_row_and_keeps_its_fields(pg: asyncpg.Connection) -> None:
    await apply_envelopes(pg, [envelope_of(make_event(CREATED, ts=1000))])
    before = await row(pg, 10040)
    # WHEN a Forge-era delete with almost no fields arrives (it may not set fields)
    slim = {
        "webhookEvent": "jira:issue_deleted",
        "timestamp": 2000,
        "issue": {"id": "10040", "key": "TES-41"},
    }
    result = await apply_envelopes(pg, [envelope_of(slim)])
    after = await row(pg, 10040)
    assert result.results[0].outcome == "applied"
    assert (after["is_deleted"], after["deleted_version"], after["version"]) == (True, 2000, 1000)
    assert {k: after[k] for k in ("summary", "status", "raw")} == {
        k: before[k] for k in ("summary", "status", "raw")
    }


def _slim_delete(ts: int) -> dict[str, Any]:
    return {"webhookEvent": "jira:issue_deleted", "timestamp": ts, "issue": {"id": "10040", "key": "TES-41"}}


@pytest.mark.parametrize("batched", [True, False], ids=["one-batch", "one-by-one"])
async def test_an_older_delete_after_a_newer_one_never_undoes_it(
    pg: asyncpg.Connection, batched: bool
) -> None:
    # GIVEN an issue created at 1000 and deleted at 3000 (a slim delete: the fields stay at 1000)
    await apply_envelopes(pg, [envelope_of(make_event(CREATED, ts=1000))])
    await apply_envelopes(pg, [envelope_of(_slim_delete(3000))])
    # WHEN late deliveries bring an update from 2500 (newer than the fields) and a delete from 2000
    late = [envelope_of(make_event(ASSIGNED, ts=2500)), envelope_of(_slim_delete(2000))]
    outcomes = await apply_in_batches(pg, late, 2 if batched else 1)
    # THEN the update's fields are taken, but the row stays deleted as of 3000: the older delete is stale
    assert outcomes == ["applied", "skipped_stale"]
    after = await row(pg, 10040)
    assert (after["is_deleted"], after["deleted_version"], after["version"]) == (True, 3000, 2500)
    assert after["deleted_at"].isoformat() == "1970-01-01T00:00:03+00:00"
    assert after["assignee_account_id"] == ASSIGNEE


@pytest.mark.parametrize(
    ("field", "value", "column", "stored"),
    [
        ("duedate", "2024-01-01", "due_date", "2024-01-01"),
        ("parent", {"id": "10001", "key": "TES-1"}, "parent_key", "TES-1"),
    ],
)
async def test_a_newer_event_that_clears_a_field_clears_its_column_and_an_older_one_does_not_set_it(
    pg: asyncpg.Connection, field: str, value: Any, column: str, stored: str
) -> None:
    # GIVEN an issue whose due date (parent) was set at 1000
    def update(ts: int, field_value: Any) -> Envelope:
        body = make_event(ASSIGNED, ts=ts)
        body["issue"]["fields"][field] = field_value
        return envelope_of(body)

    await apply_envelopes(pg, [update(1000, value)])
    assert await pg.fetchval(f"SELECT {column}::text FROM ap_jira_task WHERE issue_id = 10040") == stored
    # WHEN an update from 2000 has it empty (cleared in Jira), then a stale one from 1500 has it set
    await apply_envelopes(pg, [update(2000, None)])
    await apply_envelopes(pg, [update(1500, value)])
    # THEN the column is empty: the newest state wins, field by field, including a null
    assert await pg.fetchval(f"SELECT {column} FROM ap_jira_task WHERE issue_id = 10040") is None


async def test_a_trimmed_delete_that_still_looks_full_keeps_the_last_fields(pg: asyncpg.Connection) -> None:
    # GIVEN a resolved issue with a priority, a resolution and labels
    resolved = make_event(RESOLVED, ts=1000)
    await apply_envelopes(pg, [envelope_of(resolved)])
    before = await row(pg, 10040)
    assert (before["priority"], before["resolution"], before["labels"]) == ("High", "Done", ["test-label"])
    # WHEN its delete arrives trimmed as Forge-era Cloud deletes are: only the fields Forge's Issue
    # type lists, which still include key, created, status, issue type and project
    kept = (
        "summary",
        "issuetype",
        "creator",
        "created",
        "project",
        "reporter",
        "assignee",
        "updated",
        "status",
    )
    trimmed = {
        "webhookEvent": "jira:issue_deleted",
        "timestamp": 2000,
        "issue": {
            **resolved["issue"],
            "fields": {k: v for k, v in resolved["issue"]["fields"].items() if k in kept},
        },
    }
    result = await apply_envelopes(pg, [envelope_of(trimmed)])
    # THEN the row is flagged deleted and keeps every field it had, raw included
    assert result.results[0].outcome == "applied"
    after = await row(pg, 10040)
    assert (after["is_deleted"], after["deleted_version"], after["version"]) == (True, 2000, 1000)
    fields = ("summary", "status", "priority", "resolution", "resolved_at", "labels", "due_date", "raw")
    assert {k: after[k] for k in fields} == {k: before[k] for k in fields}


async def test_a_delete_before_any_fields_creates_a_flagged_row(pg: asyncpg.Connection) -> None:
    gone = {"webhookEvent": RECONCILED_DELETE_EVENT, "timestamp": 5000, "issue": {"id": "42"}}
    await apply_envelopes(pg, [envelope_of(gone)])
    r = await row(pg, 42)
    assert (r["is_deleted"], r["version"], r["issue_key"], r["last_event_type"]) == (
        True,
        None,
        None,
        RECONCILED_DELETE_EVENT,
    )
    source = await pg.fetchval("SELECT source FROM ap_jira_task_event")
    assert source == "reconcile"


async def test_a_newer_event_after_a_reconciled_delete_shows_the_issue_exists(pg: asyncpg.Connection) -> None:
    # A reconcile delete is a claim at a point in time: a later event proves the issue exists.
    gone = {"webhookEvent": RECONCILED_DELETE_EVENT, "timestamp": 5000, "issue": {"id": "10040"}}
    await apply_envelopes(pg, [envelope_of(gone), envelope_of(make_event(CREATED, ts=4000))])
    assert (await row(pg, 10040))["is_deleted"] is True
    await apply_envelopes(pg, [envelope_of(make_event(ASSIGNED, ts=6000))])
    assert (await row(pg, 10040))["is_deleted"] is False


async def test_an_issue_reconciled_away_twice_is_deleted_and_recorded_twice_in_any_batching(
    pg: asyncpg.Connection,
) -> None:
    # GIVEN an issue reconcile deleted (a 404), which came back (a newer webhook: the 404 was lost
    # access), then vanished again: two reconcile deletes of two different row versions
    first_gone = reconciled_delete_envelope("10040", "TES-1", row_version=4000, now_ms=5000)
    second_gone = reconciled_delete_envelope("10040", "TES-1", row_version=6000, now_ms=7000)
    sequence = [
        envelope_of(make_event(CREATED, ts=4000)),
        first_gone,
        envelope_of(make_event(ASSIGNED, ts=6000)),
        second_gone,
    ]
    expected = {
        4: ["skipped_stale", "skipped_stale", "applied", "applied"],  # the batch's newest of each part wins
        1: ["applied"] * 4,
    }
    for size, outcomes in expected.items():
        await clear_tables(pg)
        # WHEN they are applied in one batch, or one message per batch
        assert await apply_in_batches(pg, sequence, size) == outcomes
        # THEN neither delete is a duplicate of the other: the row ends deleted by the second, and the
        # history holds all four deliveries
        r = await row(pg, 10040)
        assert (r["is_deleted"], r["deleted_version"]) == (True, 7000)
        assert await pg.fetchval("SELECT count(*) FROM ap_jira_task_event") == 4


async def test_a_move_makes_key_project_and_number_follow(pg: asyncpg.Connection) -> None:
    # GIVEN the issue as TES-82 in project TES, then moved to GOLD-208 (same issue id)
    before_move = make_event(MOVED, ts=1000)
    before_move["issue"]["key"] = "TES-82"
    before_move["issue"]["fields"]["project"].update(id="10601", key="TES", name="TESTING")
    before_move["changelog"] = {"id": "104600", "items": []}
    moved = make_event(MOVED, ts=2000)
    for order in ([before_move, moved], [moved, before_move]):
        await clear_tables(pg)
        # WHEN both events are applied, in either order
        for body in order:
            await apply_envelopes(pg, [envelope_of(body)])
        # THEN the row, keyed by id, carries the new key, project and number
        r = await row(pg, 19518)
        assert (r["issue_key"], r["project_key"], r["project_id"], r["project_name"], r["issue_number"]) == (
            "GOLD-208",
            "GOLD",
            10639,
            "Gold Miners",
            208,
        )
    assert await pg.fetchval("SELECT count(*) FROM ap_jira_task") == 1


@pytest.mark.parametrize(
    "name",
    [
        "mattermost-plugin-jira__webhook-cloud-comment-created.json",
        "mattermost-plugin-jira__webhook-cloud-comment-deleted.json",
        "zulip__attachment_created.json",
        "zulip__worklog_created.json",
        "zulip__worklog_updated__edited.json",
        "pinpoint-jira__issuelink_created.json",
        "mattermost-plugin-jira__webhook-issue-assigned-empty-changelog.json",
    ],
)
async def test_history_only_events_never_touch_the_row(pg: asyncpg.Connection, name: str) -> None:
    # GIVEN an issue with full fields
    await apply_envelopes(pg, [envelope_of(make_event(CREATED, issue_id=7, ts=1000))])
    before = await row(pg, 7)
    # WHEN a newer comment/attachment/worklog/link event or a slim issue object arrives
    result = await apply_envelopes(pg, [envelope_of(make_event(name, issue_id=7, ts=9000))])
    # THEN it is in the history and the row did not change at all
    assert result.results[0].outcome == "history_only"
    assert await row(pg, 7) == before
    event_type = jira_fixtures.load(name)["webhookEvent"]
    history = await pg.fetchrow("SELECT * FROM ap_jira_task_event WHERE event_version = 9000")
    assert history is not None
    assert (history["issue_id"], history["event_type"], history["applied"]) == (7, event_type, False)


async def test_history_records_changelog_actor_and_source(pg: asyncpg.Connection) -> None:
    body = make_event(RESOLVED, ts=1550286940507)
    snapshot_body = {"webhookEvent": SNAPSHOT_EVENT, "timestamp": 1, "issue": body["issue"]}
    await apply_envelopes(pg, [envelope_of(body, delivery_id="jira-1"), envelope_of(snapshot_body)])
    h = await pg.fetchrow("SELECT * FROM ap_jira_task_event WHERE delivery_id = 'jira-1'")
    assert h is not None
    assert h["changelog"] == body["changelog"]["items"]
    assert (h["event_type"], h["issue_event_type_name"], h["source"], h["applied"]) == (
        "jira:issue_updated",
        "issue_generic",
        "webhook",
        True,
    )
    assert (h["actor_account_id"], h["actor_display_name"]) == ("5c5f880629be9642ba529340", "Test User")
    assert h["event_tiebreak"].startswith("00000000000000010228:")
    assert h["received_at"].isoformat() == "2023-11-14T22:13:20+00:00"
    sources = await pg.fetch("SELECT source FROM ap_jira_task_event ORDER BY source")
    assert [r["source"] for r in sources] == ["backfill", "webhook"]


async def test_equal_times_are_ordered_by_changelog_id(pg: asyncpg.Connection) -> None:
    # GIVEN two updates in the same millisecond; Jira's changelog ids say which came later
    first = make_event(ASSIGNED, ts=5000)
    first["changelog"]["id"] = "9"
    first["issue"]["fields"]["summary"] = "first"
    second = make_event(ASSIGNED, ts=5000)
    second["changelog"]["id"] = "10"
    second["issue"]["fields"]["summary"] = "second"
    for order in ([first, second], [second, first], [second, first, second]):
        await clear_tables(pg)
        await apply_envelopes(pg, [envelope_of(b) for b in order])
        r = await row(pg, 10040)
        # THEN the later change wins whatever the delivery order
        assert (r["summary"], r["version_tiebreak"][:20]) == ("second", "00000000000000000010")


async def test_cloud_and_server_payloads(pg: asyncpg.Connection) -> None:
    cloud = envelope_of(
        jira_fixtures.raw("mattermost-plugin-jira__webhook-cloud-issue-created-many-fields.json")
    )
    server = envelope_of(
        jira_fixtures.raw("mattermost-plugin-jira__webhook-server-issue-updated-many-fields.json")
    )
    await apply_envelopes(pg, [cloud, server])
    c, s = await row(pg, 10509), await row(pg, 10400)
    assert (c["issue_key"], c["assignee_account_id"], c["labels"]) == (
        "KT-22",
        "5cedcb4355a88a0fc86388ba",
        ["Label1", "Label2"],
    )
    assert (s["issue_key"], s["assignee_account_id"], s["reporter_account_id"], s["status"]) == (
        "HEY-15",
        "mickmister",
        "mickmister",
        "To Do",
    )


async def test_unicode_round_trips(pg: asyncpg.Connection) -> None:
    # GIVEN Cyrillic (a real Russian-locale fixture) and emoji in text fields
    epic = make_event("jira-to-matrix__epic_created.json", ts=1000)
    epic["issue"]["fields"]["labels"] = ["релиз", "🎉"]
    emoji = make_event(CREATED, ts=1000)
    emoji["issue"]["fields"]["summary"] = "Ship it 🌍🌎🌏 à la carte\r\nline two"
    await apply_envelopes(pg, [envelope_of(epic), envelope_of(emoji)])
    e, m = await row(pg, 13877), await row(pg, 10040)
    # THEN text, arrays and the raw jsonb come back exactly
    assert (e["summary"], e["assignee_display_name"], e["labels"]) == (
        "Тестовый эпик",
        "Иванов Иван Иванович",
        ["релиз", "🎉"],
    )
    assert m["summary"] == "Ship it 🌍🌎🌏 à la carte\r\nline two"
    assert m["raw"] == emoji["issue"]
    assert e["raw"] == epic["issue"]


async def test_a_value_too_big_for_its_index_is_dead_lettered_alone(pg: asyncpg.Connection) -> None:
    # GIVEN a batch whose second event carries a project key too big for a btree index entry even
    # compressed (about 2.7 KB is the limit; hex digits compress to half): class 54, not retryable
    huge = make_event(CREATED, issue_id=2, ts=1000)
    huge["issue"]["fields"]["project"]["key"] = "".join(
        hashlib.sha256(str(i).encode()).hexdigest() for i in range(200)
    )
    batch = [envelope_of(make_event(CREATED, issue_id=i, ts=1000)) for i in (1, 3)]
    batch.insert(1, envelope_of(huge))
    # WHEN the batch is applied
    result = await apply_envelopes(pg, batch)
    # THEN only that event is invalid, with PostgreSQL's reason, and the others are applied
    assert [r.outcome for r in result.results] == ["applied", "invalid", "applied"]
    assert result.results[1].error_class == "ProgramLimitExceededError"
    assert "index row" in (result.results[1].error_message or "")
    assert [r["issue_id"] for r in await pg.fetch("SELECT issue_id FROM ap_jira_task ORDER BY 1")] == [1, 3]


async def test_poison_data_is_isolated_and_the_rest_of_the_batch_applies(pg: asyncpg.Connection) -> None:
    # GIVEN a batch with two messages carrying a NUL character Postgres cannot store (in text, in jsonb)
    poison = make_event(CREATED, issue_id=2, ts=2000)
    poison["issue"]["fields"]["summary"] = "bad \u0000 summary"
    bad_changelog = make_event(ASSIGNED, issue_id=3, ts=2000)
    bad_changelog["changelog"]["items"][0]["toString"] = "nul\u0000"
    batch = [
        envelope_of(make_event(CREATED, issue_id=1, ts=1000)),
        envelope_of(poison),
        envelope_of(make_event(ASSIGNED, issue_id=2, ts=1500)),
        envelope_of(bad_changelog),
        envelope_of(make_event(CREATED, issue_id=3, ts=1000)),
    ]
    # WHEN the batch is applied inside the caller's transaction
    async with pg.transaction():
        result = await apply_envelopes(pg, batch)
    # THEN exactly the two bad messages are invalid, with Postgres's reason, and the rest applied
    assert result.isolated
    assert [r.outcome for r in result.results] == ["applied", "invalid", "applied", "invalid", "applied"]
    assert result.results[1].error_class == "CharacterNotInRepertoireError"
    assert result.results[1].error_message == 'invalid byte sequence for encoding "UTF8": 0x00'
    assert result.results[3].error_class == "UntranslatableCharacterError"
    assert [r["issue_id"] for r in await pg.fetch("SELECT issue_id FROM ap_jira_task ORDER BY 1")] == [
        1,
        2,
        3,
    ]
    assert (await row(pg, 2))["version"] == 1500
    assert await pg.fetchval("SELECT count(*) FROM ap_jira_task_event") == 3


async def test_a_time_with_no_utc_equivalent_becomes_null_not_an_invalid_event(
    pg: asyncpg.Connection,
) -> None:
    # GIVEN an update whose created and resolution times fall outside datetime's range once in UTC
    body = make_event(ASSIGNED, ts=2000)
    body["issue"]["fields"].update(
        created="0001-01-01T00:00:00.000+1400", resolutiondate="9999-12-31T23:00:00.000-1400"
    )
    # WHEN it is applied
    result = await apply_envelopes(pg, [envelope_of(body)])
    # THEN it applies like any tolerated odd field: those columns are NULL, the rest is there
    assert [r.outcome for r in result.results] == ["applied"]
    r = await row(pg, 10040)
    assert (r["created_at"], r["resolved_at"], r["version"]) == (None, None, 2000)


@pytest.mark.parametrize("due", ["9999-12-31", "0001-01-01"])
async def test_a_due_date_at_the_end_of_the_calendar_is_stored_as_that_date(
    pg: asyncpg.Connection, due: str
) -> None:
    # GIVEN an update with a far-off due date (asyncpg's binary codec would send date.max and date.min
    # as infinity and -infinity)
    body = make_event(ASSIGNED, ts=2000)
    body["issue"]["fields"]["duedate"] = due
    # WHEN it is applied
    await apply_envelopes(pg, [envelope_of(body)])
    # THEN the column holds that very date, which analysts, CSV and Parquet read as a date
    assert await pg.fetchval("SELECT due_date::text FROM ap_jira_task WHERE issue_id = 10040") == due


async def test_unencodable_text_is_invalid(pg: asyncpg.Connection) -> None:
    # A lone surrogate escape is valid JSON but not valid Unicode text.
    body = json.dumps(make_event(CREATED, ts=1000)).replace('"Unit test summary"', '"\\ud800"')
    result = await apply_envelopes(pg, [envelope_of(body)])
    assert (result.results[0].outcome, result.results[0].error_class) == ("invalid", "InvalidMessage")
    assert result.results[0].error_message == (
        "issue object cannot be stored as JSON: str is not valid UTF-8: surrogates not allowed"
    )


def nested(depth: int) -> dict[str, Any]:
    """An Atlassian document ``depth`` lists deep (a description of nested bullet lists)."""
    node: dict[str, Any] = {"type": "text", "text": "deepest"}
    for _ in range(depth):
        node = {"type": "bulletList", "content": [node]}
    return {"type": "doc", "version": 1, "content": [node]}


@pytest.mark.parametrize("escape_elsewhere", [False, True], ids=["plain", "nul-outside-the-issue"])
async def test_an_issue_nested_deeper_than_orjson_writes_is_stored(
    pg: asyncpg.Connection, escape_elsewhere: bool
) -> None:
    # GIVEN an issue whose description nests 300 lists deep (orjson writes 254 levels at most), and
    # maybe a NUL escape outside the issue object, which sends the issue object through Python
    body = make_event(CREATED, issue_id=10041, ts=1000)
    body["issue"]["fields"]["description"] = nested(300)
    if escape_elsewhere:
        body["user"]["timeZone"] = "Europe/\x00Berlin"  # JSON text: the escape \u0000
    text = json.dumps(body)
    assert ("\\u0000" in text) is escape_elsewhere
    # WHEN it is applied
    result = await apply_envelopes(pg, [envelope_of(text)])
    # THEN it is stored whole either way: the NUL elsewhere in the body does not make it invalid
    assert [r.outcome for r in result.results] == ["applied"], result.results
    assert (await row(pg, 10041))["raw"]["fields"]["description"] == nested(300)


async def test_a_batch_that_waited_on_a_lock_stamps_its_write_after_the_write_before_it(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN issues 1 and 2, and a batch of newer events for both that starts, then waits on a lock
    # another session holds on issue 1 (rows are written in issue id order)
    await apply_envelopes(pg, [envelope_of(make_event(CREATED, issue_id=i, ts=1000)) for i in (1, 2)])
    holder = await db.connect(db_settings)
    waiter = await db.connect(db_settings, server_settings={"application_name": CONSUMER_APP})
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM ap_jira_task WHERE issue_id = 1 FOR UPDATE")
            newer = [envelope_of(make_event(ASSIGNED, issue_id=i, ts=3000)) for i in (1, 2)]
            waiting = asyncio.create_task(apply_envelopes(waiter, newer))
            await wait_for(lambda: consumer_waiting_on_lock(pg), what="the batch waiting on the lock")
            # WHEN meanwhile another batch writes issue 2 (an older event) and commits
            await apply_envelopes(pg, [envelope_of(make_event(ASSIGNED, issue_id=2, ts=2000))])
            written_before = await pg.fetchval("SELECT ingested_at FROM ap_jira_task WHERE issue_id = 2")
        await asyncio.wait_for(waiting, timeout=30)
    finally:
        await holder.close()
        await waiter.close()
    # THEN the newest write of issue 2 is stamped after that one: readers of changes/ keep the row with
    # the greatest ingested_at, which is the newest row
    version, ingested_at = await pg.fetchrow(
        "SELECT version, ingested_at FROM ap_jira_task WHERE issue_id = 2"
    )
    assert version == 3000
    assert ingested_at > written_before


def reconciled_delete(issue_id: int, ts: int) -> Envelope:
    return envelope_of(
        {"webhookEvent": RECONCILED_DELETE_EVENT, "timestamp": ts, "issue": {"id": str(issue_id)}}
    )


async def history_applied(pg: asyncpg.Connection) -> dict[str, bool]:
    return {
        r["delivery_id"]: r["applied"]
        for r in await pg.fetch("SELECT delivery_id, applied FROM ap_jira_task_event")
    }


@pytest.mark.parametrize("row_before", [True, False], ids=["existing-row", "new-row"])
async def test_an_event_beaten_by_a_commit_made_while_its_batch_waited_is_stale_as_in_any_serial_order(
    pg: asyncpg.Connection, db_settings: DatabaseSettings, row_before: bool
) -> None:
    # GIVEN issue 777 (at an old state, or not yet in the table), and a transaction that has written a
    # newer update of it and not committed
    first = envelope_of(make_event(CREATED, issue_id=777, ts=1000))
    if row_before:
        await apply_envelopes(pg, [first])
    newer = envelope_of(make_event(ASSIGNED, issue_id=777, ts=10_000))
    older, gone = envelope_of(make_event(CREATED, issue_id=777, ts=5000)), reconciled_delete(777, 6000)
    writer = await db.connect(db_settings)
    waiter = await db.connect(db_settings, server_settings={"application_name": CONSUMER_APP})
    try:
        transaction = writer.transaction()
        await transaction.start()
        await apply_envelopes(writer, [newer])
        # WHEN a batch of an older update and a delete of the issue starts (its statement's snapshot
        # predates the newer update) and waits for the row, and the newer update then commits
        waiting = asyncio.create_task(apply_envelopes(waiter, [older, gone]))
        await wait_for(lambda: consumer_waiting_on_lock(pg), what="the batch waiting on the row")
        await transaction.commit()
        result = await asyncio.wait_for(waiting, timeout=30)
    finally:
        await writer.close()
        await waiter.close()
    # THEN as in the serial order: the older update lost to the newer one, in its outcome and in the
    # history; the delete (newer than any delete before) changed the row
    assert [r.outcome for r in result.results] == ["skipped_stale", "applied"]
    assert await history_applied(pg) == {
        **({first.delivery_id: True} if row_before else {}),
        newer.delivery_id: True,
        older.delivery_id: False,
        gone.delivery_id: True,
    }
    assert tuple(await pg.fetchrow("SELECT version, deleted_version, is_deleted FROM ap_jira_task")) == (
        10_000,
        6000,
        False,
    )


async def test_a_redelivery_committed_by_another_session_while_its_batch_waited_is_a_duplicate(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN issue 777, and a session holding its row (as a session the consumer lost touch with can)
    await apply_envelopes(pg, [envelope_of(make_event(CREATED, issue_id=777, ts=1000))])
    update, gone = envelope_of(make_event(ASSIGNED, issue_id=777, ts=5000)), reconciled_delete(777, 6000)
    holder = await db.connect(db_settings)
    connections = [
        await db.connect(db_settings, server_settings={"application_name": CONSUMER_APP}) for _ in range(2)
    ]
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM ap_jira_task WHERE issue_id = 777 FOR UPDATE")
            # WHEN a batch of an update waits for the row, and the same update, received again in a
            # batch with a delete, waits behind it
            first = asyncio.create_task(apply_envelopes(connections[0], [update]))
            await wait_for(lambda: has_lock_waiters(pg, 1), what="the first batch waiting")
            again = asyncio.create_task(apply_envelopes(connections[1], [update, gone]))
            await wait_for(lambda: has_lock_waiters(pg, 2), what="the second batch waiting")
        results = await asyncio.wait_for(asyncio.gather(first, again), timeout=30)
    finally:
        for conn in (holder, *connections):
            await conn.close()
    # THEN the update was applied once: the second batch reports it a duplicate, as a redelivery
    assert [[r.outcome for r in result.results] for result in results] == [
        ["applied"],
        ["duplicate", "applied"],
    ]
    assert (await history_applied(pg))[update.delivery_id] is True


async def has_lock_waiters(pg: asyncpg.Connection, count: int) -> bool:
    return await lock_waiters(pg) == count


FORGET_APP = "jiralake-test-forget-user"


async def test_isolating_a_bad_message_locks_rows_in_forget_user_s_order_so_neither_deadlocks(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN issues 100 and 900 assigned to one person, and a session holding row 900 for a moment
    person = Person(account_id=ASSIGNEE)
    await apply_envelopes(pg, [envelope_of(make_event(ASSIGNED, issue_id=i, ts=1000)) for i in (100, 900)])
    poison = make_event(ASSIGNED, issue_id=500, ts=2000)
    poison["issue"]["fields"]["summary"] = "a NUL \u0000 here"
    batch = [envelope_of(make_event(ASSIGNED, issue_id=i, ts=2000)) for i in (900, 100)] + [
        envelope_of(poison)
    ]
    holder = await db.connect(db_settings)
    consumer = await db.connect(db_settings, server_settings={"application_name": CONSUMER_APP})
    forgetter = await db.connect(db_settings, server_settings={"application_name": FORGET_APP})
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM ap_jira_task WHERE issue_id = 900 FOR UPDATE")
            # WHEN a consumer batch (900, 100, then a message PostgreSQL rejects, so the batch is applied
            # one message at a time) waits for row 900, and forget-user for the person starts
            applying = asyncio.create_task(apply_envelopes(consumer, batch))
            await wait_for(lambda: consumer_waiting_on_lock(pg), what="the batch waiting on row 900")
            forgetting = asyncio.create_task(forget(forgetter, person))
            await wait_for(lambda: forget_user_waiting(pg), what="forget-user waiting")
        result, _ = await asyncio.wait_for(asyncio.gather(applying, forgetting), timeout=30)
    finally:
        for conn in (holder, consumer, forgetter):
            await conn.close()
    # THEN both finish (no deadlock, which would abort one of them): the batch applies both updates and
    # isolates the bad message, and forget-user, having waited for the batch, scrubs what it wrote
    assert [r.outcome for r in result.results] == ["applied", "applied", "invalid"]
    names = await pg.fetch("SELECT issue_id, version, assignee_display_name FROM ap_jira_task ORDER BY 1")
    assert [tuple(r) for r in names] == [(100, 2000, FORMER_USER), (900, 2000, FORMER_USER)]


async def forget_user_waiting(pg: asyncpg.Connection) -> bool:
    return await lock_waiters(pg, FORGET_APP) > 0


async def test_text_that_cannot_be_encoded_is_reported_without_quoting_anyone_s_values(
    pg: asyncpg.Connection,
) -> None:
    # GIVEN a batch of two updates whose actors are two people, one display name holding a lone
    # surrogate (valid JSON, no Unicode text), which fails asyncpg's encoding of the whole array
    good = make_event(ASSIGNED, issue_id=1, ts=2000)
    good["user"]["displayName"] = "Alice Bystander"
    bad_event = make_event(ASSIGNED, issue_id=2, ts=2000)
    bad_event["user"]["displayName"] = "SURROGATE Mallory"
    bad = json.dumps(bad_event).replace("SURROGATE", "\\ud800", 1)  # the JSON escape of a lone surrogate
    assert "Mallory" in bad
    with structlog.testing.capture_logs() as logs:
        result = await apply_envelopes(pg, [envelope_of(good), envelope_of(bad)])
    # THEN the bad one alone is invalid, with asyncpg's reason but neither person's name
    assert [r.outcome for r in result.results] == ["applied", "invalid"]
    message = result.results[1].error_message or ""
    assert re.fullmatch(
        r"invalid input for query argument \$[0-9]+: 'utf-8' codec can't encode character '\\ud800' in "
        r"position 0: surrogates not allowed",
        message,
    ), message
    [isolating] = [e for e in logs if e["event"] == "batch_rejected_isolating"]
    assert "Alice" not in isolating["error_message"] and "Mallory" not in isolating["error_message"]
    assert isolating["error_message"] == message


@pytest.mark.parametrize(("depth", "stored"), [(300, True), (1000, False)])
async def test_a_changelog_nested_deeper_than_python_encodes_is_invalid_not_a_crash(
    pg: asyncpg.Connection, depth: int, stored: bool
) -> None:
    # GIVEN an update whose changelog nests 300 levels (deeper than orjson writes) or 1000 (deeper than
    # Python's recursion limit, which once crashed the consumer), between two good events of its batch
    deep = make_event(ASSIGNED, issue_id=2, ts=2000)
    deep["changelog"]["items"][0]["to"] = "NESTED"
    shallow = envelope_of(deep)  # the same attributes: the receiver's own parser stops near 1000 levels
    deep_body = shallow.body.replace('"NESTED"', "[" * depth + "]" * depth)
    batch = [
        envelope_of(make_event(CREATED, issue_id=1, ts=1000)),
        dataclasses.replace(shallow, body=deep_body),
        envelope_of(make_event(ASSIGNED, issue_id=3, ts=2000)),
    ]
    # WHEN the batch is applied
    result = await apply_envelopes(pg, batch)
    # THEN 300 levels are stored (the standard library encodes what orjson will not), and 1000 make
    # that event alone invalid, with the reason, while the others apply
    if stored:
        assert [r.outcome for r in result.results] == ["applied", "applied", "applied"]
        return
    assert result.isolated
    assert [r.outcome for r in result.results] == ["applied", "invalid", "applied"]
    assert result.results[1].error_class == "InvalidMessage"
    assert result.results[1].error_message == "changelog items cannot be stored as JSON: nested too deeply"


def _readme_queries() -> dict[str, str]:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Data model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, re.DOTALL)
    return {name: b for b in blocks for name in ("time_in_status", "cycle_time") if f"AS {name}" in b}


async def test_readme_time_in_status_and_cycle_time_queries(pg: asyncpg.Connection) -> None:
    # GIVEN the real Cloud lifecycle of TES-41: created (To Do), started (In Progress), resolved (Done)
    names = [CREATED, "mattermost-plugin-jira__webhook-issue-updated-started-working.json", RESOLVED]
    await apply_envelopes(pg, [envelope_of(jira_fixtures.raw(n)) for n in names])
    await apply_envelopes(pg, [envelope_of(jira_fixtures.raw(RESOLVED), delivery_id="redelivered")])
    queries = _readme_queries()
    # WHEN the README's queries run
    statuses = await pg.fetch(queries["time_in_status"])
    cycle = await pg.fetch(queries["cycle_time"])
    # THEN they give the durations between the real event times (a redelivery is not counted twice)
    by_status = {r["status"]: r["time_in_status"] for r in statuses}
    assert by_status["To Do"] == timedelta(milliseconds=1550286862039 - 1550286113023)
    assert by_status["In Progress"] == timedelta(milliseconds=1550286940507 - 1550286862039)
    assert set(by_status) == {"To Do", "In Progress", "Done"}
    assert [tuple(r) for r in cycle] == [("TES-41", timedelta(milliseconds=1550286940470 - 1550286862039))]
