"""The consumer's settings: one frozen object, built once in ``main()`` (or directly in tests)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.provision import MAX_VISIBILITY_TIMEOUT_S
from shared.settings import (
    AwsSettings,
    ConfigError,
    DatabaseSettings,
    QueueSettings,
    env_float,
    env_host,
    env_int,
    env_port,
    env_str,
)

MAX_RECEIVE_MESSAGES = 10  # SQS's limit per ReceiveMessage
MAX_WAIT_TIME_S = 20  # SQS's limit on long polling
# Each poller holds a PostgreSQL connection (the pool is pollers + 1) and mostly waits on SQS: more
# throughput beyond this comes from more consumer processes, not from using up the server's
# max_connections (100 by default) from one. A mistyped huge value also started that many tasks.
MAX_POLLERS = 32
# A day: a longer wait for an idle queue is a consumer that runs until SIGTERM (leave the setting unset).
MAX_EXIT_WHEN_IDLE_S = 86_400.0


@dataclass(frozen=True)
class ConsumerSettings:
    aws: AwsSettings
    queue: QueueSettings
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    # Concurrent receive-apply-delete loops; FIFO keeps one issue's messages on one loop at a time.
    pollers: int = 2
    # Long polling: how long one ReceiveMessage waits for messages (0..20).
    wait_time_s: int = 20
    # Requested on every ReceiveMessage and renewed while a batch runs long.
    visibility_timeout_s: int = 60
    # Transient failure: a message comes back after retry_base_s * 2**(receives - 1), at most retry_max_s.
    retry_base_s: int = 5
    retry_max_s: int = 900
    # While Postgres or SQS is unreachable, a poller waits (doubling up to this) before trying again.
    unavailable_backoff_max_s: float = 30.0
    # A batch that fails transiently on a connection that survives (a lock wait past the statement
    # timeout, a deadlock, disk full) is retried in place this long before it is released; 0: never.
    retry_in_place_s: float = 300.0
    # Longest one Postgres statement may take before it counts as a (transient) timeout.
    statement_timeout_s: float = 30.0
    # On SIGTERM, batches in flight get this long to commit and acknowledge before they are cancelled.
    shutdown_grace_s: float = 25.0
    # Circuit breaker: stop receiving for cooldown when, over the last window of events (at least
    # min_events of them), the share dead-lettered exceeds max_dead_letter_ratio.
    breaker_window_events: int = 100
    breaker_min_events: int = 20
    breaker_max_dead_letter_ratio: float = 0.5
    breaker_cooldown_s: float = 60.0
    # /healthz, /readyz, /metrics; port None disables the admin server.
    admin_host: str = "127.0.0.1"
    admin_port: int | None = 9091
    # Queue depth gauges (jiralake_queue_messages) refreshed this often; 0 disables.
    queue_stats_interval_s: float = 30.0
    # jiralake_export_last_success_timestamp_seconds read from Postgres this often; 0 disables.
    export_freshness_interval_s: float = 60.0
    # Stop (exit 0) once receives have found the queue empty for this long; None: run until SIGTERM.
    exit_when_idle_s: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.pollers <= MAX_POLLERS:
            raise ConfigError(
                f"pollers (JIRALAKE_CONSUMER_POLLERS) must be between 1 and {MAX_POLLERS}, got {self.pollers}"
            )
        if not 0 <= self.wait_time_s <= MAX_WAIT_TIME_S:
            raise ConfigError(
                f"wait_time_s (JIRALAKE_CONSUMER_WAIT_S) must be between 0 and {MAX_WAIT_TIME_S}, "
                f"got {self.wait_time_s}"
            )
        if not 1 <= self.visibility_timeout_s <= MAX_VISIBILITY_TIMEOUT_S:
            raise ConfigError(
                f"visibility_timeout_s (JIRALAKE_VISIBILITY_TIMEOUT_S) must be between 1 and "
                f"{MAX_VISIBILITY_TIMEOUT_S}, got {self.visibility_timeout_s}"
            )
        if not 0 <= self.retry_base_s <= self.retry_max_s <= MAX_VISIBILITY_TIMEOUT_S:
            raise ConfigError(
                "retry delays must satisfy 0 <= JIRALAKE_CONSUMER_RETRY_BASE_S <= "
                f"JIRALAKE_CONSUMER_RETRY_MAX_S <= {MAX_VISIBILITY_TIMEOUT_S}"
            )
        if not 0 < self.breaker_max_dead_letter_ratio <= 1:
            raise ConfigError("JIRALAKE_CONSUMER_BREAKER_RATIO must be in (0, 1]")
        if self.exit_when_idle_s is not None and not 0 < self.exit_when_idle_s <= MAX_EXIT_WHEN_IDLE_S:
            raise ConfigError(
                "exit_when_idle_s (JIRALAKE_CONSUMER_EXIT_WHEN_IDLE_S, --exit-when-idle) must be more than 0 "
                f"and at most {MAX_EXIT_WHEN_IDLE_S:g}, got {self.exit_when_idle_s:g}"
            )
        if not 1 <= self.breaker_min_events <= self.breaker_window_events:
            raise ConfigError(
                "JIRALAKE_CONSUMER_BREAKER_MIN_EVENTS must be between 1 and JIRALAKE_CONSUMER_BREAKER_WINDOW"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsumerSettings:
        admin_port = env_port(env, "JIRALAKE_CONSUMER_ADMIN_PORT", 9091)
        return cls(
            aws=AwsSettings.from_env(env),
            queue=QueueSettings.from_env(env),
            database=DatabaseSettings.from_env(env),
            pollers=env_int(env, "JIRALAKE_CONSUMER_POLLERS", 2, minimum=1),
            wait_time_s=env_int(env, "JIRALAKE_CONSUMER_WAIT_S", 20, minimum=0),
            visibility_timeout_s=env_int(env, "JIRALAKE_VISIBILITY_TIMEOUT_S", 60, minimum=1),
            retry_base_s=env_int(env, "JIRALAKE_CONSUMER_RETRY_BASE_S", 5, minimum=0),
            retry_max_s=env_int(env, "JIRALAKE_CONSUMER_RETRY_MAX_S", 900, minimum=0),
            unavailable_backoff_max_s=env_float(
                env, "JIRALAKE_CONSUMER_UNAVAILABLE_BACKOFF_S", 30.0, minimum=0.1
            ),
            retry_in_place_s=env_float(env, "JIRALAKE_CONSUMER_RETRY_IN_PLACE_S", 300.0, minimum=0),
            statement_timeout_s=env_float(env, "JIRALAKE_CONSUMER_STATEMENT_TIMEOUT_S", 30.0, minimum=0.1),
            shutdown_grace_s=env_float(env, "JIRALAKE_CONSUMER_SHUTDOWN_GRACE_S", 25.0, minimum=0),
            breaker_window_events=env_int(env, "JIRALAKE_CONSUMER_BREAKER_WINDOW", 100, minimum=1),
            breaker_min_events=env_int(env, "JIRALAKE_CONSUMER_BREAKER_MIN_EVENTS", 20, minimum=1),
            breaker_max_dead_letter_ratio=env_float(
                env, "JIRALAKE_CONSUMER_BREAKER_RATIO", 0.5, minimum=0.01
            ),
            breaker_cooldown_s=env_float(env, "JIRALAKE_CONSUMER_BREAKER_COOLDOWN_S", 60.0, minimum=0),
            admin_host=env_host(env, "JIRALAKE_CONSUMER_ADMIN_HOST", "127.0.0.1"),
            admin_port=admin_port or None,
            queue_stats_interval_s=env_float(env, "JIRALAKE_CONSUMER_QUEUE_STATS_S", 30.0, minimum=0),
            export_freshness_interval_s=env_float(
                env, "JIRALAKE_CONSUMER_EXPORT_FRESHNESS_S", 60.0, minimum=0
            ),
            exit_when_idle_s=(
                env_float(env, "JIRALAKE_CONSUMER_EXIT_WHEN_IDLE_S", 0.0)
                if env_str(env, "JIRALAKE_CONSUMER_EXIT_WHEN_IDLE_S") is not None
                else None
            ),
        )
