"""The receiver's settings: one frozen object, built once in ``main()`` from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from receiver.signature import WebhookSecrets
from shared.jira_event import ISSUE_EVENT_PREFIXES
from shared.settings import (
    AwsSettings,
    ConfigError,
    check_host_name,
    env_float,
    env_host,
    env_int,
    env_port,
    env_secret,
    env_str,
    require,
)

# Events jiralake itself enqueues (backfill snapshots, reconciled deletes) never come from Jira: a
# webhook claiming to be one is ignored, whatever JIRALAKE_ACCEPTED_EVENTS says.
INTERNAL_EVENT_PREFIX = "jiralake:"
WEBHOOK_EVENT_PREFIXES: tuple[str, ...] = tuple(
    p for p in ISSUE_EVENT_PREFIXES if not p.startswith(INTERNAL_EVENT_PREFIX)
)

ONE_MIB = 1_048_576


@dataclass(frozen=True)
class ReceiverSettings:
    aws: AwsSettings
    queue_url: str
    # None only when the operator explicitly started with --insecure-no-signature.
    webhook_secret: str | None = field(default=None, repr=False)
    # Also accepted while a secret rotation is in progress; only together with webhook_secret.
    webhook_secret_previous: str | None = field(default=None, repr=False)
    host: str = "0.0.0.0"
    port: int = 8080
    # /metrics stays on the loopback interface unless opened (containers: 0.0.0.0).
    admin_host: str = "127.0.0.1"
    # None: no admin port (JIRALAKE_RECEIVER_ADMIN_PORT=0, as for the consumer and the exporter).
    admin_port: int | None = 9090
    max_body_bytes: int = ONE_MIB
    accepted_event_prefixes: tuple[str, ...] = WEBHOOK_EVENT_PREFIXES
    # Micro-batching: a batch leaves when 10 entries wait or this long after the first arrived.
    batch_max_wait_ms: float = 5.0
    # Entries waiting for a batch; beyond this, requests get 503 at once (backpressure).
    max_pending_entries: int = 1000
    # Requests whose bodies are being read (each buffers up to max_body_bytes before its signature
    # can be checked); beyond this, 503 and the connection closed, so unsigned slow senders cannot
    # run the process out of memory.
    max_bodies_reading: int = 64
    # SendMessageBatch calls in flight at once.
    max_inflight_batches: int = 8
    # Bound on one SendMessageBatch call and on a request's wait for its entry's result.
    sqs_timeout_s: float = 5.0
    # How long /readyz reuses its last SQS answer.
    readiness_cache_s: float = 5.0
    # On SIGTERM: how long in-flight requests and pending batches get to finish.
    shutdown_grace_s: float = 20.0
    # A request whose body has not fully arrived this long after its handler started gets 408 and
    # its connection is closed (a client trickling its body cannot hold a connection for ever).
    body_timeout_s: float = 30.0
    # An idle connection, or one whose request headers have not fully arrived, is closed after this
    # long (aiohttp's keep-alive timeout, which also runs from the moment a connection opens).
    idle_timeout_s: float = 75.0

    def __post_init__(self) -> None:
        if self.webhook_secret_previous is not None and self.webhook_secret is None:
            raise ConfigError(
                "JIRALAKE_WEBHOOK_SECRET_PREVIOUS is set but JIRALAKE_WEBHOOK_SECRET is not; the "
                "previous secret is only accepted alongside the current one"
            )
        # A request waits up to sqs_timeout_s for its entry, and that wait includes the batch's: an
        # entry that waited as long as the timeout would be answered 503 before SQS was even asked.
        if self.batch_max_wait_ms / 1000 > self.sqs_timeout_s / 2:
            raise ConfigError(
                f"JIRALAKE_RECEIVER_BATCH_MAX_WAIT_MS ({self.batch_max_wait_ms:g} ms) must be at most half "
                f"of JIRALAKE_RECEIVER_SQS_TIMEOUT_S ({self.sqs_timeout_s:g} s), so that SQS has time to "
                "confirm a batch before its requests stop waiting"
            )

    @property
    def secrets(self) -> WebhookSecrets | None:
        """The secrets signatures are checked against; None when unsigned webhooks are accepted."""
        if self.webhook_secret is None:
            return None
        return WebhookSecrets(self.webhook_secret, self.webhook_secret_previous)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, allow_unsigned: bool = False) -> ReceiverSettings:
        secret = env_secret(env, "JIRALAKE_WEBHOOK_SECRET")
        previous = env_secret(env, "JIRALAKE_WEBHOOK_SECRET_PREVIOUS")
        if secret is None and not allow_unsigned and previous is None:
            raise ConfigError(
                "JIRALAKE_WEBHOOK_SECRET is not set; set it to the webhook's secret in Jira, "
                "or pass --insecure-no-signature to accept unsigned webhooks (local use only)"
            )
        settings = cls(
            aws=AwsSettings.from_env(env),
            queue_url=require(env, "JIRALAKE_QUEUE_URL"),
            webhook_secret=secret,
            webhook_secret_previous=previous,
            host=env_host(env, "JIRALAKE_RECEIVER_HOST", "0.0.0.0"),
            port=env_port(env, "JIRALAKE_RECEIVER_PORT", 8080),
            admin_host=env_host(env, "JIRALAKE_RECEIVER_ADMIN_HOST", "127.0.0.1"),
            admin_port=env_port(env, "JIRALAKE_RECEIVER_ADMIN_PORT", 9090) or None,
            max_body_bytes=env_int(env, "JIRALAKE_MAX_BODY_BYTES", ONE_MIB, minimum=1024),
            accepted_event_prefixes=parse_accepted_events(env_str(env, "JIRALAKE_ACCEPTED_EVENTS")),
            batch_max_wait_ms=env_float(env, "JIRALAKE_RECEIVER_BATCH_MAX_WAIT_MS", 5.0, minimum=0.0),
            max_pending_entries=env_int(env, "JIRALAKE_RECEIVER_MAX_PENDING", 1000, minimum=10),
            max_bodies_reading=env_int(env, "JIRALAKE_RECEIVER_MAX_BODIES_READING", 64, minimum=1),
            max_inflight_batches=env_int(env, "JIRALAKE_RECEIVER_MAX_INFLIGHT_BATCHES", 8, minimum=1),
            sqs_timeout_s=env_float(env, "JIRALAKE_RECEIVER_SQS_TIMEOUT_S", 5.0, minimum=0.1),
            shutdown_grace_s=env_float(env, "JIRALAKE_RECEIVER_SHUTDOWN_GRACE_S", 20.0, minimum=0.0),
            body_timeout_s=env_float(env, "JIRALAKE_RECEIVER_BODY_TIMEOUT_S", 30.0, minimum=0.1),
            idle_timeout_s=env_float(env, "JIRALAKE_RECEIVER_IDLE_TIMEOUT_S", 75.0, minimum=1.0),
        )
        return settings.with_ports()

    def with_ports(self, *, host: str | None = None, port: int | None = None) -> ReceiverSettings:
        """These settings with the command line's ``--host``/``--port`` applied, checked for clashes."""
        if host is not None:
            check_host_name("--host", host)
        updated = replace(
            self, host=host if host is not None else self.host, port=port if port is not None else self.port
        )
        if updated.port != 0 and updated.port == updated.admin_port:
            raise ConfigError(
                f"the receiver port and JIRALAKE_RECEIVER_ADMIN_PORT are both {updated.port}; "
                "they must differ"
            )
        return updated


def parse_accepted_events(raw: str | None) -> tuple[str, ...]:
    """``JIRALAKE_ACCEPTED_EVENTS``: comma-separated event-type prefixes, each concerning an issue."""
    if raw is None:
        return WEBHOOK_EVENT_PREFIXES
    prefixes = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not prefixes:
        raise ConfigError("JIRALAKE_ACCEPTED_EVENTS lists no event types")
    for prefix in prefixes:
        if prefix.startswith(INTERNAL_EVENT_PREFIX):
            raise ConfigError(
                f"JIRALAKE_ACCEPTED_EVENTS: {prefix!r} is an event jiralake makes itself; "
                "webhooks cannot send it"
            )
        if not prefix.startswith(WEBHOOK_EVENT_PREFIXES):
            raise ConfigError(
                f"JIRALAKE_ACCEPTED_EVENTS: {prefix!r} does not concern an issue; each entry must "
                f"start with one of {', '.join(WEBHOOK_EVENT_PREFIXES)}"
            )
    return prefixes
