"""The documented configuration is the configuration the code reads.

Driven by the configuration tables of README.md and docs/*.md (any table with a ``variable`` and a
``default`` column): every documented ``JIRALAKE_*`` variable is read by some ``from_env`` (setting it
changes a settings field), its documented default is what ``from_env`` gives when it is unset, and the
variables the product code names are exactly the documented ones. ``from_env`` takes a mapping, so the
tests pass dicts; nothing touches ``os.environ``, the network, Postgres or moto.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from types import SimpleNamespace

import pytest

from backfill.settings import BackfillSettings
from consumer.settings import ConsumerSettings
from exporter.settings import MIB, ExporterSettings, ExportFormat
from jiralake.cli import _log_level_from_env
from ops.setup import SetupSettings
from receiver.settings import WEBHOOK_EVENT_PREFIXES, ReceiverSettings
from shared.settings import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PRODUCT_PACKAGES = ("jiralake", "receiver", "consumer", "exporter", "shared", "ops", "backfill")
VARIABLE = re.compile(r"JIRALAKE_[A-Z0-9_]+")

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/jira.fifo"
DLQ = "https://sqs.us-east-1.amazonaws.com/123456789012/jira-dlq.fifo"
OTHER_QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/other.fifo"
JIRA = {
    "JIRALAKE_JIRA_URL": "https://acme.atlassian.net",
    "JIRALAKE_QUEUE_URL": QUEUE,
    "JIRALAKE_DLQ_URL": DLQ,
}
CLOUD = {"JIRALAKE_JIRA_EMAIL": "me@example.com", "JIRALAKE_JIRA_API_TOKEN": "api-token"}

Reader = Callable[[Mapping[str, str]], object]
# Each reader: how a service builds its settings, and the least environment it needs to start.
READERS: dict[str, tuple[Reader, dict[str, str]]] = {
    "receiver": (
        ReceiverSettings.from_env,
        {"JIRALAKE_QUEUE_URL": QUEUE, "JIRALAKE_WEBHOOK_SECRET": "s3cret"},
    ),
    "consumer": (ConsumerSettings.from_env, {"JIRALAKE_QUEUE_URL": QUEUE, "JIRALAKE_DLQ_URL": DLQ}),
    "setup": (SetupSettings.from_env, {"JIRALAKE_QUEUE_URL": QUEUE, "JIRALAKE_DLQ_URL": DLQ}),
    "exporter": (ExporterSettings.from_env, {"JIRALAKE_BUCKET": "jiralake-exports"}),
    "backfill": (BackfillSettings.from_env, {**JIRA, **CLOUD}),
    "backfill-pat": (BackfillSettings.from_env, {**JIRA, "JIRALAKE_JIRA_PAT": "pat"}),
    "cli": (lambda env: SimpleNamespace(log_level=_log_level_from_env(env)), {}),
}


@dataclass(frozen=True)
class Reads:
    """``reader`` reads ``variable`` into ``field``: set to ``value``, the field holds ``parsed``."""

    variable: str
    reader: str
    field: str
    value: str
    parsed: object
    # Where the variable's absence is valid, when not the reader's own environment (credentials).
    unset_reader: str | None = None


# fmt: off
READS = [
    Reads("JIRALAKE_QUEUE_URL", "receiver", "queue_url", OTHER_QUEUE, OTHER_QUEUE),
    Reads("JIRALAKE_WEBHOOK_SECRET", "receiver", "webhook_secret", "other", "other"),
    Reads("JIRALAKE_WEBHOOK_SECRET_PREVIOUS", "receiver", "webhook_secret_previous", "old", "old"),
    Reads("JIRALAKE_RECEIVER_HOST", "receiver", "host", "127.0.0.2", "127.0.0.2"),
    Reads("JIRALAKE_RECEIVER_PORT", "receiver", "port", "8081", 8081),
    Reads("JIRALAKE_RECEIVER_ADMIN_HOST", "receiver", "admin_host", "0.0.0.0", "0.0.0.0"),
    Reads("JIRALAKE_RECEIVER_ADMIN_PORT", "receiver", "admin_port", "9190", 9190),
    Reads("JIRALAKE_RECEIVER_BATCH_MAX_WAIT_MS", "receiver", "batch_max_wait_ms", "7.5", 7.5),
    Reads("JIRALAKE_RECEIVER_MAX_PENDING", "receiver", "max_pending_entries", "500", 500),
    Reads("JIRALAKE_RECEIVER_MAX_BODIES_READING", "receiver", "max_bodies_reading", "16", 16),
    Reads("JIRALAKE_RECEIVER_MAX_INFLIGHT_BATCHES", "receiver", "max_inflight_batches", "3", 3),
    Reads("JIRALAKE_RECEIVER_SQS_TIMEOUT_S", "receiver", "sqs_timeout_s", "2.5", 2.5),
    Reads("JIRALAKE_RECEIVER_BODY_TIMEOUT_S", "receiver", "body_timeout_s", "12", 12.0),
    Reads("JIRALAKE_RECEIVER_IDLE_TIMEOUT_S", "receiver", "idle_timeout_s", "45", 45.0),
    Reads("JIRALAKE_RECEIVER_SHUTDOWN_GRACE_S", "receiver", "shutdown_grace_s", "7", 7.0),
    Reads("JIRALAKE_MAX_BODY_BYTES", "receiver", "max_body_bytes", "262144", 262144),
    Reads("JIRALAKE_ACCEPTED_EVENTS", "receiver", "accepted_event_prefixes", "jira:issue_, comment_",
          ("jira:issue_", "comment_")),
    Reads("JIRALAKE_QUEUE_URL", "consumer", "queue.queue_url", OTHER_QUEUE, OTHER_QUEUE),
    Reads("JIRALAKE_DLQ_URL", "consumer", "queue.dlq_url", OTHER_QUEUE, OTHER_QUEUE),
    Reads("JIRALAKE_VISIBILITY_TIMEOUT_S", "consumer", "visibility_timeout_s", "120", 120),
    Reads("JIRALAKE_CONSUMER_POLLERS", "consumer", "pollers", "5", 5),
    Reads("JIRALAKE_CONSUMER_WAIT_S", "consumer", "wait_time_s", "10", 10),
    Reads("JIRALAKE_CONSUMER_RETRY_BASE_S", "consumer", "retry_base_s", "2", 2),
    Reads("JIRALAKE_CONSUMER_RETRY_MAX_S", "consumer", "retry_max_s", "600", 600),
    Reads("JIRALAKE_CONSUMER_UNAVAILABLE_BACKOFF_S", "consumer", "unavailable_backoff_max_s", "12.5", 12.5),
    Reads("JIRALAKE_CONSUMER_STATEMENT_TIMEOUT_S", "consumer", "statement_timeout_s", "15", 15.0),
    Reads("JIRALAKE_CONSUMER_RETRY_IN_PLACE_S", "consumer", "retry_in_place_s", "45", 45.0),
    Reads("JIRALAKE_CONSUMER_SHUTDOWN_GRACE_S", "consumer", "shutdown_grace_s", "10", 10.0),
    Reads("JIRALAKE_CONSUMER_BREAKER_WINDOW", "consumer", "breaker_window_events", "200", 200),
    Reads("JIRALAKE_CONSUMER_BREAKER_MIN_EVENTS", "consumer", "breaker_min_events", "50", 50),
    Reads("JIRALAKE_CONSUMER_BREAKER_RATIO", "consumer", "breaker_max_dead_letter_ratio", "0.25", 0.25),
    Reads("JIRALAKE_CONSUMER_BREAKER_COOLDOWN_S", "consumer", "breaker_cooldown_s", "120", 120.0),
    Reads("JIRALAKE_CONSUMER_ADMIN_HOST", "consumer", "admin_host", "0.0.0.0", "0.0.0.0"),
    Reads("JIRALAKE_CONSUMER_ADMIN_PORT", "consumer", "admin_port", "9191", 9191),
    Reads("JIRALAKE_CONSUMER_QUEUE_STATS_S", "consumer", "queue_stats_interval_s", "5", 5.0),
    Reads("JIRALAKE_CONSUMER_EXPORT_FRESHNESS_S", "consumer", "export_freshness_interval_s", "15", 15.0),
    Reads("JIRALAKE_CONSUMER_EXIT_WHEN_IDLE_S", "consumer", "exit_when_idle_s", "45", 45.0),
    Reads("JIRALAKE_QUEUE_URL", "setup", "queue_name", OTHER_QUEUE, "other.fifo"),
    Reads("JIRALAKE_DLQ_URL", "setup", "dlq_name", OTHER_QUEUE, "other.fifo"),
    Reads("JIRALAKE_MAX_RECEIVE_COUNT", "setup", "max_receive_count", "3", 3),
    Reads("JIRALAKE_VISIBILITY_TIMEOUT_S", "setup", "visibility_timeout_s", "120", 120),
    Reads("JIRALAKE_BUCKET", "exporter", "bucket", "other-bucket", "other-bucket"),
    Reads("JIRALAKE_EXPORT_PREFIX", "exporter", "prefix", "exports/jira", "exports/jira"),
    Reads("JIRALAKE_EXPORT_FORMAT", "exporter", "format", "parquet", ExportFormat.PARQUET),
    Reads("JIRALAKE_EXPORT_PART_SIZE_MIB", "exporter", "part_size_bytes", "16", 16 * MIB),
    Reads("JIRALAKE_EXPORT_PARTS_IN_FLIGHT", "exporter", "parts_in_flight", "2", 2),
    Reads("JIRALAKE_EXPORT_INCLUDE_RAW", "exporter", "include_raw", "true", True),
    Reads("JIRALAKE_EXPORT_PARQUET_ROWS_PER_GROUP", "exporter", "parquet_rows_per_group", "5000", 5000),
    Reads("JIRALAKE_EXPORT_SCHEDULE", "exporter", "schedule", "0 3 * * *", "0 3 * * *"),
    Reads("JIRALAKE_EXPORT_TIMEZONE", "exporter", "timezone", "America/Sao_Paulo", "America/Sao_Paulo"),
    Reads("JIRALAKE_EXPORT_ADMIN_HOST", "exporter", "admin_host", "0.0.0.0", "0.0.0.0"),
    Reads("JIRALAKE_EXPORT_ADMIN_PORT", "exporter", "admin_port", "9192", 9192),
    Reads("JIRALAKE_QUEUE_URL", "backfill", "queue_url", OTHER_QUEUE, OTHER_QUEUE),
    Reads("JIRALAKE_JIRA_URL", "backfill", "jira.url", "https://jira.example.com/jira/",
          "https://jira.example.com/jira"),
    Reads("JIRALAKE_JIRA_EMAIL", "backfill", "jira.email", "you@example.com", "you@example.com",
          unset_reader="backfill-pat"),
    Reads("JIRALAKE_JIRA_API_TOKEN", "backfill", "jira.api_token", "other", "other",
          unset_reader="backfill-pat"),
    Reads("JIRALAKE_JIRA_PAT", "backfill-pat", "jira.pat", "other", "other", unset_reader="backfill"),
    Reads("JIRALAKE_JIRA_ALLOW_HTTP", "backfill", "jira.allow_http", "true", True),
    Reads("JIRALAKE_JIRA_DEPLOYMENT", "backfill", "jira.deployment", "datacenter", "datacenter"),
    Reads("JIRALAKE_JIRA_CONCURRENCY", "backfill", "jira.max_concurrency", "2", 2),
    Reads("JIRALAKE_JIRA_MAX_ATTEMPTS", "backfill", "jira.max_attempts", "3", 3),
    Reads("JIRALAKE_JIRA_TIMEOUT_S", "backfill", "jira.request_timeout_s", "30", 30.0),
    Reads("JIRALAKE_JIRA_PAGE_SIZE", "backfill", "jira.page_size", "50", 50),
    Reads("JIRALAKE_LOG_LEVEL", "cli", "log_level", "debug", "DEBUG"),
]
# fmt: on

# Documented defaults in words rather than a `literal`: what the field holds when the variable is unset.
PROSE_DEFAULTS: dict[str, object] = {"all issue events": WEBHOOK_EVENT_PREFIXES}
# Documented, but read by the image's HEALTHCHECK (Dockerfile), not by Python.
READ_BY_IMAGE = {"JIRALAKE_HEALTH_URL"}


@dataclass(frozen=True)
class Documented:
    variable: str
    default: str  # the default cell, stripped
    where: str  # file:line of the table row


def documented() -> list[Documented]:
    """Every JIRALAKE_* variable in a table with a ``variable`` and a ``default`` column."""
    entries = []
    for doc in DOCS:
        columns: list[str] = []
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            if not line.startswith("|"):
                columns = []
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not columns:
                columns = [cell.lower() for cell in cells]
            elif {"variable", "default"} <= set(columns) and not set(line) <= set("|-: "):
                where = f"{doc.relative_to(ROOT)}:{number}"
                default = cells[columns.index("default")]
                for variable in VARIABLE.findall(cells[columns.index("variable")]):
                    entries.append(Documented(variable, default, where))
    return entries


def named_in_code() -> dict[str, str]:
    """Every string literal that is exactly a JIRALAKE_* name in the product packages -> first file:line."""
    found: dict[str, str] = {}
    for package in PRODUCT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if VARIABLE.fullmatch(node.value):
                        found.setdefault(node.value, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


DOCUMENTED = documented()
DOCUMENTED_NAMES = {entry.variable for entry in DOCUMENTED}
IN_CODE = named_in_code()
MAPPED = {reads.variable for reads in READS}


def settings_field(reader: str, reads: Reads, env: Mapping[str, str | None]) -> object:
    """``reads.field`` of the settings ``reader`` builds from its environment updated with ``env``
    (None: unset)."""
    build, base = READERS[reader]
    merged = {name: value for name, value in {**base, **env}.items() if value is not None}
    return attrgetter(reads.field)(build(merged))


def case(id_: str, *values: object) -> object:
    return pytest.param(*values, id=id_)


@pytest.mark.parametrize("reads", [case(f"{r.variable}-{r.reader}", r) for r in READS])
def test_setting_the_variable_changes_the_field(reads: Reads) -> None:
    # GIVEN the reader's least environment, WHEN the variable is set to a valid non-default value
    before = settings_field(reads.reader, reads, {})
    changed = settings_field(reads.reader, reads, {reads.variable: reads.value})
    # THEN the field holds what the value means, and that is not what it held before
    assert changed == reads.parsed, f"{reads.variable}={reads.value!r} gave {reads.field}={changed!r}"
    assert changed != before, f"{reads.variable}={reads.value!r} is not a non-default value"


@pytest.mark.parametrize(
    "entry, reads",
    [
        case(f"{e.where.split(':')[0]}-{r.variable}-{r.reader}", e, r)
        for e in DOCUMENTED
        for r in READS
        if r.variable == e.variable
    ],
)
def test_documented_default_is_the_code_default(entry: Documented, reads: Reads) -> None:
    reader = reads.unset_reader or reads.reader
    literal = re.fullmatch(r"`([^`]*)`", entry.default)
    if entry.default.startswith("required"):
        with pytest.raises(ConfigError, match=entry.variable):
            settings_field(reader, reads, {entry.variable: None})
        return
    unset = settings_field(reader, reads, {entry.variable: None})
    if literal:  # the documented value, set explicitly, means what the unset variable means
        as_documented = settings_field(reader, reads, {entry.variable: literal.group(1)})
        assert unset == as_documented, f"{entry.where}: documents {entry.default}, code gives {unset!r}"
    elif entry.default == "" or entry.default.startswith("unset"):
        assert unset is None, (
            f"{entry.where}: documents {entry.variable} unset by default, code gives {unset!r}"
        )
    else:
        assert entry.default in PROSE_DEFAULTS, f"{entry.where}: add {entry.default!r} to PROSE_DEFAULTS"
        assert unset == PROSE_DEFAULTS[entry.default], (
            f"{entry.where}: {entry.default!r}, code gives {unset!r}"
        )


@pytest.mark.parametrize("variable", [case(f"code-{v}", v) for v in sorted(IN_CODE)])
def test_every_variable_the_code_names_is_documented(variable: str) -> None:
    assert variable in DOCUMENTED_NAMES, (
        f"{IN_CODE[variable]} names {variable}, "
        "which no configuration table in README.md or docs/*.md documents"
    )


@pytest.mark.parametrize("variable", [case(f"doc-{v}", v) for v in sorted(DOCUMENTED_NAMES | MAPPED)])
def test_every_documented_variable_is_read_and_mapped(variable: str) -> None:
    where = ", ".join(e.where for e in DOCUMENTED if e.variable == variable) or "no configuration table"
    assert variable in DOCUMENTED_NAMES, f"READS maps {variable}, which is not documented"
    if variable in READ_BY_IMAGE:
        return
    assert variable in IN_CODE, f"{where} documents {variable}, which no product code names"
    assert variable in MAPPED, f"{where} documents {variable}: add a row to READS for the setting it feeds"


def test_image_default_health_url_is_the_documented_one() -> None:
    image_env = dict(
        re.findall(r"^ENV (JIRALAKE_[A-Z0-9_]+)=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    )
    for entry in DOCUMENTED:
        if entry.variable in READ_BY_IMAGE:
            assert f"`{image_env.get(entry.variable)}`" == entry.default, f"{entry.where} vs Dockerfile"


def test_the_tables_were_found() -> None:
    # A table reshaped beyond recognition must not pass silently with nothing to check.
    assert len(DOCUMENTED_NAMES) >= 50, sorted(DOCUMENTED_NAMES)
    assert {e.where.split(":")[0] for e in DOCUMENTED} >= {"README.md", "docs/backfill.md"}
