"""``jiralake forget-user``: one person's personal data erased from both tables, everyone else's left
exactly as it was, counts per person still adding up, a dry run that changes nothing, what the
consumer does with late and redelivered events afterwards, and the command line's refusals.

The people are real ones from the sample webhooks, applied through the consumer's apply step: Robin
Diddams (Jira Cloud, pinpoint samples: assignee, reporter, creator, actor, comment author, changelog
items) and Lev Brouk (Server/Data Center, username ``levbrouk``, mattermost samples: assignee, actor,
comment authors inside ``raw``, email address, Gravatar avatar)."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from consumer.apply import apply_envelopes
from ops import forget_user, user_scrub
from ops.forget_user import forget
from ops.forget_user_command import person_from_arguments, render
from ops.user_scrub import FORMER_USER, Person, pseudonym_for
from shared import db
from shared.envelope import Envelope
from shared.errors import CommandError
from shared.settings import DatabaseSettings
from tests import jira_fixtures
from tests.jira_fixtures import make_event
from tests.tcp_proxy import postgres_proxy, through
from tests.test_consumer_helpers import envelope_of, fixture_envelopes, wait_for

CLOUD_ID = "557058:8b6b268b-17b3-407b-8974-bed4042fa709"
CLOUD_NAME = "Robin Diddams"
DC_USERNAME = "levbrouk"
DC_NAME = "Lev Brouk"
DC_EMAIL = "lev@mattermost.com"
DC_GRAVATAR = "8c504b6c8f13cf9dc9ffb8af57323320"  # md5 of an email address, in the avatar URLs
DC_ISSUE = 10013  # PRJX-14, assigned to Lev Brouk, reported by Craig Vitter
DC_FIXTURES = (
    "mattermost-plugin-jira__webhook-server-issue-updated-commented-1.json",
    "mattermost-plugin-jira__webhook-server-issue-updated-comment-edited.json",
    "mattermost-plugin-jira__webhook-server-issue-updated-comment-deleted.json",
)
PEOPLE_COLUMNS = (
    "assignee_account_id",
    "assignee_display_name",
    "reporter_account_id",
    "reporter_display_name",
)


async def load_samples(pg: asyncpg.Connection) -> list[Envelope]:
    """Every real issue sample, applied by the consumer's apply step in batches of 10, as it runs."""
    envelopes = fixture_envelopes()
    for start in range(0, len(envelopes), 10):
        result = await apply_envelopes(pg, envelopes[start : start + 10])
        assert "invalid" not in result.counts()
    return envelopes


async def tables(pg: asyncpg.Connection) -> tuple[dict[int, dict[str, Any]], dict[str, dict[str, Any]]]:
    tasks = {r["issue_id"]: dict(r) for r in await pg.fetch("SELECT * FROM ap_jira_task")}
    events = {r["delivery_id"]: dict(r) for r in await pg.fetch("SELECT * FROM ap_jira_task_event")}
    return tasks, events


async def rows_mentioning(pg: asyncpg.Connection, text: str) -> tuple[list[str], list[str]]:
    """Issue keys and delivery ids of the rows whose whole text (every column, raw and changelog
    included) contains ``text``, case-insensitively."""
    tasks = await pg.fetch(
        "SELECT issue_key FROM ap_jira_task t WHERE strpos(lower(t::text), lower($1)) > 0 ORDER BY 1", text
    )
    events = await pg.fetch(
        "SELECT delivery_id FROM ap_jira_task_event e WHERE strpos(lower(e::text), lower($1)) > 0 ORDER BY 1",
        text,
    )
    return [r[0] for r in tasks], [r[0] for r in events]


def masked(value: Any, is_theirs: Callable[[dict[str, Any]], bool], marks: set[str]) -> Any:
    """``value`` with the person's user objects (``is_theirs`` before, "Former user" ones after) and
    the strings in ``marks`` (their name and ids, old and new) replaced by one marker: what is left
    must not differ at all."""
    if isinstance(value, dict):
        if is_theirs(value) or value.get("displayName") == FORMER_USER:
            return "<person>"
        return {k: masked(v, is_theirs, marks) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, is_theirs, marks) for v in value]
    return "<person>" if value in marks else value


def assert_only_the_person_changed(
    before: tuple[dict[Any, dict[str, Any]], ...],
    after: tuple[dict[Any, dict[str, Any]], ...],
    is_theirs: Callable[[dict[str, Any]], bool],
    marks: set[str],
) -> None:
    """Every row, every column and every part of raw and changelog is exactly as it was, but for the
    person: their user objects, their name and ids in people columns and changelog items, and the
    changed rows' ingested_at."""
    for old_rows, new_rows in zip(before, after, strict=True):
        assert new_rows.keys() == old_rows.keys()
        for key, old in old_rows.items():
            new = new_rows[key]
            changed = new != old
            old_masked = {k: masked(v, is_theirs, marks) for k, v in old.items() if k != "ingested_at"}
            new_masked = {k: masked(v, is_theirs, marks) for k, v in new.items() if k != "ingested_at"}
            assert new_masked == old_masked, key
            if not changed:
                assert new["ingested_at"] == old["ingested_at"]


def people_counts(tasks: dict[int, dict[str, Any]], column: str) -> Counter[Any]:
    return Counter(row[column] for row in tasks.values())


# -- Jira Cloud: --account-id --


