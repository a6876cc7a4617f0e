"""Environment parsing shared by the per-service settings objects.

Each service builds one frozen settings object in its ``main()`` from ``os.environ``; tests construct
them directly. Nothing below ``main()`` reads the environment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

MAX_PORT = 65535


class ConfigError(ValueError):
    """A setting is missing or malformed; the CLI prints it as one line and exits 2."""


def env_str(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def env_secret(env: Mapping[str, str], name: str) -> str | None:
    """A credential or shared secret, never echoed. A control character (a line break left by `echo`
    into a secret store) would otherwise fail deep in an HTTP client, or never match a signature."""
    value = env_str(env, name)
    if value is not None and any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ConfigError(f"{name} holds a control character (a line break pasted into it?); remove it")
    return value


def env_int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    raw = env_str(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def env_port(env: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port, 0..65535 (0: the caller's meaning, such as "no admin server")."""
    value = env_int(env, name, default, minimum=0)
    if value > MAX_PORT:
        raise ConfigError(f"{name} must be a port number, 0..{MAX_PORT}, got {value}")
    return value


def env_host(env: Mapping[str, str], name: str, default: str) -> str:
    """A host name or IP address to listen on or connect to (see :func:`check_host_name`)."""
    host = env_str(env, name, default) or default
    check_host_name(name, host)
    return host


def check_host_name(name: str, host: str) -> None:
    """A ConfigError naming ``name`` when ``host`` is a name the resolver cannot take: an empty label
    (``a..b``), or a label over 63 characters. Python's IDNA codec refuses them with a UnicodeError
    when the name is looked up or bound, which would surface as a traceback."""
    if ":" in host:  # an IPv6 address
        return
    try:
        host.encode("idna")
    except UnicodeError:
        # Not repeated: in a DATABASE_URL with a raw @ in the password, the "host" is part of it.
        raise ConfigError(
            f"{name} has a host name with an empty label (a..b) or a label over 63 characters"
        ) from None


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
        _check_region(region)
        endpoint_url = env_str(env, "AWS_ENDPOINT_URL")
        if endpoint_url is not None:
            _check_endpoint_url(endpoint_url)
        return cls(region=region, endpoint_url=endpoint_url)


def _check_region(region: str) -> None:
    """Refuse at start a region botocore refuses (InvalidRegionError) at the first call, an AWS failure's
    exit 1 in every command: its own check, a host label."""
    from botocore.exceptions import InvalidRegionError
    from botocore.utils import validate_region_name

    try:
        validate_region_name(region)
    except InvalidRegionError:
        raise ConfigError(
            f"AWS_REGION (or AWS_DEFAULT_REGION) must be a region name like eu-west-1, got {region[:40]!r}"
        ) from None


def _check_endpoint_url(url: str) -> None:
    """Refuse at start what is not an http(s) URL with a usable port, and what botocore would refuse
    with a bare ValueError ("Invalid endpoint", a traceback) on the first client: its own check."""
    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url  # only with an endpoint

    http_url("AWS_ENDPOINT_URL", url, "http://127.0.0.1:5000")
    if not (is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url)):
        raise ConfigError("AWS_ENDPOINT_URL has a host that is not a name (letters, digits, -, .) or an IP")


@dataclass(frozen=True)
class QueueSettings:
    queue_url: str
    dlq_url: str

    def __post_init__(self) -> None:
        # Compared by path (account and name): http://localhost:4566/1/q.fifo and
        # http://127.0.0.1:4566/1/q.fifo are one queue, and a dead-letter queue must be in its
        # source queue's account and region anyway.
        if _queue_path(self.queue_url) == _queue_path(self.dlq_url):
            # The consumer would dead-letter into its own queue and a replay would read back what it
            # sends, both forever.
            raise ConfigError("JIRALAKE_QUEUE_URL and JIRALAKE_DLQ_URL name the same queue")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> QueueSettings:
        return cls(queue_url=require(env, "JIRALAKE_QUEUE_URL"), dlq_url=require(env, "JIRALAKE_DLQ_URL"))


def _queue_path(url: str) -> str:
    try:
        return urlsplit(url).path.rstrip("/") or url
    except ValueError:  # not a URL at all: compared as it is
        return url


