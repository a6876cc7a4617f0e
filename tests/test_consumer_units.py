"""The consumer's pure parts: issue objects -> columns, parsing and validating envelopes, ordering,
error classification, backoff, the circuit breaker, settings and dead-letter entries."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import pytest
from botocore.exceptions import (
    ClientError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
)

from consumer.breaker import CircuitBreaker
from consumer.deadletter import Rejected, dead_letter_entry
from consumer.event import decode_json, parse_envelope
from consumer.issue_row import is_full, issue_number, issue_row
from consumer.ordering import NO_CHANGELOG_ID, tiebreak_for, version_time
from consumer.outcomes import InvalidMessage, Outcome, ServerReadOnly, classify
from consumer.settings import ConsumerSettings
from consumer.visibility import retry_delay_s
from shared import strict_json
from shared.envelope import (
    ATTR_EVENT_TS,
    ATTR_RECEIVED_AT,
    ATTR_RETRY_COUNT,
    Envelope,
    InvalidEnvelope,
    body_sha256,
)
from shared.jira_event import InvalidEvent
from shared.metrics import CONSUMER_CIRCUIT_OPEN
from shared.settings import ConfigError, QueueSettings
from tests import jira_fixtures
from tests.test_consumer_helpers import envelope_of


def test_cloud_issue_object_becomes_columns() -> None:
    # GIVEN a Cloud issue_created webhook (accountId users, -0800 offsets)
    issue = jira_fixtures.load("mattermost-plugin-jira__webhook-issue-created.json")["issue"]
    # WHEN it is turned into columns
    row = issue_row(issue)
    # THEN every column has the value Jira sent, times in UTC
    assert (row.issue_key, row.project_key, row.project_id, row.project_name, row.issue_number) == (
        "TES-41",
        "TES",
        10000,
        "test1",
        41,
    )
    assert (row.summary, row.status, row.status_category, row.issue_type, row.priority) == (
        "Unit test summary",
        "To Do",
        "new",
        "Story",
        "High",
    )
    assert row.reporter_account_id == "5c5f880629be9642ba529340"
    assert row.reporter_display_name == "Test User"
    assert row.created_at == datetime(2019, 2, 16, 3, 1, 52, 971000, tzinfo=UTC)
    assert row.raw is issue


def test_server_issue_object_uses_usernames() -> None:
    issue = jira_fixtures.load("mattermost-plugin-jira__webhook-server-issue-updated-many-fields.json")[
        "issue"
    ]
    row = issue_row(issue)
    assert (row.assignee_account_id, row.assignee_display_name) == ("mickmister", "user@example.com")
    assert row.labels == ['"oh', "dc", "ee", "h", 'yeah"']
    assert row.updated_at == datetime(2019, 9, 3, 6, 3, 39, 155000, tzinfo=UTC)


def test_resolution_due_date_and_parent() -> None:
    resolved = issue_row(jira_fixtures.load("pinpoint-jira__jira_issue_updated.resolution.json")["issue"])
    assert (resolved.resolution, resolved.status_category) == ("Won't Do", "done")
    assert resolved.resolved_at is not None
    issue = jira_fixtures.load("pinpoint-jira__jira_issue_created.json")["issue"]
    issue["fields"].update(duedate="2020-08-04", parent={"id": "1", "key": "GOLD-1"})
    row = issue_row(issue)
    assert (row.due_date, row.parent_key) == (date(2020, 8, 4), "GOLD-1")


def test_unexpected_field_shapes_become_null() -> None:
    row = issue_row(
        {"key": "A-1", "fields": {"status": "Open", "labels": "x", "created": "yesterday", "project": []}}
    )
    assert (row.status, row.labels, row.created_at, row.project_key, row.project_id) == (
        None,
        None,
        None,
        "A",
        None,
    )


def test_issue_number_is_the_number_in_the_key() -> None:
    assert issue_number("MAG-21513") == 21513
    assert issue_number("A_B2-7") == 7
    assert issue_number("MAG21513") is None
    assert issue_number("MAG-1234567890") is None  # would not fit an integer column


@pytest.mark.parametrize(
    ("name", "full"),
    [
        ("mattermost-plugin-jira__webhook-issue-created.json", True),
        ("mattermost-plugin-jira__webhook-issue-deleted.json", True),
        ("mattermost-plugin-jira__webhook-cloud-comment-created.json", False),
        ("mattermost-plugin-jira__webhook-issue-assigned-empty-changelog.json", False),
        ("zulip__worklog_updated__edited.json", False),
        ("zulip__attachment_created.json", False),
    ],
)
def test_only_full_issue_objects_may_set_fields(name: str, full: bool) -> None:
    assert is_full(jira_fixtures.load(name).get("issue")) is full


def test_tiebreak_is_padded_changelog_id_and_body_hash() -> None:
    assert tiebreak_for("10233", "{}") == f"00000000000000010233:{body_sha256('{}')}"
    assert tiebreak_for(10124, "{}") == f"00000000000000010124:{body_sha256('{}')}"
    assert tiebreak_for(None, "x").startswith(NO_CHANGELOG_ID + ":")
    assert tiebreak_for("abc", "x").startswith(NO_CHANGELOG_ID + ":")
    # Byte-wise order of the text is numeric order of the changelog ids.
    assert tiebreak_for("9", "{}") < tiebreak_for("10", "{}")


def test_version_time_is_exact_to_the_millisecond() -> None:
    assert version_time(1550286113023) == datetime(2019, 2, 16, 3, 1, 53, 23000, tzinfo=UTC)


@pytest.mark.parametrize("name", jira_fixtures.names())
def test_decode_json_reads_every_fixture_as_the_standard_library_does(name: str) -> None:
    text = jira_fixtures.raw(name).decode("utf-8")
    assert decode_json(text) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"summary": "lone \\ud800 surrogate"}',  # orjson refuses it; the standard parser takes it
        "[" * 500 + "]" * 500,
        '{"a": "NUL \\u0000 inside"}',
        '{"n": 1.10, "i": 9223372036854775807}',
    ],
)
def test_decode_json_accepts_what_the_standard_library_accepts(text: str) -> None:
    assert decode_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ["[NaN]", '{"a": Infinity}', "{", "", '{"a": 1} trailing'])
def test_decode_json_rejects_what_is_not_json(text: str) -> None:
    with pytest.raises(ValueError):
        decode_json(text)


def test_decode_json_refuses_nesting_too_deep_for_either_parser() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_json("[" * 100_000 + "]" * 100_000)


def test_strict_json_reads_bytes_as_json_loads_does_but_no_nan() -> None:
    assert strict_json.loads('{"a": "é"}'.encode("utf-16")) == {"a": "é"}
    assert strict_json.loads(b"[123456789012345678901234567890]") == [123456789012345678901234567890]
    with pytest.raises(ValueError, match="NaN is not a JSON value"):
        strict_json.loads(b"[NaN]")
    with pytest.raises(ValueError, match="nested too deeply"):
        strict_json.loads(b"[" * 100_000)


def test_parse_envelope_classifies_events() -> None:
    created = parse_envelope(
        envelope_of(jira_fixtures.raw("mattermost-plugin-jira__webhook-issue-created.json"))
    )
    assert (created.issue_id, created.version, created.source, created.deletes) == (
        10040,
        1550286113023,
        "webhook",
        False,
    )
    assert created.row is not None and created.changelog is not None
    assert (created.actor_account_id, created.actor_display_name) == ("5c5f880629be9642ba529340", "Test User")
    deleted = parse_envelope(
        envelope_of(jira_fixtures.raw("mattermost-plugin-jira__webhook-issue-deleted.json"))
    )
    assert deleted.deletes and deleted.row is not None
    comment = parse_envelope(
        envelope_of(jira_fixtures.raw("mattermost-plugin-jira__webhook-cloud-comment-created.json"))
    )
    assert not comment.touches_row
    assert comment.actor_display_name is not None  # the comment's author: Cloud comment events have no user
    slim = parse_envelope(
        envelope_of(jira_fixtures.raw("mattermost-plugin-jira__webhook-issue-assigned-empty-changelog.json"))
    )
    assert not slim.touches_row


def test_snapshot_and_reconciled_delete_sources() -> None:
    issue = jira_fixtures.load("mattermost-plugin-jira__webhook-issue-created.json")["issue"]
    snap = parse_envelope(
        envelope_of({"webhookEvent": "jiralake:issue_snapshot", "timestamp": 1, "issue": issue})
    )
    assert (snap.source, snap.row is not None, snap.deletes) == ("backfill", True, False)
    gone = parse_envelope(
        envelope_of({"webhookEvent": "jiralake:issue_deleted", "timestamp": 2, "issue": {"id": "5"}})
    )
    assert (gone.source, gone.row, gone.deletes) == ("reconcile", None, True)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"body": "not json"}, "body is not valid JSON"),
        ({"body": '{"webhookEvent": "jira:issue_updated", "timestamp": NaN}'}, "NaN is not a JSON value"),
        ({"body": "[" * 5000 + "]" * 5000}, "body is not valid JSON"),
        ({"issue_id": "999"}, "body concerns issue 10040, attributes say 999"),
        ({"event_type": "jira:issue_deleted"}, "attributes say 'jira:issue_deleted'"),
        ({"issue_id": "x1"}, "is not a Jira issue id"),
        ({"issue_id": "99999999999999999999"}, "is not a Jira issue id"),
        ({"event_ts_ms": 0}, "is not a time in ms"),
        ({"event_ts_ms": 253_402_300_799_999}, "body's time is [0-9]+ ms .*, attributes say 253402300799999"),
        ({"body": '{"webhookEvent": "sprint_started", "sprint": {}}'}, "concerns no issue"),
    ],
)
def test_envelopes_that_can_never_apply_are_invalid(change: dict[str, Any], reason: str) -> None:
    envelope = replace(
        envelope_of(jira_fixtures.raw("mattermost-plugin-jira__webhook-issue-created.json")), **change
    )
    with pytest.raises(InvalidMessage, match=reason):
        parse_envelope(envelope)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        (ATTR_RETRY_COUNT, "abc", "attribute retry_count is not an integer: 'abc'"),
        (ATTR_RECEIVED_AT, "1.5", "attribute received_at_ms is not an integer: '1.5'"),
        (ATTR_EVENT_TS, None, "missing attribute event_ts_ms"),
    ],
)
def test_an_ill_typed_attribute_is_named(name: str, value: str | None, reason: str) -> None:
    # GIVEN a message whose attribute is missing or not the integer it must be
    envelope = envelope_of(jira_fixtures.raw("mattermost-plugin-jira__webhook-issue-created.json"))
    attributes: dict[str, Any] = envelope.attributes()
    if value is None:
        del attributes[name]
    else:
        attributes[name] = {"DataType": "Number", "StringValue": value}
    # WHEN read THEN the reason names the attribute
    with pytest.raises(InvalidEnvelope) as refused:
        Envelope.from_message({"Body": envelope.body, "MessageAttributes": attributes})
    assert str(refused.value) == f"message is not a jiralake envelope: {reason}"


def test_an_unroutable_body_is_invalid() -> None:
    envelope = replace(
        envelope_of(jira_fixtures.raw("mattermost-plugin-jira__webhook-issue-created.json")),
        body=json.dumps({"webhookEvent": "jira:issue_updated", "issue": {"key": "A-1"}}),
    )
    with pytest.raises(InvalidEvent, match="carries no issue id"):
        parse_envelope(envelope)


def _client_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "Op")


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (InvalidMessage("x"), Outcome.INVALID),
        (asyncpg.CharacterNotInRepertoireError("invalid byte sequence"), Outcome.INVALID),
        (asyncpg.UntranslatableCharacterError("\\u0000"), Outcome.INVALID),
        (asyncpg.NumericValueOutOfRangeError("out of range"), Outcome.INVALID),
        (asyncpg.ConnectionDoesNotExistError("closed"), Outcome.RETRY),
        (asyncpg.DeadlockDetectedError("deadlock"), Outcome.RETRY),
        (asyncpg.SerializationError("serialization"), Outcome.RETRY),
        (asyncpg.AdminShutdownError("terminating"), Outcome.RETRY),
        (asyncpg.QueryCanceledError("statement timeout"), Outcome.RETRY),
        (asyncpg.TooManyConnectionsError("too many"), Outcome.RETRY),
        (asyncpg.ReadOnlySQLTransactionError("read-only transaction"), Outcome.RETRY),
        (ServerReadOnly("read-only"), Outcome.RETRY),
        (asyncpg.InterfaceError("connection is closed"), Outcome.RETRY),
        (ConnectionRefusedError(111, "refused"), Outcome.RETRY),
        (TimeoutError(), Outcome.RETRY),
        (EndpointConnectionError(endpoint_url="http://x"), Outcome.RETRY),
        (CredentialRetrievalError(provider="container-role", error_msg="timed out"), Outcome.RETRY),
        (NoCredentialsError(), Outcome.CRASH),
        (_client_error("ThrottlingException", 400), Outcome.RETRY),
        (_client_error("InternalError", 500), Outcome.RETRY),
        (_client_error("AccessDenied", 403), Outcome.CRASH),
        (asyncpg.UndefinedTableError("relation does not exist"), Outcome.CRASH),
        (asyncpg.InterfaceError("another operation is in progress"), Outcome.CRASH),
        (KeyError("bug"), Outcome.CRASH),
    ],
)
def test_every_failure_has_one_outcome(exc: BaseException, outcome: Outcome) -> None:
    assert classify(exc) is outcome


def test_retry_delay_doubles_per_receive_up_to_the_cap() -> None:
    assert [retry_delay_s(n, base_s=5, max_s=60) for n in (1, 2, 3, 4, 5, 100)] == [5, 10, 20, 40, 60, 60]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_when_most_recent_events_are_dead_lettered_and_closes_after_cooldown() -> None:
    # GIVEN a breaker over the last 4 events, at least 4, ratio 0.5, cooldown 30 s
    clock = FakeClock()
    breaker = CircuitBreaker(window=4, min_events=4, max_ratio=0.5, cooldown_s=30, clock=clock)
    # WHEN half are dead-lettered THEN it stays closed (not "most")
    breaker.record([True, False, True, False])
    assert (breaker.remaining_s(), CONSUMER_CIRCUIT_OPEN._value.get()) == (0, 0)
    # WHEN three of the last four are dead-lettered THEN it opens
    breaker.record([True, True])
    assert breaker.remaining_s() > 0 and CONSUMER_CIRCUIT_OPEN._value.get() == 1
    assert breaker.remaining_s() == 30
    # WHEN the cooldown passes THEN it closes with an empty window
    clock.now += 30
    assert (breaker.remaining_s(), CONSUMER_CIRCUIT_OPEN._value.get()) == (0, 0)
    breaker.record([True, True, True])
    assert breaker.remaining_s() == 0  # fewer than min_events since it closed


def test_settings_from_env_and_validation() -> None:
    env = {
        "JIRALAKE_QUEUE_URL": "http://q/1/a.fifo",
        "JIRALAKE_DLQ_URL": "http://q/1/a-dlq.fifo",
        "JIRALAKE_CONSUMER_POLLERS": "4",
        "JIRALAKE_CONSUMER_WAIT_S": "5",
        "JIRALAKE_CONSUMER_ADMIN_PORT": "0",
        "JIRALAKE_CONSUMER_BREAKER_RATIO": "0.9",
    }
    settings = ConsumerSettings.from_env(env)
    assert (settings.pollers, settings.wait_time_s, settings.admin_port) == (4, 5, None)
    assert settings.breaker_max_dead_letter_ratio == 0.9
    with pytest.raises(ConfigError, match=r"JIRALAKE_CONSUMER_WAIT_S\) must be between 0 and 20, got 21"):
        ConsumerSettings.from_env({**env, "JIRALAKE_CONSUMER_WAIT_S": "21"})
    with pytest.raises(ConfigError, match="JIRALAKE_CONSUMER_POLLERS must be >= 1"):
        ConsumerSettings.from_env({**env, "JIRALAKE_CONSUMER_POLLERS": "0"})
    with pytest.raises(ConfigError, match=r"JIRALAKE_CONSUMER_POLLERS\) must be between 1 and 32, got 33"):
        ConsumerSettings.from_env({**env, "JIRALAKE_CONSUMER_POLLERS": "33"})
    assert ConsumerSettings.from_env({**env, "JIRALAKE_CONSUMER_POLLERS": "32"}).pollers == 32
    # A backoff past SQS's 12-hour visibility limit would be refused by SQS at every retry (the batch
    # then comes back at once); a breaker ratio over 1 could never be exceeded (the breaker never opens)
    assert ConsumerSettings.from_env({**env, "JIRALAKE_CONSUMER_RETRY_MAX_S": "43200"}).retry_max_s == 43200
    with pytest.raises(ConfigError, match="JIRALAKE_CONSUMER_RETRY_MAX_S <= 43200"):
        ConsumerSettings.from_env({**env, "JIRALAKE_CONSUMER_RETRY_MAX_S": "43201"})
    assert (
        ConsumerSettings.from_env(
            {**env, "JIRALAKE_CONSUMER_BREAKER_RATIO": "1"}
        ).breaker_max_dead_letter_ratio
        == 1
    )
    with pytest.raises(ConfigError, match=r"JIRALAKE_CONSUMER_BREAKER_RATIO must be in \(0, 1\]"):
        ConsumerSettings.from_env({**env, "JIRALAKE_CONSUMER_BREAKER_RATIO": "1.5"})
    # A DLQ that is the main queue would hand every dead-lettered message back, forever.
    with pytest.raises(ConfigError, match="JIRALAKE_QUEUE_URL and JIRALAKE_DLQ_URL name the same queue"):
        ConsumerSettings.from_env({**env, "JIRALAKE_DLQ_URL": env["JIRALAKE_QUEUE_URL"]})
    # ... also when the two URLs spell the endpoint differently
    for main, dead in [
        ("http://127.0.0.1:4566/1/q.fifo", "http://localhost:4566/1/q.fifo"),
        ("https://sqs.us-east-1.amazonaws.com/1/q.fifo", "https://queue.amazonaws.com/1/q.fifo/"),
    ]:
        with pytest.raises(ConfigError, match="name the same queue"):
            QueueSettings(queue_url=main, dlq_url=dead)
    assert QueueSettings(queue_url="http://h/1/q.fifo", dlq_url="http://h/1/q-dlq.fifo").dlq_url.endswith(
        "dlq.fifo"
    )


def test_dead_letter_entry_keeps_the_envelope_and_adds_the_reason() -> None:
    envelope = envelope_of(jira_fixtures.raw("mattermost-plugin-jira__webhook-issue-created.json"))
    message = {
        "MessageId": "m1",
        "Body": envelope.body,
        "Attributes": {"MessageGroupId": "10040"},
        "MessageAttributes": envelope.attributes(),
    }
    failed_at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = dead_letter_entry(Rejected(message, "InvalidMessage", "bad"), "0", failed_at=failed_at)
    second = dead_letter_entry(Rejected(message, "InvalidMessage", "bad"), "0", failed_at=failed_at)
    assert first["MessageGroupId"] == "10040"
    assert first["MessageBody"] == envelope.body
    assert first["MessageDeduplicationId"] != second["MessageDeduplicationId"] != envelope.dedup_id
    attrs = {k: v["StringValue"] for k, v in first["MessageAttributes"].items()}
    assert attrs == {
        **{k: v["StringValue"] for k, v in envelope.attributes().items()},
        "error_class": "InvalidMessage",
        "error_message": "bad",
        "failed_at": "2024-01-02T03:04:05.000+00:00",
        "original_group_id": "10040",
    }


def test_a_reason_quoting_characters_sqs_refuses_is_made_sendable() -> None:
    # GIVEN a reason that quotes a body's control character, a lone surrogate and U+FFFF
    message = {
        "MessageId": "m1",
        "Body": "{}",
        "Attributes": {"MessageGroupId": "1"},
        "MessageAttributes": {},
    }
    reason = "event 'a\x01b' carries no issue id \ud800 \uffff\ttab \u00e9 \U0001f389"
    entry = dead_letter_entry(Rejected(message, "Invalid\x00Event", reason), "0", failed_at=datetime.now(UTC))
    # THEN those characters become U+FFFD; what SQS takes (tab, accents, emoji) is kept
    attrs = {k: v["StringValue"] for k, v in entry["MessageAttributes"].items()}
    assert attrs["error_class"] == "Invalid\ufffdEvent"
    assert (
        attrs["error_message"] == "event 'a\ufffdb' carries no issue id \ufffd \ufffd\ttab \u00e9 \U0001f389"
    )
