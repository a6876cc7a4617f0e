"""The fault-injection test's workload and its expected outcome, computed without the consumer's code.

:func:`build_stream` derives a stream of webhook deliveries for a few hundred issues from the real
fixture bodies (tests/jira_fixtures.py): every issue is created, updated a few times, commented on,
linked; some are deleted, and some of those get an older update that arrives after the delete.
Timestamps are unique per issue, so "newest" never needs the tie-break. The send order is shuffled
(events of an issue arrive out of order), some deliveries are sent twice (a Jira redelivery: same
delivery id, same body), a few webhooks concern no issue (ignored), and a handful are signed bodies
the consumer can never apply (a NUL character in the summary: PostgreSQL refuses it), each on an issue
of its own, so each must end up in the DLQ.

:func:`expected_rows` is the independent model of ``ap_jira_task`` (docs/consumer.md, "Ordering"):
the field columns come from the newest field-carrying event with a full issue object, the deletion
from the newest delete, ``is_deleted`` is ``deleted_version >= version``, ``last_event_type`` is the
type of the newest of both. Rows are never removed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from tests import jira_fixtures

FULL_FIELDS = ("created", "status", "issuetype", "project")
FIELD_TYPES = frozenset({"jira:issue_created", "jira:issue_updated", "jira:issue_deleted"})
DELETE_TYPES = frozenset({"jira:issue_deleted"})

CREATED = (
    "mattermost-plugin-jira__webhook-issue-created.json",
    "pinpoint-jira__jira_issue_created.json",
    "zulip__issue_created_with_unicode.json",
    "mattermost-plugin-jira__webhook-cloud-issue-created-many-fields.json",
)
UPDATED = (
    "mattermost-plugin-jira__webhook-issue-updated-assigned.json",
    "mattermost-plugin-jira__webhook-issue-updated-resolved.json",
    "mattermost-plugin-jira__webhook-issue-updated-labels.json",
    "mattermost-plugin-jira__webhook-issue-updated-renamed.json",
    "mattermost-plugin-jira__webhook-server-issue-updated-closed.json",
    "pinpoint-jira__jira_issue_updated.description.json",
    "pinpoint-jira__jira_issue_updated.project.json",
    "pinpoint-jira__jira_issue_updated.due_date.unset.json",
    "jira-to-matrix__issue_updated_move-issue.json",
)
DELETED = ("mattermost-plugin-jira__webhook-issue-deleted.json", "pinpoint-jira__jira_issue_deleted.json")
# History only: slim issue objects (comments, attachment, trimmed update, scrubbed worklog), links.
HISTORY_ONLY = (
    "mattermost-plugin-jira__webhook-cloud-comment-created.json",
    "pinpoint-jira__comment_created.json",
    "mattermost-plugin-jira__webhook-cloud-comment-updated.json",
    "mattermost-plugin-jira__webhook-issue-assigned-empty-changelog.json",
    "zulip__worklog_updated__edited.json",
    "pinpoint-jira__issuelink_created.json",
)
IGNORED = ("pinpoint-jira__sprint_started.json", "pinpoint-jira__board_updated.json")

FIRST_ISSUE_ID = 7_100_000
FIRST_BAD_ISSUE_ID = 7_900_000
FIRST_TS_MS = 1_700_000_000_000


@dataclass(frozen=True)
class Delivery:
    delivery_id: str
    body: bytes
    # "row" (may touch the row), "history" (history only), "ignored" (no issue), "bad" (for the DLQ).
    role: str
    issue_id: int | None = None
    ts_ms: int = 0
    event_type: str = ""
    # For field-carrying events with a full issue object: the summary that identifies the event.
    summary: str | None = None
    deletes: bool = False


@dataclass(frozen=True)
class Stream:
    deliveries: list[Delivery]  # distinct deliveries
    send_order: list[Delivery]  # what the load generator sends, redeliveries included

    def of_role(self, role: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.role == role]


@dataclass(frozen=True)
class ExpectedRow:
    version: int | None
    summary: str | None
    deleted_version: int | None
    is_deleted: bool
    last_event_type: str


def build_stream(*, issues: int, events_per_issue: int, bad: int, seed: int) -> Stream:
    rng = random.Random(seed)
    per_issue: list[list[Delivery]] = []
    for n in range(issues):
        per_issue.append(_issue_events(rng, n, events_per_issue))
    deliveries = [d for events in per_issue for d in events]
    deliveries += [_ignored(rng, n) for n in range(max(2, issues // 50))]
    deliveries += [_bad(n) for n in range(bad)]
    for d in deliveries:  # the generator's own contract: no two events of an issue share a time
        assert d.role not in ("row", "history") or isinstance(d.issue_id, int)
    times = [(d.issue_id, d.ts_ms) for d in deliveries if d.role in ("row", "history")]
    assert len(times) == len(set(times)), "timestamps must be unique per issue"
    return Stream(deliveries, _send_order(rng, per_issue, deliveries))


def _issue_events(rng: random.Random, n: int, events_per_issue: int) -> list[Delivery]:
    issue_id = FIRST_ISSUE_ID + n
    key = f"FLT-{n + 1}"
    ts = FIRST_TS_MS + n * 10_000_000
    events = [_event(CREATED[n % len(CREATED)], issue_id, key, ts, f"{key} created")]
    count = max(2, events_per_issue + rng.randint(-2, 2))
    for k in range(1, count):
        ts += rng.randint(1, 60_000)
        if rng.random() < 0.3:
            events.append(_event(rng.choice(HISTORY_ONLY), issue_id, key, ts, None))
        else:
            events.append(_event(rng.choice(UPDATED), issue_id, key, ts, f"{key} update {k}"))
    roll = rng.random()
    if roll < 0.15:
        stale_ts = ts + 1
        ts += rng.randint(2, 60_000)
        events.append(_event(rng.choice(DELETED), issue_id, key, ts, f"{key} deleted"))
        if roll < 0.08:  # an update older than the delete, sent after it: must not resurrect the row
            events.append(_event(rng.choice(UPDATED), issue_id, key, stale_ts, f"{key} stale update"))
    return events


def _event(name: str, issue_id: int, key: str, ts: int, summary: str | None) -> Delivery:
    body = jira_fixtures.make_event(name, issue_id=issue_id, ts=ts)
    event_type = str(body["webhookEvent"])
    issue = body.get("issue")
    full = _is_full(issue)
    if isinstance(issue, dict) and full:
        issue["key"] = key
        issue["fields"]["summary"] = summary
    row = event_type in FIELD_TYPES and full
    deletes = event_type in DELETE_TYPES
    return Delivery(
        delivery_id=f"flt-{issue_id}-{ts}",
        body=json.dumps(body, ensure_ascii=False).encode("utf-8"),
        role="row" if row or deletes else "history",
        issue_id=issue_id,
        ts_ms=ts,
        event_type=event_type,
        summary=summary if row else None,
        deletes=deletes,
    )


def _ignored(rng: random.Random, n: int) -> Delivery:
    body = jira_fixtures.make_event(rng.choice(IGNORED), ts=FIRST_TS_MS + n)
    return Delivery(f"flt-ignored-{n}", json.dumps(body).encode("utf-8"), "ignored")


def _bad(n: int) -> Delivery:
    """Signed and well-formed JSON, accepted by the receiver, but PostgreSQL refuses a NUL in text."""
    issue_id = FIRST_BAD_ISSUE_ID + n
    body = jira_fixtures.make_event(CREATED[0], issue_id=issue_id, ts=FIRST_TS_MS + n)
    body["issue"]["fields"]["summary"] = f"bad\u0000summary {n}"
    return Delivery(
        f"flt-bad-{n}",
        json.dumps(body).encode("utf-8"),
        "bad",
        issue_id=issue_id,
        ts_ms=FIRST_TS_MS + n,
        event_type="jira:issue_created",
    )


def _send_order(rng: random.Random, per_issue: list[list[Delivery]], all_: list[Delivery]) -> list[Delivery]:
    """Issues interleaved at random; within an issue mostly in time order, but a third of the events are
    pushed later by up to 200 places (out of order), and 8% are delivered a second time later on."""
    # Each issue's events keep their order; issues interleave at random (a random merge).
    slots = [n for n, events in enumerate(per_issue) for _ in events]
    rng.shuffle(slots)
    cursors = [0] * len(per_issue)
    merged: list[Delivery] = []
    for n in slots:
        merged.append(per_issue[n][cursors[n]])
        cursors[n] += 1
    extra = [d for d in all_ if d.role in ("ignored", "bad")]
    keyed = [(float(i), d) for i, d in enumerate(merged)]
    keyed += [(rng.uniform(0, len(merged)), d) for d in extra]
    late = []
    for position, d in keyed:
        if rng.random() < 0.33:
            position += rng.randint(1, 200) + 0.5
        late.append((position, d))
    dupes = [(rng.uniform(p, len(merged) + 1), d) for p, d in late if rng.random() < 0.08]
    return [d for _, d in sorted(late + dupes, key=lambda pd: pd[0])]


def _is_full(issue: Any) -> bool:
    if not isinstance(issue, dict) or not isinstance(issue.get("key"), str):
        return False
    fields = issue.get("fields")
    return isinstance(fields, dict) and all(fields.get(f) is not None for f in FULL_FIELDS)


def expected_rows(stream: Stream) -> dict[int, ExpectedRow]:
    """The final ``ap_jira_task`` by the ordering rule, from the distinct deliveries alone."""
    by_issue: dict[int, list[Delivery]] = {}
    for d in stream.of_role("row"):
        assert d.issue_id is not None
        by_issue.setdefault(d.issue_id, []).append(d)
    rows = {}
    for issue_id, events in by_issue.items():
        fields = max((e for e in events if e.summary is not None), key=lambda e: e.ts_ms, default=None)
        delete = max((e for e in events if e.deletes), key=lambda e: e.ts_ms, default=None)
        version = fields.ts_ms if fields else None
        deleted_version = delete.ts_ms if delete else None
        last = max(events, key=lambda e: e.ts_ms)
        rows[issue_id] = ExpectedRow(
            version=version,
            summary=fields.summary if fields else None,
            deleted_version=deleted_version,
            is_deleted=deleted_version is not None and (version is None or deleted_version >= version),
            last_event_type=last.event_type,
        )
    return rows


def expected_history(stream: Stream) -> dict[str, tuple[int, int]]:
    """Every distinct delivery about an issue that the consumer can apply: delivery id -> (issue, version)."""
    return {
        d.delivery_id: (d.issue_id, d.ts_ms)
        for d in stream.deliveries
        if d.role in ("row", "history") and d.issue_id is not None
    }
