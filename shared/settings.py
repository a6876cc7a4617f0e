"""Environment parsing shared by the per-service settings objects.

Each service builds one frozen settings object in its ``main()`` from ``os.environ``; tests construct
them directly. Nothing below ``main()`` reads the environment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_PORT = 65535


class ConfigError(ValueError):
    """A setting is missing or malformed; the CLI prints it as one line and exits 2."""


def env_str(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None) -> int:
    raw = env_str(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def env_port(env: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port, 0..65535 (0: the caller's meaning, such as "no admin server")."""
    value = env_int(env, name, default, minimum=0)
    if value > MAX_PORT:
        raise ConfigError(f"{name} must be a port number, 0..{MAX_PORT}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float | None = None) -> float:
    raw = env_str(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):  # float() takes "nan" and "inf", which pass any minimum check
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env_str(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class AwsSettings:
    """Where AWS calls go. Credentials always come from the standard AWS chain, never from here."""

    region: str = "us-east-1"
    # A local endpoint (moto, LocalStack) for every service; None means real AWS.
    endpoint_url: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AwsSettings:
        region = env_str(env, "AWS_REGION") or env_str(env, "AWS_DEFAULT_REGION") or "us-east-1"
        return cls(region=region, endpoint_url=env_str(env, "AWS_ENDPOINT_URL"))


@dataclass(frozen=True)
class QueueSettings:
    queue_url: str
    dlq_url: str

    def __post_init__(self) -> None:
        if self.queue_url == self.dlq_url:
            # The consumer would dead-letter into its own queue and a replay would read back what it
            # sends, both forever.
            raise ConfigError("JIRALAKE_QUEUE_URL and JIRALAKE_DLQ_URL name the same queue")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> QueueSettings:
        return cls(queue_url=require(env, "JIRALAKE_QUEUE_URL"), dlq_url=require(env, "JIRALAKE_DLQ_URL"))


@dataclass(frozen=True)
class DatabaseSettings:
    # None: asyncpg falls back to libpq's PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE.
    url: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.url is not None:
            check_database_url(self.url)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DatabaseSettings:
        return cls(url=env_str(env, "DATABASE_URL"))


def check_database_url(url: str) -> None:
    """Refuse what asyncpg would fail on with a bare ValueError (a traceback to the user): another
    scheme, a port that is not a number. The URL is never repeated: it may hold a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError("DATABASE_URL must be a postgresql:// URL")
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(","):  # libpq's multi-host form: h1:5432,h2:5433
        after_address = host.rpartition("]")[2]  # an IPv6 address is bracketed: [::1]:5432
        port = after_address.rpartition(":")[2] if ":" in after_address else ""
        if port and not (port.isdigit() and 0 < int(port) <= MAX_PORT):
            # Not repeated: a raw #, ? or / in a password ends the user-info early, and the "port"
            # is then the password's first characters.
            raise ConfigError(
                f"DATABASE_URL has a port that is not a number 1..{MAX_PORT} "
                "(percent-encode any #, ? or / in the password)"
            )


def require(env: Mapping[str, str], name: str) -> str:
    value = env_str(env, name)
    if value is None:
        raise ConfigError(f"{name} is not set (see the configuration table in README.md)")
    return value