@dataclass(frozen=True)
class DatabaseSettings:
    # None: asyncpg falls back to libpq's PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE.
    url: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.url is not None:
            check_database_url(self.url)

    def host_names(self) -> list[str]:
        """The host names DATABASE_URL names (netloc after the credentials, and ``?host=``), without
        ports or credentials: for messages. Empty without a URL or for a Unix socket's default."""
        if self.url is None:
            return []
        parts = urlsplit(self.url)
        hosts = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc  # as asyncpg splits
        names = [_without_port(host) for host in hosts.split(",") if host]
        for value in parse_qs(parts.query).get("host", []):
            names += [_without_port(host) for host in value.split(",") if host]
        return names

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DatabaseSettings:
        url = env_str(env, "DATABASE_URL")
        if url is None:  # asyncpg reads PGHOST and PGPORT itself: checked here as DATABASE_URL is
            for host in (env_str(env, "PGHOST") or "").split(","):
                if host and not host.startswith("/"):
                    check_host_name("PGHOST", host)
            for port in (env_str(env, "PGPORT") or "").split(","):
                if port and not _is_port(port):
                    raise ConfigError(f"PGPORT is not a port number 1..{MAX_PORT}, got {port[:20]!r}")
        for variable, name in _CHOICE_VARIABLES.items():  # read even beside a DATABASE_URL without them
            value = env_str(env, variable)
            if value is not None:
                _check_choice(variable, name, value)
        settings = cls(url=url)  # the URL checked first: the file check below parses it
        _check_ssl_file_variables(env, url)
        return settings


def _without_port(host: str) -> str:
    """``h:5432`` -> ``h``, ``[::1]:5432`` -> ``::1``."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0]


def check_database_url(url: str) -> None:
    """Refuse what asyncpg would fail on with a bare ValueError or IndexError (a traceback to the
    user): a URL that does not parse, another scheme, an empty host in a host list, a port that is not
    a number (in the host list or in ``?port=``). Hosts are split as asyncpg splits them: after the
    first @, and a host's port after its first :. The URL is never repeated: it may hold a password."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed [, or what is in [ ] is not an IPv6 address
        raise ConfigError(
            "DATABASE_URL is not a valid URL (an IPv6 address goes in [ ]; percent-encode any [ or ] in "
            "the password)"
        ) from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError("DATABASE_URL must be a postgresql:// URL")
    hosts = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc
    if hosts:
        for host in hosts.split(","):  # libpq's multi-host form: h1:5432,h2:5433
            _check_host(host, quoted=True)
    try:
        query = parse_qs(parts.query, strict_parsing=True) if parts.query else {}
    except ValueError:  # as asyncpg parses it: a field without "=", an empty field ("&&")
        raise ConfigError(
            "DATABASE_URL has a query that is not name=value pairs joined by & "
            "(percent-encode any #, ? or / in the password)"
        ) from None
    for value in query.get("host", []):
        for host in value.split(","):
            _check_host(host, quoted=False)
    for value in query.get("port", []):
        for port in value.split(","):
            _check_port(port)
    for name in _CHOICES:
        for value in query.get(name, []):
            _check_choice(f"DATABASE_URL's {name}", name, value)
    for name in _SSL_FILES:
        for path in query.get(name, []):
            if not os.path.isfile(path):  # asyncpg's error would be a bare FileNotFoundError, no path
                raise ConfigError(f"DATABASE_URL's {name} is not a file this process can see: {path!r}")


# The parameters asyncpg takes only from a list (libpq's values), and the environment variables it
# reads them from when the URL has none: any other value is a ValueError that prints its enum's repr,
# or a ClientConfigurationError (exit 1, as if the database had refused) at the first connection.
_CHOICES = {
    "target_session_attrs": ("any", "primary", "standby", "prefer-standby", "read-write", "read-only"),
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslnegotiation": ("postgres", "direct"),
}
_CHOICE_VARIABLES = {
    "PGTARGETSESSIONATTRS": "target_session_attrs",
    "PGSSLMODE": "sslmode",
    "PGSSLNEGOTIATION": "sslnegotiation",
}


# asyncpg also takes these, the names of its sslmode enum.
_SSLMODE_ALIASES = ("verify_ca", "verify_full")


