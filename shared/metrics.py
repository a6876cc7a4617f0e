"""Every Prometheus series jiralake exposes, defined once (names follow Prometheus conventions).

Services import the objects they update; ``/metrics`` on each admin port serves the default registry.
Documented in docs/operations.md; alert rules and the dashboard in deploy/ use these names.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

# -- receiver --
RECEIVER_REQUESTS = Counter(
    "jiralake_receiver_requests_total",
    "Webhook requests by outcome (accepted, ignored, bad_request, unauthorized, too_large, "
    "unsupported_media_type, request_timeout, unavailable, client_closed).",
    ["outcome"],
)
RECEIVER_REQUEST_SECONDS = Histogram(
    "jiralake_receiver_request_duration_seconds",
    "Time from a webhook request arriving to its answer.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RECEIVER_PREVIOUS_SECRET_MATCHES = Counter(
    "jiralake_receiver_previous_secret_matches_total",
    "Webhooks whose signature matched JIRALAKE_WEBHOOK_SECRET_PREVIOUS, not the current secret; "
    "once it stays flat, the rotation is done and the previous secret can be removed.",
)
# Unlabelled, so exposed at 0 from import: the alert's increase() sees its first deletion too.
RECEIVER_JIRA_USERS_DELETED = Counter(
    "jiralake_receiver_jira_users_deleted_total",
    "Signed user_deleted webhooks (a Jira account was deleted; an erasure with `jiralake forget-user` "
    "may be due). Counted only: the answer is 202 ignored and the account id is never kept.",
)
RECEIVER_BATCH_SIZE = Histogram(
    "jiralake_receiver_batch_entries",
    "Entries per SendMessageBatch call made by the receiver's micro-batcher.",
    buckets=(1, 2, 3, 5, 7, 10),
)

# -- SQS, from every process --
SQS_CALLS = Counter(
    "jiralake_sqs_requests_total",
    "SQS API calls made, by operation and outcome (ok, error).",
    ["operation", "outcome"],
)

SQS_OUTCOMES = ("ok", "error")


def start_at_zero(metric: Counter | Gauge, label_sets: Iterable[tuple[str, ...]]) -> None:
    """Expose these labelled series at 0 from the start. A series first scraped at 1 has no earlier
    sample, so rate() and increase() (and the alerts built on them) would miss its first event after
    every restart; a labelled gauge would have no sample at all, and an alert on it would stay quiet."""
    for labels in label_sets:
        metric.labels(*labels)


def sqs_label_sets(*operations: str) -> list[tuple[str, str]]:
    return [(operation, outcome) for operation in operations for outcome in SQS_OUTCOMES]


# -- consumer --
CONSUMER_EVENTS = Counter(
    "jiralake_consumer_events_total",
    "Events handled by the consumer, by outcome (applied, skipped_stale, duplicate, history_only, "
    "dead_lettered, retried).",
    ["outcome"],
)
CONSUMER_BATCH_SECONDS = Histogram(
    "jiralake_consumer_batch_duration_seconds",
    "Time to apply one received batch (Postgres transaction plus SQS delete).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
CONSUMER_CIRCUIT_OPEN = Gauge(
    "jiralake_consumer_circuit_open",
    "1 while the consumer has stopped receiving because most recent events were dead-lettered.",
)

# -- queues, polled periodically by the consumer --
QUEUE_MESSAGES = Gauge(
    "jiralake_queue_messages",
    "Approximate messages in a queue by state (visible, in_flight, delayed).",
    ["queue", "state"],
)
# The queue gauges keep their last values while SQS cannot be read; this says how old they are, so an
# alert can tell "empty" from "unknown" (a consumer cut off from SQS would otherwise show its last 0).
QUEUE_DEPTH_READ = Gauge(
    "jiralake_queue_depth_read_timestamp_seconds",
    "Unix time of the last successful read of this queue's depth (the poller's start until one has).",
    ["queue"],
)
QUEUE_OLDEST_AGE_SECONDS = Gauge(
    "jiralake_queue_oldest_message_age_seconds",
    "Age of the oldest message where it can be known without consuming it (the dead-letter queue).",
    ["queue"],
)

# -- exporter --
# The export-run table's modes: "full" replaces latest/ (what analysts read), "changes" adds an
# incremental object. Their freshness is separate: hourly incremental runs that succeed must not hide
# a daily full export that fails.
EXPORT_MODES = ("full", "changes")
EXPORT_LAST_SUCCESS = Gauge(
    "jiralake_export_last_success_timestamp_seconds",
    "Unix time at which the last successful export of this mode (full: replaces latest/; changes: "
    "incremental) finished; 0 until one has.",
    ["mode"],
)
# Both modes at 0 from the start, as the unlabelled gauge was: "never" is old enough to alert on.
start_at_zero(EXPORT_LAST_SUCCESS, [(mode,) for mode in EXPORT_MODES])
EXPORT_ROWS = Counter("jiralake_export_rows_total", "Rows written by successful exports.")
EXPORT_BYTES = Counter("jiralake_export_bytes_total", "Bytes uploaded by successful exports.")
EXPORT_FAILURES = Counter("jiralake_export_failures_total", "Exports that failed and were aborted.")
EXPORT_SECONDS = Histogram(
    "jiralake_export_duration_seconds",
    "Wall time of an export run.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