async def test_a_cloud_user_is_forgotten_everywhere_and_nobody_else_is_touched(
    pg: asyncpg.Connection,
) -> None:
    # GIVEN every sample applied: Robin Diddams is in 4 issue rows and 7 history rows
    await load_samples(pg)
    before = await tables(pg)
    keys, deliveries = await rows_mentioning(pg, CLOUD_NAME)
    assert (keys, len(deliveries)) == (["GOLD-189", "PROD-1142", "TES-19", "TES-22"], 7)
    # WHEN the command forgets the account id, in batches of 2 (the function the command runs)
    with capture_logs() as logs:
        summary = await forget(pg, Person(account_id=CLOUD_ID), batch_size=2)
    # THEN it reports the rows it scrubbed per table
    assert summary.rows == {"ap_jira_task": 4, "ap_jira_task_event": 7}
    assert (summary.dry_run, summary.stopped) == (False, False)
    # AND the name is nowhere in either table, in any column, raw and changelog included
    assert await rows_mentioning(pg, CLOUD_NAME) == ([], [])
    after = await tables(pg)
    # AND everyone else's data, and every other column, is exactly as it was
    assert_only_the_person_changed(
        before, after, lambda u: u.get("accountId") == CLOUD_ID, {CLOUD_NAME, FORMER_USER}
    )
    tasks, events = after
    # AND the account id stays as the id, with Jira's "Former user" as the name
    gold = next(t for t in tasks.values() if t["issue_key"] == "GOLD-189")
    assert [gold[c] for c in PEOPLE_COLUMNS] == [CLOUD_ID, FORMER_USER, CLOUD_ID, FORMER_USER]
    scrubbed = {"accountId": CLOUD_ID, "accountType": "atlassian", "active": True, "displayName": FORMER_USER}
    for role in ("assignee", "reporter", "creator"):
        assert gold["raw"]["fields"][role] == scrubbed
    prod = next(t for t in tasks.values() if t["issue_key"] == "PROD-1142")
    assert [prod[c] for c in PEOPLE_COLUMNS] == [
        CLOUD_ID,
        FORMER_USER,
        "5de6d79e29c2b10cf4ee47ca",
        "Matthew Tibbit",
    ]
    # AND in the history: the actor, and the changelog item that assigned the issue to them
    theirs = [e for e in events.values() if e["actor_account_id"] == CLOUD_ID]
    assert len(theirs) == 7 and {e["actor_display_name"] for e in theirs} == {FORMER_USER}
    created = next(e for e in theirs if e["event_type"] == "jira:issue_created")
    assignee_item = next(i for i in created["changelog"] if i["field"] == "assignee")
    assert assignee_item == {
        "field": "assignee",
        "fieldtype": "jira",
        "fieldId": "assignee",
        "from": None,
        "fromString": None,
        "to": CLOUD_ID,
        "toString": FORMER_USER,
        "tmpFromAccountId": None,
        "tmpToAccountId": CLOUD_ID,
    }
    # AND the rows it changed were written again (ingested_at: incremental exports pick them up)
    changed = [k for k in tasks if tasks[k]["raw"] != before[0][k]["raw"]]
    assert all(tasks[k]["ingested_at"] > before[0][k]["ingested_at"] for k in changed) and len(changed) == 4
    # AND no log line names the person or their id
    assert logs and not any(CLOUD_ID in repr(line) or "Robin" in repr(line) for line in logs)
    # AND free text is not rewritten (documented): a stack trace pasted in one description holds the
    # person's login name, as a path
    assert await rows_mentioning(pg, "robindiddams") == (["TES-19"], [])


async def test_forgetting_again_changes_nothing(pg: asyncpg.Connection) -> None:
    # GIVEN Robin Diddams forgotten once
    await load_samples(pg)
    await forget(pg, Person(account_id=CLOUD_ID))
    before = await tables(pg)
    # WHEN the command runs again
    summary = await forget(pg, Person(account_id=CLOUD_ID), batch_size=3)
    # THEN it finds their rows (the account id is still there) but changes none of them
    assert summary.rows == {"ap_jira_task": 0, "ap_jira_task_event": 0}
    assert await tables(pg) == before
    assert render(summary) == (
        "scrubbed 0 row(s) of ap_jira_task and 0 row(s) of ap_jira_task_event in 5 batch(es) of up to 3; "
        "nothing left names this person's ids (already forgotten, or check the id; a Data Center user "
        "key: --key)"
    )


# -- Server/Data Center: --username --