def _check_choice(what: str, name: str, value: str) -> None:
    allowed = _CHOICES[name]
    if value not in allowed and not (name == "sslmode" and value in _SSLMODE_ALIASES):
        raise ConfigError(f"{what} must be one of {', '.join(allowed)}, got {value[:40]!r}")


def _has_tcp_host(env: Mapping[str, str], url: str | None) -> bool:
    """Whether asyncpg would try a TCP address: a host that is no socket folder, in the URL, else in
    PGHOST, else its default list (which ends with localhost)."""
    hosts = DatabaseSettings(url).host_names() if url else []
    if not hosts:
        hosts = [host for host in (env_str(env, "PGHOST") or "").split(",") if host]
    return not hosts or any(not unquote(host).startswith("/") for host in hosts)


# Query parameters naming files (the CA bundle of an RDS instance, a client certificate).
_SSL_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
# The libpq variables asyncpg reads those files from where DATABASE_URL names none, and the least
# sslmode at which it reads each (the client certificate from "allow", the CA bundle and CRL from
# "require"): a missing file there fails every connection with a bare FileNotFoundError, no path.
_SSL_FILE_VARIABLES = {
    "PGSSLCERT": ("sslcert", "allow"),
    "PGSSLKEY": ("sslkey", "allow"),
    "PGSSLROOTCERT": ("sslrootcert", "require"),
    "PGSSLCRL": ("sslcrl", "require"),
}


def _check_ssl_file_variables(env: Mapping[str, str], url: str | None) -> None:
    query = parse_qs(urlsplit(url).query) if url else {}
    named = query.get("sslmode")
    explicit = named[-1] if named else env_str(env, "PGSSLMODE")
    if explicit is None and not _has_tcp_host(env, url):
        return  # Unix sockets only: asyncpg sets up no TLS, and reads none of the files
    mode = (explicit or "prefer").replace("_", "-")
    modes = _CHOICES["sslmode"]
    for variable, (name, least) in _SSL_FILE_VARIABLES.items():
        path = env.get(variable)  # as asyncpg reads it: os.getenv, not stripped
        if not path or name in query or mode not in modes or modes.index(mode) < modes.index(least):
            continue
        if name == "sslkey" and not (env.get("PGSSLCERT") or "sslcert" in query):
            continue  # the key goes with a certificate named; alone, asyncpg leaves it unread
        if not os.path.isfile(path):
            raise ConfigError(
                f"{variable} is not a file this process can see: {path!r} (sslmode {mode} reads it)"
            )


def _check_host(host: str, *, quoted: bool) -> None:
    if not host:
        raise ConfigError("DATABASE_URL has an empty host in its host list")
    if host.startswith("/"):  # a Unix socket directory
        return
    if host.startswith("["):  # an IPv6 address is bracketed: [::1]:5432
        port = host.partition("]")[2].partition(":")[2]
    else:  # asyncpg's reading: all after the first ":", so "h:5432:5433" has the port "5432:5433"
        name, _, port = host.partition(":")
        check_host_name("DATABASE_URL", unquote(name) if quoted else name)
    if port:
        _check_port(unquote(port) if quoted else port)


def _is_port(port: str) -> bool:
    return port.isascii() and port.isdigit() and 0 < int(port) <= MAX_PORT


def _check_port(port: str) -> None:
    if not _is_port(port):
        # Not repeated: a raw #, ? or / in a password ends the user-info early, and the "port" is
        # then the password's first characters.
        raise ConfigError(
            f"DATABASE_URL has a port that is not a number 1..{MAX_PORT} "
            "(percent-encode any #, ? or / in the password)"
        )


def http_url(name: str, url: str, example: str) -> SplitResult:
    """``url`` split, when it is an http(s) URL with a host and, if it has one, a port 1..65535; else a
    ConfigError naming the variable. The value is never repeated: it may carry credentials."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed [, or what is in [ ] is not an IPv6 address
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s) URL like {example}")
    try:
        port = parts.port  # a ValueError when it is not a number 0..65535
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"{name} has a port that is not a number 1..{MAX_PORT}")
    check_host_name(name, parts.hostname)
    return parts


def require(env: Mapping[str, str], name: str) -> str:
    value = env_str(env, name)
    if value is None:
        raise ConfigError(f"{name} is not set (see the configuration table in README.md)")
    return value