async def test_a_data_center_user_gets_a_stable_pseudonym_and_their_email_and_avatar_go(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN every sample applied: Lev Brouk (levbrouk) is PRJX-14's assignee and the actor of 5 events
    await load_samples(pg)
    before = await tables(pg)
    keys, deliveries = await rows_mentioning(pg, DC_NAME)
    assert (keys, len(deliveries)) == (["PRJX-14"], 5)
    assert (await rows_mentioning(pg, DC_EMAIL))[0] == (await rows_mentioning(pg, DC_GRAVATAR))[0] == keys
    # WHEN the command forgets the username, typed in another case (Jira's usernames ignore case)
    summary = await forget_user.run(db_settings, Person(username="LevBrouk"), batch_size=2, dry_run=False)
    # THEN one issue row and five history rows were scrubbed
    assert summary.rows == {"ap_jira_task": 1, "ap_jira_task_event": 5}
    # AND the username, name, email and avatar hash are nowhere in either table
    for text in (DC_USERNAME, DC_NAME, DC_EMAIL, DC_GRAVATAR):
        assert await rows_mentioning(pg, text) == ([], []), text
    # AND the username became the keyed pseudonym, the same whatever the case it is given in
    key = await pg.fetchval("SELECT key FROM jiralake_pseudonym_key")
    pseudonym = pseudonym_for(DC_USERNAME, key)
    assert summary.pseudonym == pseudonym == pseudonym_for("LEVBROUK", key)
    assert render(summary).splitlines()[:2] == [
        "scrubbed 1 row(s) of ap_jira_task and 5 row(s) of ap_jira_task_event in 4 batch(es) of up to 2",
        f'The person now appears as "Former user", under the username {pseudonym}.',
    ]
    assert pseudonym.startswith("former-user-") and len(pseudonym) == len("former-user-") + 16
    after = await tables(pg)
    assert_only_the_person_changed(
        before,
        after,
        lambda u: u.get("name") == DC_USERNAME,
        {DC_NAME, DC_USERNAME, pseudonym, FORMER_USER},
    )
    tasks, events = after
    row = tasks[DC_ISSUE]
    assert [row[c] for c in PEOPLE_COLUMNS] == [pseudonym, FORMER_USER, "craig", "Craig Vitter"]
    assert row["raw"]["fields"]["assignee"] == {
        "name": pseudonym,
        "key": pseudonym,
        "displayName": FORMER_USER,
        "active": True,
    }
    # the comment authors inside raw too, and Craig's own comments left alone
    authors = [c["author"] for c in row["raw"]["fields"]["comment"]["comments"]]
    assert {a["displayName"] for a in authors} == {FORMER_USER, "Craig Vitter"}
    assert [
        (e["actor_account_id"], e["actor_display_name"])
        for e in events.values()
        if e["actor_display_name"] == FORMER_USER
    ] == [(pseudonym, FORMER_USER)] * 5
    # WHEN it runs again: nothing is left to change, and the pseudonym is the same
    again = await forget_user.run(db_settings, Person(username=DC_USERNAME), batch_size=2, dry_run=False)
    assert (again.rows, again.pseudonym) == ({"ap_jira_task": 0, "ap_jira_task_event": 0}, pseudonym)
    assert await tables(pg) == after


async def test_a_data_center_key_given_with_key_is_scrubbed_where_no_issue_shows_the_person(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN a history row on another person's issue that names a former assignee only by their Data
    # Center key (no current issue shows them, so the command cannot learn the key)
    changelog = [
        {"field": "assignee", "fieldtype": "jira", "from": "JIRAUSER10500", "fromString": "Robin Diddams"}
        | {"to": "craig", "toString": "Craig Vitter"}
    ]
    await pg.execute(
        "INSERT INTO ap_jira_task_event (delivery_id, issue_id, event_type, event_at, event_version, "
        "event_tiebreak, source, changelog, applied) "
        "VALUES ('e7', 77, 'jira:issue_updated', now(), 1, '', 'webhook', $1, true)",
        changelog,
    )
    # WHEN the person is forgotten by username alone, THEN nothing is found
    plain = await forget_user.run(db_settings, Person(username="rdiddams"), batch_size=500, dry_run=False)
    assert plain.rows == {"ap_jira_task": 0, "ap_jira_task_event": 0}
    # WHEN their key is given too
    person = person_from_arguments(None, "rdiddams", None, ["JIRAUSER10500"])
    summary = await forget_user.run(db_settings, person, batch_size=500, dry_run=False)
    # THEN the item names the pseudonym and "Former user"
    assert summary.rows == {"ap_jira_task": 0, "ap_jira_task_event": 1}
    [item] = await pg.fetchval("SELECT changelog FROM ap_jira_task_event WHERE delivery_id = 'e7'")
    assert (item["from"], item["fromString"]) == (summary.pseudonym, FORMER_USER)
    assert (item["to"], item["toString"]) == ("craig", "Craig Vitter")


async def test_a_key_learned_from_a_later_issue_is_scrubbed_from_the_issues_before_it(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN an issue (lower id, so searched first) whose raw changelog, as backfill --changelog stores
    # it, names a former assignee only by their Data Center key; and a later issue assigned to them,
    # whose user object is the only place that tells the key
    earlier = {
        "id": "1", "key": "A-1",
        "fields": {"assignee": {"name": "craig", "key": "craig", "displayName": "Craig Vitter"}},
        "changelog": {"histories": [{
            "author": {"name": "craig", "key": "craig", "displayName": "Craig Vitter"},
            "items": [{"field": "assignee", "fieldtype": "jira", "from": "JIRAUSER10500",
                       "fromString": "Lev Brouk", "to": "craig", "toString": "Craig Vitter"}],
        }]},
    }  # fmt: skip
    later = {
        "id": "2", "key": "A-2",
        "fields": {"assignee": {"name": "levbrouk", "key": "JIRAUSER10500", "displayName": "Lev Brouk",
                                "emailAddress": "lev@example.com"}},
    }  # fmt: skip
    rows: list[tuple[int, str, str, str, dict[str, Any]]] = [
        (1, "A-1", "craig", "Craig Vitter", earlier),
        (2, "A-2", "levbrouk", "Lev Brouk", later),
    ]
    await pg.executemany(
        "INSERT INTO ap_jira_task (issue_id, issue_key, assignee_account_id, assignee_display_name, raw) "
        "VALUES ($1, $2, $3, $4, $5)",
        rows,
    )
    # WHEN the person is counted, then forgotten, by username alone
    counted = await forget_user.run(db_settings, Person(username="levbrouk"), batch_size=1, dry_run=True)
    summary = await forget_user.run(db_settings, Person(username="levbrouk"), batch_size=1, dry_run=False)
    # THEN both issues were scrubbed, each counted once, and nothing names them any more
    assert counted.rows == summary.rows == {"ap_jira_task": 2, "ap_jira_task_event": 0}
    assert await rows_mentioning(pg, "Lev Brouk") == await rows_mentioning(pg, "JIRAUSER10500") == ([], [])
    [history] = await pg.fetchval(
        "SELECT raw -> 'changelog' -> 'histories' FROM ap_jira_task WHERE issue_id = 1"
    )
    assert history["items"] == [
        {"field": "assignee", "fieldtype": "jira", "from": summary.pseudonym, "fromString": FORMER_USER}
        | {"to": "craig", "toString": "Craig Vitter"}
    ]


async def test_a_username_that_is_a_renamed_user_s_key_leaves_that_user_s_changelog_alone(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN John, created as "jsmith" and renamed to "john.smith" (his key stays "jsmith"), and Jane,
    # who got the username "jsmith" later (key JIRAUSER10600). Changelog items name people by key:
    # John's in an issue searched first (its raw, as backfill --changelog stores it) and in the
    # history, Jane's in the history
    def user(name: str, key: str, shown: str) -> dict[str, Any]:
        return {"name": name, "key": key, "displayName": shown, "emailAddress": f"{key}@example.com"}

    def assigned(key: str, shown: str) -> list[dict[str, Any]]:
        return [{"field": "assignee", "fieldtype": "jira", "from": None, "fromString": None, "to": key}
                | {"toString": shown}]  # fmt: skip

    john, jane = user("john.smith", "jsmith", "John Smith"), user("jsmith", "JIRAUSER10600", "Jane Smith")
    johns_issue = {"id": "1", "key": "J-1", "fields": {"assignee": john},
                   "changelog": {"histories": [{"items": assigned("jsmith", "John Smith")}]}}  # fmt: skip
    await pg.executemany(
        "INSERT INTO ap_jira_task (issue_id, issue_key, assignee_account_id, assignee_display_name, raw) "
        "VALUES ($1, $2, $3, $4, $5)",
        [
            (1, "J-1", "john.smith", "John Smith", johns_issue),
            (2, "J-2", "jsmith", "Jane Smith", {"id": "2", "key": "J-2", "fields": {"assignee": jane}}),
        ],
    )
    await pg.executemany(
        "INSERT INTO ap_jira_task_event (delivery_id, issue_id, event_type, event_at, event_version, "
        "event_tiebreak, source, changelog, applied) "
        "VALUES ($1, $2, 'jira:issue_updated', now(), 1, '', 'webhook', $3, true)",
        [("john", 1, assigned("jsmith", "John Smith")), ("jane", 2, assigned("JIRAUSER10600", "Jane Smith"))],
    )
    # WHEN Jane is forgotten by her username
    summary = await forget_user.run(db_settings, Person(username="jsmith"), batch_size=1, dry_run=False)
    # THEN her issue and history row are scrubbed, and nothing of John's changed
    assert summary.rows == {"ap_jira_task": 1, "ap_jira_task_event": 1}
    assert await rows_mentioning(pg, "Jane Smith") == ([], [])
    assert await rows_mentioning(pg, "John Smith") == (["J-1"], ["john"])
    assert await pg.fetchval("SELECT raw FROM ap_jira_task WHERE issue_id = 1") == johns_issue
    history = await pg.fetch("SELECT delivery_id, changelog FROM ap_jira_task_event ORDER BY 1")
    assert {r["delivery_id"]: r["changelog"] for r in history} == {
        "jane": [{**assigned("JIRAUSER10600", "")[0], "to": summary.pseudonym, "toString": FORMER_USER}],
        "john": assigned("jsmith", "John Smith"),
    }


async def test_a_data_center_user_can_take_the_alias_jira_s_anonymization_gave_them(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN every sample applied, and Lev Brouk anonymized in Jira as jirauser80900
    await load_samples(pg)
    # WHEN the command is given that alias as the pseudonym
    summary = await forget_user.run(
        db_settings, Person(username=DC_USERNAME, pseudonym="jirauser80900"), batch_size=500, dry_run=False
    )
    # THEN the rows carry Jira's alias, as Jira's next events for the issue will; no key was needed
    assert (summary.rows, summary.pseudonym) == (
        {"ap_jira_task": 1, "ap_jira_task_event": 5},
        "jirauser80900",
    )
    row = await pg.fetchrow("SELECT * FROM ap_jira_task WHERE issue_id = $1", DC_ISSUE)
    assert (row["assignee_account_id"], row["assignee_display_name"]) == ("jirauser80900", FORMER_USER)
    assert row["raw"]["fields"]["assignee"]["name"] == "jirauser80900"
    assert await rows_mentioning(pg, DC_USERNAME) == ([], [])
    assert await pg.fetchval("SELECT count(*) FROM jiralake_pseudonym_key") == 0


async def test_analysts_still_count_issues_per_person(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN every sample applied, and the issues per assignee and reporter id
    await load_samples(pg)
    tasks, _ = await tables(pg)
    assignees, reporters = (
        people_counts(tasks, "assignee_account_id"),
        people_counts(tasks, "reporter_account_id"),
    )
    unassigned = people_counts(tasks, "assignee_display_name")[None]
    # WHEN both people are forgotten
    await forget_user.run(db_settings, Person(account_id=CLOUD_ID), batch_size=500, dry_run=False)
    dc = await forget_user.run(db_settings, Person(username=DC_USERNAME), batch_size=500, dry_run=False)
    # THEN the counts per id are the same: the Cloud id unchanged, the username under its pseudonym
    tasks, _ = await tables(pg)
    renamed = {DC_USERNAME: dc.pseudonym}
    assert people_counts(tasks, "assignee_account_id") == Counter(
        {renamed.get(k, k): n for k, n in assignees.items()}
    )
    assert people_counts(tasks, "reporter_account_id") == Counter(
        {renamed.get(k, k): n for k, n in reporters.items()}
    )
    assert assignees[CLOUD_ID] == 2 and reporters[CLOUD_ID] == 3 and assignees[DC_USERNAME] == 1
    # AND nobody's issues moved to "unassigned": a forgotten assignee is "Former user", not NULL
    assert people_counts(tasks, "assignee_display_name")[None] == unassigned
    assert people_counts(tasks, "assignee_display_name")[FORMER_USER] == 3


async def test_a_dry_run_counts_and_changes_nothing(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN every sample applied
    await load_samples(pg)
    before = await tables(pg)
    # WHEN both people are counted with --dry-run
    cloud = await forget_user.run(db_settings, Person(account_id=CLOUD_ID), batch_size=2, dry_run=True)
    dc = await forget_user.run(db_settings, Person(username=DC_USERNAME), batch_size=2, dry_run=True)
    # THEN it counts what a real run scrubs, and nothing changed, not even ingested_at, nor a key written
    assert (cloud.dry_run, cloud.rows) == (True, {"ap_jira_task": 4, "ap_jira_task_event": 7})
    assert (dc.dry_run, dc.rows, dc.pseudonym) == (True, {"ap_jira_task": 1, "ap_jira_task_event": 5}, None)
    assert await tables(pg) == before
    assert await pg.fetchval("SELECT count(*) FROM jiralake_pseudonym_key") == 0
    assert render(cloud) == (
        "dry run, nothing changed: would scrub 4 row(s) of ap_jira_task and 7 row(s) of ap_jira_task_event"
    )


def test_a_stopped_dry_run_says_its_counts_are_partial() -> None:
    summary = forget_user.ForgetSummary("account-id", dry_run=True, batch_size=5, batches=2, stopped=True)
    summary.rows = {"ap_jira_task": 10, "ap_jira_task_event": 0}
    summary.stop_signal = signal.SIGINT
    assert render(summary) == (
        "dry run, nothing changed; stopped by SIGINT before the end, so far it would scrub 10 row(s) of "
        "ap_jira_task and 0 row(s) of ap_jira_task_event"
    )


@pytest.mark.parametrize("person", [Person(account_id=CLOUD_ID), Person(username=DC_USERNAME)])
async def test_searching_one_small_window_of_rows_at_a_time_scrubs_the_same(
    pg: asyncpg.Connection, db_settings: DatabaseSettings, monkeypatch: pytest.MonkeyPatch, person: Person
) -> None:
    # GIVEN every sample applied, the outcome of a run whose searches each read the whole table
    await load_samples(pg)
    before = await tables(pg)
    whole = await forget_user.run(db_settings, copy.deepcopy(person), batch_size=500, dry_run=False)
    expected = await tables(pg)
    # WHEN the same run searches 2 rows at a time (each statement reads a bounded number of rows)
    await pg.execute("TRUNCATE ap_jira_task, ap_jira_task_event")
    await load_samples(pg)
    assert await tables(pg) != expected and len(before[0]) == len((await tables(pg))[0])
    monkeypatch.setattr(forget_user, "SCAN_WINDOW_ROWS", 2)
    windowed = await forget_user.run(db_settings, copy.deepcopy(person), batch_size=2, dry_run=False)
    # THEN it changed the same rows the same way (but ingested_at)
    assert windowed.rows == whole.rows
    unstamped = [
        {k: {c: v for c, v in r.items() if c != "ingested_at"} for k, r in t.items()} for t in expected
    ]
    got = [
        {k: {c: v for c, v in r.items() if c != "ingested_at"} for k, r in t.items()}
        for t in await tables(pg)
    ]
    assert got == unstamped


async def test_a_stop_request_ends_it_between_batches(pg: asyncpg.Connection) -> None:
    await load_samples(pg)
    before = await tables(pg)
    stop = asyncio.Event()
    stop.set()
    summary = await forget(pg, Person(account_id=CLOUD_ID), batch_size=2, stop=stop)
    assert (summary.stopped, summary.batches, summary.rows) == (
        True,
        0,
        {"ap_jira_task": 0, "ap_jira_task_event": 0},
    )
    assert await tables(pg) == before


# -- what the consumer does afterwards --


async def forgotten_dc_user(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> tuple[list[Envelope], str]:
    envelopes = await load_samples(pg)
    summary = await forget_user.run(db_settings, Person(username=DC_USERNAME), batch_size=500, dry_run=False)
    assert summary.pseudonym is not None
    return envelopes, summary.pseudonym


async def test_redelivered_events_bring_nothing_back(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN Lev Brouk forgotten after every sample was applied
    envelopes, _ = await forgotten_dc_user(pg, db_settings)
    after = await tables(pg)
    # WHEN every sample is delivered again (SQS redelivery, Jira retry, a replayed DLQ message)
    outcomes: Counter[str] = Counter()
    for start in range(0, len(envelopes), 10):
        outcomes += (await apply_envelopes(pg, envelopes[start : start + 10])).counts()
    # THEN each is a duplicate: the history rows stay scrubbed and no row changes, not even ingested_at
    assert outcomes == Counter({"duplicate": len(envelopes)})
    assert await tables(pg) == after
    assert await rows_mentioning(pg, DC_NAME) == ([], [])


@pytest.mark.parametrize("when", ["older than the row", "same version as the row"])
async def test_a_late_event_not_yet_recorded_comes_back_in_the_history_only_until_run_again(
    pg: asyncpg.Connection, db_settings: DatabaseSettings, when: str
) -> None:
    # GIVEN Lev Brouk forgotten; PRJX-14's row holds the newest of his events
    _, pseudonym = await forgotten_dc_user(pg, db_settings)
    version = await pg.fetchval("SELECT version FROM ap_jira_task WHERE issue_id = $1", DC_ISSUE)
    task_before = (await tables(pg))[0]
    # WHEN an event of his that was not recorded yet arrives (it sat in the DLQ): an older one, or the
    # newest one under a delivery id the history does not know
    if when == "older than the row":
        late = envelope_of(make_event(DC_FIXTURES[1], ts=version - 60_000))
    else:
        winner = next(n for n in DC_FIXTURES if jira_fixtures.load(n)["timestamp"] == version)
        late = envelope_of(jira_fixtures.raw(winner), delivery_id="replayed-under-another-id")
    result = await apply_envelopes(pg, [late])
    # THEN the row does not change (the version guard) ...
    assert result.results[0].outcome == "skipped_stale"
    assert (await tables(pg))[0] == task_before
    # ... but the history records the delivery with the name it carries: the documented residual
    assert await rows_mentioning(pg, DC_NAME) == ([], [late.delivery_id])
    # WHEN the command runs again, as the runbook says once the queue and the DLQ have drained
    again = await forget_user.run(db_settings, Person(username=DC_USERNAME), batch_size=500, dry_run=False)
    # THEN exactly that history row is scrubbed, under the same pseudonym
    assert (again.rows, again.pseudonym) == ({"ap_jira_task": 0, "ap_jira_task_event": 1}, pseudonym)
    assert await rows_mentioning(pg, DC_NAME) == ([], [])


async def test_a_newer_event_not_yet_applied_sets_the_row_until_run_again(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN Lev Brouk forgotten
    _, pseudonym = await forgotten_dc_user(pg, db_settings)
    version = await pg.fetchval("SELECT version FROM ap_jira_task WHERE issue_id = $1", DC_ISSUE)
    # WHEN an event newer than the row arrives (still in the queue when the command ran)
    newer = envelope_of(make_event(DC_FIXTURES[0], ts=version + 60_000))
    assert (await apply_envelopes(pg, [newer])).results[0].outcome == "applied"
    # THEN it sets the row with the old username and name (it is newer) and is recorded
    assert await rows_mentioning(pg, DC_NAME) == (["PRJX-14"], [newer.delivery_id])
    # WHEN the command runs again: both are scrubbed, the row under the same pseudonym
    again = await forget_user.run(db_settings, Person(username=DC_USERNAME), batch_size=500, dry_run=False)
    assert again.rows == {"ap_jira_task": 1, "ap_jira_task_event": 1}
    assert await rows_mentioning(pg, DC_NAME) == ([], [])
    row = await pg.fetchrow(
        "SELECT assignee_account_id, version FROM ap_jira_task WHERE issue_id = $1", DC_ISSUE
    )
    assert tuple(row) == (pseudonym, version + 60_000)


async def test_it_waits_for_a_consumer_batch_and_scrubs_what_that_batch_committed(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN every sample applied, and a consumer batch in flight on another connection: it applied a
    # newer event of Lev Brouk's to PRJX-14 and holds the row, not yet committed
    await load_samples(pg)
    version = await pg.fetchval("SELECT version FROM ap_jira_task WHERE issue_id = $1", DC_ISSUE)
    body = make_event(DC_FIXTURES[0], ts=version + 60_000)
    body["issue"]["fields"]["summary"] = "renamed by the newer event"
    newer = envelope_of(body)
    consumer = await db.connect(db_settings)
    try:
        batch = consumer.transaction()
        await batch.start()
        assert (await apply_envelopes(consumer, [newer])).results[0].outcome == "applied"
        # WHEN the command runs meanwhile
        command = asyncio.create_task(
            forget_user.run(db_settings, Person(username=DC_USERNAME), batch_size=500, dry_run=False)
        )
        await wait_for(lambda: waiting_on_lock(pg), what="forget-user waiting for the row")
        # THEN it waits for the row; once the batch commits, it scrubs what the batch wrote
        await batch.commit()
        summary = await asyncio.wait_for(command, timeout=30)
    finally:
        await consumer.close()
    assert summary.rows == {"ap_jira_task": 1, "ap_jira_task_event": 6}
    assert await rows_mentioning(pg, DC_NAME) == ([], [])
    # AND the consumer's write is kept, not lost under the scrub: the row is the newer event's
    row = await pg.fetchrow("SELECT * FROM ap_jira_task WHERE issue_id = $1", DC_ISSUE)
    assert (row["assignee_account_id"], row["version"]) == (summary.pseudonym, version + 60_000)
    assert row["summary"] == row["raw"]["fields"]["summary"] == "renamed by the newer event"


async def waiting_on_lock(conn: asyncpg.Connection) -> bool:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = $1 AND wait_event_type = 'Lock'",
        forget_user.APPLICATION_NAME,
    )
    return bool(count)


# -- matching by id, in the JSON, without a database --


def test_a_cloud_user_s_old_username_in_changelog_items_is_learned_from_their_user_object() -> None:
    # GIVEN a 2019 Cloud payload: the reporter object has accountId and the username "admin", and the
    # changelog item that set the reporter names them by that username only
    body = jira_fixtures.load("mattermost-plugin-jira__webhook-issue-created.json")
    person = Person(account_id="5c5f880629be9642ba529340")
    # WHEN the issue object, then the changelog, are scrubbed (ap_jira_task first, as the command does)
    person.learn_from(body["issue"])
    _, issue_changed = user_scrub.scrub_document(body["issue"], person)
    changelog, changelog_changed = user_scrub.scrub_document(body["changelog"]["items"], person)
    # THEN the item names them by their account id and "Former user"
    assert issue_changed and changelog_changed and person.learned == {"admin"}
    reporter = next(i for i in changelog if i["field"] == "reporter")
    assert (reporter["to"], reporter["toString"]) == ("5c5f880629be9642ba529340", FORMER_USER)
    assert body["issue"]["fields"]["reporter"] == {
        "accountId": "5c5f880629be9642ba529340",
        "active": True,
        "displayName": FORMER_USER,
    }


def test_a_data_center_key_unlike_the_username_is_matched_in_changelog_items() -> None:
    # GIVEN a Data Center user created on Jira 8+ (key JIRAUSER10100, username levbrouk), assigned by a
    # changelog item that carries the key, and a project whose name is the username
    body = copy.deepcopy(jira_fixtures.load(DC_FIXTURES[0]))
    body["issue"]["fields"]["assignee"]["key"] = "JIRAUSER10100"
    body["issue"]["fields"]["project"]["name"] = DC_USERNAME
    items = [
        {
            "field": "assignee",
            "fieldtype": "jira",
            "from": None,
            "fromString": None,
            "to": "JIRAUSER10100",
            "toString": DC_NAME,
        }
    ]
    person = Person(username=DC_USERNAME, pseudonym="former-user-0123456789abcdef")
    # WHEN the issue object, then the changelog, are scrubbed
    person.learn_from(body["issue"])
    user_scrub.scrub_document(body["issue"], person)
    user_scrub.scrub_document(items, person)
    # THEN the key was learned and replaced in the item; the project is no user object and stays
    assert person.learned == {"jirauser10100"}
    assert items[0]["to"] == "former-user-0123456789abcdef" and items[0]["toString"] == FORMER_USER
    assert body["issue"]["fields"]["assignee"]["key"] == "former-user-0123456789abcdef"
    assert body["issue"]["fields"]["project"]["name"] == DC_USERNAME


def test_a_numeric_username_leaves_status_sprint_and_select_items_alone() -> None:
    # GIVEN a Data Center user whose username is an employee number, 10001, assigned in one changelog
    # item; and items of other fields whose status or option ids are 10001 too (another person's issue
    # moving out of a status, a sprint, a custom select); and a custom user picker showing their name
    person = Person(username="10001", pseudonym="former-user-0123456789abcdef")
    person.learn_from({"assignee": {"name": "10001", "key": "10001", "displayName": "Robin Diddams"}})
    items: list[dict[str, Any]] = [
        {"field": "assignee", "fieldtype": "jira", "from": None, "fromString": None, "to": "10001"},
        {"field": "status", "fieldtype": "jira", "from": "10001", "fromString": "In Review", "to": "3"},
        {"field": "Sprint", "fieldtype": "custom", "from": "10001", "fromString": "Sprint 12", "to": "7"},
        {"field": "Reviewer", "fieldtype": "custom", "from": "10001", "fromString": "Robin Diddams"},
    ]
    items[0]["toString"], items[1]["toString"], items[2]["toString"] = "Robin Diddams", "Done", "Sprint 13"
    untouched = copy.deepcopy(items[1:3])
    # WHEN the history is scrubbed
    _, changed = user_scrub.scrub_document(items, person)
    # THEN the user fields name the pseudonym and "Former user" (the custom user picker known by the
    # person's display name), and the status and sprint items are as they were
    assert changed
    assert (items[0]["to"], items[0]["toString"]) == ("former-user-0123456789abcdef", FORMER_USER)
    assert (items[3]["from"], items[3]["fromString"]) == ("former-user-0123456789abcdef", FORMER_USER)
    assert items[1:3] == untouched


@pytest.mark.parametrize(
    ("person", "item"),
    [
        # a Data Center custom user picker naming the username, with no display name ever learned
        (
            Person(username="jsmith", pseudonym="former-user-0123456789abcdef"),
            {"field": "Reviewer", "fieldtype": "custom", "from": "jsmith", "fromString": "John Smith"},
        ),
        # the same naming a key given with --key
        (
            Person(username="jsmith", pseudonym="former-user-0123456789abcdef", learned={"jirauser10500"}),
            {"field": "Reviewer", "fieldtype": "custom", "from": "JIRAUSER10500", "fromString": "J. Smith"},
        ),
        # a Cloud custom user picker without Cloud's tmp keys
        (
            Person(account_id=CLOUD_ID),
            {"field": "Reviewer", "fieldtype": "custom", "from": CLOUD_ID, "fromString": "Mia Krystof"},
        ),
        # an assignee item with no fieldtype, and a renamed person's older name
        (
            Person(username="jsmith", pseudonym="former-user-0123456789abcdef"),
            {"field": "assignee", "from": "jsmith", "fromString": "Johnny Smith (old name)"},
        ),
    ],
    ids=["dc-picker", "dc-picker-by-key", "cloud-picker", "no-fieldtype"],
)
def test_a_user_field_naming_a_non_numeric_id_is_scrubbed_without_any_display_name(
    person: Person, item: dict[str, Any]
) -> None:
    # WHEN a history item names the person's (non-numeric) id, THEN it is scrubbed, whatever its field
    _, changed = user_scrub.scrub_document([item], person)
    assert changed and (item["from"], item["fromString"]) == (person.replacement, FORMER_USER)


def test_a_namesake_is_never_matched_by_display_name() -> None:
    body = copy.deepcopy(jira_fixtures.load("pinpoint-jira__jira_issue_created.json"))
    someone_else = {"accountId": "5aaaaaaaaaaaaaaaaaaaaaaa", "displayName": CLOUD_NAME, "active": True}
    body["issue"]["fields"]["customfield_10080"] = [someone_else]
    user_scrub.scrub_document(body, Person(account_id=CLOUD_ID))
    assert body["issue"]["fields"]["customfield_10080"] == [someone_else]
    assert body["issue"]["fields"]["assignee"]["displayName"] == FORMER_USER


# -- the real command line --


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jiralake", *args], capture_output=True, text=True, env=env, timeout=60
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DATABASE_URL", "JIRALAKE_"))}
    return {**env, **extra}


async def test_the_command_line_forgets_and_prints_the_counts(
    pg: asyncpg.Connection, database_url: str
) -> None:
    # GIVEN every sample applied
    await load_samples(pg)
    # WHEN the real command line forgets Robin Diddams in batches of 3
    result = await asyncio.to_thread(
        _run_cli,
        "--log-json",
        "forget-user",
        "--account-id",
        CLOUD_ID,
        "--batch-size",
        "3",
        env=_env(DATABASE_URL=database_url),
    )
    # THEN it exits 0 and says what it did and what to do next
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "scrubbed 4 row(s) of ap_jira_task and 7 row(s) of ap_jira_task_event in 5 batch(es) of up to 3",
        'The person now appears as "Former user", under the same account id.',
        "Next: a full export (jiralake export --once, per format you export) so that S3 latest/ no longer "
        "holds the old data; older history/ and changes/ files keep it (docs/runbook.md, Erasing a person).",
    ]
    assert await rows_mentioning(pg, CLOUD_NAME) == ([], [])
    # AND its log lines carry counts, never the person's id or name
    assert '"forget_user_finished"' in result.stderr
    assert CLOUD_ID not in result.stderr and "Robin" not in result.stderr


async def test_sigterm_stops_the_command_line_at_once_even_while_it_waits_for_a_lock(
    pg: asyncpg.Connection, database_url: str
) -> None:
    # GIVEN every sample applied, and another session holding every history row (a long transaction)
    await load_samples(pg)
    holder = await asyncpg.connect(database_url)
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.execute("SELECT 1 FROM ap_jira_task_event FOR UPDATE")
        # WHEN the command, in batches of 3, has scrubbed ap_jira_task and waits for its first history
        # batch, it gets SIGTERM, and the other session keeps the rows
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jiralake", "--log-json", "forget-user", "--account-id", CLOUD_ID,
            "--batch-size", "3", env=_env(DATABASE_URL=database_url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await wait_for(lambda: waiting_on_lock(pg), what="forget-user waiting for the history rows")
        child.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(child.communicate(), timeout=30)
        await hold.rollback()
    finally:
        await holder.close()
    # THEN it did not wait out the lock timeout (that ends in exit 1): the waiting batch was rolled back,
    # it said so and exited 143
    assert child.returncode == 143, err.decode()
    assert (
        out.decode()
        .splitlines()[0]
        .startswith(
            "scrubbed 4 row(s) of ap_jira_task and 0 row(s) of ap_jira_task_event in 2 batch(es) of up to 3"
        )
    )
    assert err.decode().splitlines()[-1] == (
        "jiralake: forget-user stopped by SIGTERM after 2 batch(es); what was scrubbed stays scrubbed; "
        "run the same command again to finish"
    )
    # AND what it scrubbed stays scrubbed: a dry run finds only the 7 history rows it did not reach
    left = await forget(pg, Person(account_id=CLOUD_ID), batch_size=3, dry_run=True)
    assert left.rows == {"ap_jira_task": 0, "ap_jira_task_event": 7}


def _spawn(*args: str, env: dict[str, str]) -> Any:
    return asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "--log-json", "forget-user", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.timeout(90)
async def test_sigterm_ends_it_within_seconds_when_postgresql_stops_answering_mid_batch(
    pg: asyncpg.Connection, database_url: str
) -> None:
    # GIVEN every sample applied, another session holding every history row, and the command reaching
    # PostgreSQL through a proxy, its first history batch waiting for those rows (in its transaction)
    await load_samples(pg)
    holder = await asyncpg.connect(database_url)
    proxy = await postgres_proxy(database_url)
    child: asyncio.subprocess.Process | None = None
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.execute("SELECT 1 FROM ap_jira_task_event FOR UPDATE")
        child = await _spawn(
            "--account-id", CLOUD_ID, "--batch-size", "3", env=_env(DATABASE_URL=through(proxy, database_url))
        )
        await wait_for(lambda: waiting_on_lock(pg), what="forget-user waiting for the history rows")
        # WHEN PostgreSQL stops answering (its packets dropped, nothing closed), and SIGTERM comes
        proxy.freeze()
        started = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(child.communicate(), timeout=db.CLOSE_TIMEOUT_S + 20)
        elapsed = time.monotonic() - started
    finally:
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()
        await proxy.close()  # the server sees the command's session end, and rolls back its batch
        await holder.close()
    # THEN it ended within seconds (the rollback PostgreSQL never confirms is given up after
    # db.CLOSE_TIMEOUT_S, and the connection closed from this side), and said it was stopped: 143
    assert elapsed < db.CLOSE_TIMEOUT_S + 5
    assert child.returncode == 143, err.decode()
    assert out.decode().startswith(
        "scrubbed 4 row(s) of ap_jira_task and 0 row(s) of ap_jira_task_event in 2 batch(es) of up to 3"
    )
    assert err.decode().splitlines()[-1] == (
        "jiralake: forget-user stopped by SIGTERM after 2 batch(es); what was scrubbed stays scrubbed; "
        "run the same command again to finish"
    )
    # AND the batch in progress changed nothing
    left = await forget(pg, Person(account_id=CLOUD_ID), batch_size=3, dry_run=True)
    assert left.rows == {"ap_jira_task": 0, "ap_jira_task_event": 7}


@pytest.mark.timeout(60)
async def test_a_statement_postgresql_does_not_answer_in_time_ends_it_in_one_line(
    pg: asyncpg.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN every sample applied, another session holding every history row, and the command reaching
    # PostgreSQL through a proxy (its statement bound lowered to 2 s for the test), its first history
    # batch waiting for those rows
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 2.0)
    await load_samples(pg)
    holder = await asyncpg.connect(database_url)
    proxy = await postgres_proxy(database_url)
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.execute("SELECT 1 FROM ap_jira_task_event FOR UPDATE")
        command = asyncio.create_task(
            forget_user.run(
                DatabaseSettings(url=through(proxy, database_url)),
                Person(account_id=CLOUD_ID),
                batch_size=3,
                dry_run=False,
            )
        )
        await wait_for(lambda: waiting_on_lock(pg), what="forget-user waiting for the history rows")
        # WHEN PostgreSQL stops answering (its packets dropped, nothing closed)
        proxy.freeze()
        started = time.monotonic()
        # THEN the command ends soon after the statement bound, in one line that says what to do
        with pytest.raises(CommandError) as failed:
            await asyncio.wait_for(command, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        await proxy.close()  # the server sees the command's session end, and rolls back its batch
        await holder.close()
    assert elapsed < 2.0 + 3
    assert failed.value.exit_code == 1
    assert str(failed.value) == (
        "PostgreSQL did not answer a statement within 2 s (a server or network that stopped answering); "
        "the batch in progress was not committed (each batch commits whole or not at all), the ones "
        "before it were; check the server, then run the same command again"
    )
    # AND nothing is half-done: the tasks were scrubbed, no history row was
    left = await forget(pg, Person(account_id=CLOUD_ID), batch_size=3, dry_run=True)
    assert left.rows == {"ap_jira_task": 0, "ap_jira_task_event": 7}


@pytest.mark.timeout(60)
async def test_a_commit_postgresql_does_not_answer_in_time_is_not_said_to_be_uncommitted(
    pg: asyncpg.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN every sample applied (4 task rows name Robin Diddams), and the command reaching PostgreSQL
    # through a proxy (its statement bound lowered to 2 s for the test) that, from the first batch's
    # COMMIT on, passes what the command sends and loses what the server answers
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 2.0)
    await load_samples(pg)
    before = await forget(pg, Person(account_id=CLOUD_ID), batch_size=3, dry_run=True)
    proxy = await postgres_proxy(database_url)
    commit = asyncpg.transaction.Transaction.commit

    async def commit_unanswered(transaction: asyncpg.transaction.Transaction) -> None:
        proxy.freeze_answers()
        await commit(transaction)

    monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", commit_unanswered)
    try:
        # WHEN it runs
        with pytest.raises(CommandError) as failed:
            await asyncio.wait_for(
                forget_user.run(
                    DatabaseSettings(url=through(proxy, database_url)),
                    Person(account_id=CLOUD_ID),
                    batch_size=3,
                    dry_run=False,
                ),
                timeout=30,
            )
    finally:
        monkeypatch.undo()
        await proxy.close()
    # THEN its one line says the batch may have been committed, not that it was not
    assert str(failed.value) == (
        "PostgreSQL did not answer the COMMIT of a transaction within 2 s (a server or network that "
        "stopped answering); the batch it was committing may have been committed or not (whole or not at "
        "all; either way running the command again is safe), the ones before it were; check the server, "
        "then run the same command again"
    )
    # AND it was committed (the server carried the COMMIT out; only its answer was lost)
    left = await forget(pg, Person(account_id=CLOUD_ID), batch_size=3, dry_run=True)
    assert before.rows["ap_jira_task"] == 4
    assert left.rows == {"ap_jira_task": 1, "ap_jira_task_event": before.rows["ap_jira_task_event"]}


async def test_a_deadlock_with_another_session_is_retried_and_the_batch_then_scrubbed(
    pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN every sample applied, and another session holding the last of Robin Diddams's history rows
    await load_samples(pg)
    keys = [
        r[0]
        for r in await pg.fetch(
            "SELECT delivery_id FROM ap_jira_task_event WHERE actor_account_id = $1 ORDER BY delivery_id",
            CLOUD_ID,
        )
    ]
    assert len(keys) >= 2
    lock_row = "SELECT 1 FROM ap_jira_task_event WHERE delivery_id = $1 FOR UPDATE"
    other = await db.connect(db_settings)
    try:
        await other.execute("SET deadlock_timeout = '60s'")  # forget-user's session finds the deadlock
        transaction = other.transaction()
        await transaction.start()
        await other.execute(lock_row, keys[-1])
        with capture_logs() as logs:
            command = asyncio.create_task(
                forget_user.run(db_settings, Person(account_id=CLOUD_ID), batch_size=500, dry_run=False)
            )
            # WHEN the command's history batch has locked the first row and waits for the last, and the
            # other session then asks for the first: a deadlock, which PostgreSQL ends by failing the
            # command's batch (40P01); the other session goes on and commits
            await wait_for(lambda: waiting_on_lock(pg), what="forget-user waiting for the last row")
            await other.execute(lock_row, keys[0])
            await transaction.commit()
            summary = await asyncio.wait_for(command, timeout=30)
    finally:
        await other.close()
    # THEN the batch ran again and scrubbed everything, as without the deadlock
    assert summary.rows == {"ap_jira_task": 4, "ap_jira_task_event": 7}
    assert await rows_mentioning(pg, CLOUD_NAME) == ([], [])
    retries = [e for e in logs if e["event"] == forget_user.LOG_RETRY]
    assert [(e["table"], e["sqlstate"], e["attempt"]) for e in retries] == [
        ("ap_jira_task_event", "40P01", 1)
    ]


async def test_a_batch_that_keeps_failing_on_serialization_failures_gives_up_in_one_line(
    pg: asyncpg.Connection, db_settings: DatabaseSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN every sample applied, and every update of a history row failing as a serialization failure
    monkeypatch.setattr(forget_user, "RETRY_BACKOFF_S", 0.01, raising=False)
    await load_samples(pg)
    await pg.execute(
        "CREATE FUNCTION forget_user_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN RAISE EXCEPTION 'could not serialize access' USING ERRCODE = 'serialization_failure'; END$$;"
        "CREATE TRIGGER forget_user_test_refuse BEFORE UPDATE ON ap_jira_task_event "
        "FOR EACH ROW EXECUTE FUNCTION forget_user_test_refuse()"
    )
    try:
        # WHEN the command runs
        with capture_logs() as logs, pytest.raises(CommandError) as failed:
            await forget_user.run(db_settings, Person(account_id=CLOUD_ID), batch_size=3, dry_run=False)
    finally:
        await pg.execute(
            "DROP TRIGGER forget_user_test_refuse ON ap_jira_task_event; "
            "DROP FUNCTION forget_user_test_refuse()"
        )
    # THEN it tried the batch 4 times, then gave up in one line: exit 1
    assert [e["attempt"] for e in logs if e["event"] == forget_user.LOG_RETRY] == [1, 2, 3]
    assert failed.value.exit_code == 1
    assert str(failed.value) == (
        "a batch of ap_jira_task_event failed 4 times in a row on a serialization failure with another "
        "session writing the same rows (SQLSTATE 40001); that batch was not changed, the ones before it "
        "were; run the same command again"
    )
    # AND the ones before it stay scrubbed; that one changed nothing
    left = await forget(pg, Person(account_id=CLOUD_ID), batch_size=3, dry_run=True)
    assert left.rows == {"ap_jira_task": 0, "ap_jira_task_event": 7}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            (),
            "jiralake: forget-user needs --account-id ID (Jira Cloud) or --username NAME "
            "(Server/Data Center)",
        ),
        (
            ("--account-id", CLOUD_ID, "--username", DC_USERNAME),
            "jiralake: forget-user takes one of --account-id (Jira Cloud) or --username "
            "(Server/Data Center), not both",
        ),
        (("--account-id", ""), "jiralake: --account-id must not be empty"),
        (
            ("--account-id", CLOUD_ID, "--pseudonym", "jirauser80900"),
            "jiralake: --pseudonym goes with --username only: a Cloud account id stays as it is",
        ),
        (
            ("--username", DC_USERNAME, "--pseudonym", "LevBrouk"),
            "jiralake: --pseudonym must differ from the username",
        ),
        (("--username", DC_USERNAME, "--pseudonym", ""), "jiralake: --pseudonym must not be empty"),
        (("--username", ""), "jiralake: --username must not be empty"),
        (("--username", "   "), "jiralake: --username must not be empty"),
        (
            ("--account-id", CLOUD_NAME),
            "jiralake: --account-id must be a Jira Cloud account id (letters, digits, ':', '_', '-'; at most "
            "128), such as 5b10ac8d82e05b22cc7d4ef5; for a Server/Data Center user use --username",
        ),
        (
            ("--account-id", CLOUD_ID + "\n"),
            "jiralake: --account-id must be a Jira Cloud account id (letters, digits, ':', '_', '-'; at most "
            "128), such as 5b10ac8d82e05b22cc7d4ef5; for a Server/Data Center user use --username",
        ),
        (
            ("--username", " levbrouk"),
            "jiralake: --username must be a Jira username: no leading or trailing spaces, no control "
            "characters, at most 255 characters",
        ),
    ],
)
def test_bad_input_is_refused_in_one_line(args: tuple[str, ...], line: str) -> None:
    # GIVEN no database configured at all: the refusal needs none
    result = _run_cli("forget-user", *args, env=_env())
    # THEN one line says why, exit 2, nothing on stdout
    assert (result.returncode, result.stderr.strip(), result.stdout) == (2, line, "")


def test_the_arguments_name_exactly_one_person() -> None:
    assert person_from_arguments(CLOUD_ID, None) == Person(account_id=CLOUD_ID)
    assert person_from_arguments(None, DC_USERNAME) == Person(username=DC_USERNAME)
    with pytest.raises(CommandError) as refused:
        person_from_arguments(None, None)
    assert refused.value.exit_code == 2
