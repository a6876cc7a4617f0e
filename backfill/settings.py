"""Settings for ``jiralake backfill`` and ``jiralake reconcile``: one frozen object built in the command.

Jira credentials come from the environment and never reach a log line or a ``repr``: the API token
and the personal access token are ``repr=False`` fields, and the client puts them only in the
``Authorization`` header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from shared.settings import (
    AwsSettings,
    ConfigError,
    DatabaseSettings,
    QueueSettings,
    env_bool,
    env_float,
    env_int,
    env_secret,
    env_str,
    http_url,
    require,
)

Deployment = Literal["cloud", "datacenter"]

# Jira caps a page of full issues at 100 on Cloud (fewer when issues are large); ids-only pages go
# up to 5000 on Cloud and to the instance's max (1000 by default) on Data Center.
MAX_PAGE_SIZE = 100
MAX_ID_PAGE_SIZE = 1000


@dataclass(frozen=True)
class JiraSettings:
    """Where Jira is and how to authenticate: basic auth (email + API token) or a bearer PAT."""

    url: str
    deployment: Deployment
    email: str | None = None
    api_token: str | None = field(default=None, repr=False)
    pat: str | None = field(default=None, repr=False)
    # Requests in flight at once against Jira (all kinds), across the whole command.
    max_concurrency: int = 4
    # Attempts per request when Jira throttles (429/503) or fails transiently (5xx, network).
    max_attempts: int = 8
    # Exponential backoff: base * 2**attempt, capped, with jitter; a wait Jira asks for wins (Retry-After,
    # or on a 429 X-RateLimit-Reset).
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # A Retry-After (or an X-RateLimit-Reset) further ahead than this is cut to it (the request is
    # still retried, not dropped).
    max_retry_after_s: float = 600.0
    request_timeout_s: float = 60.0
    page_size: int = MAX_PAGE_SIZE
    id_page_size: int = MAX_ID_PAGE_SIZE
    # Plain http to a Jira other than this machine: credentials unencrypted on the network.
    allow_http: bool = False

    def __post_init__(self) -> None:
        if self.api_token is None and self.pat is None:
            raise ConfigError(
                "no Jira credentials: set JIRALAKE_JIRA_EMAIL and JIRALAKE_JIRA_API_TOKEN (Cloud) "
                "or JIRALAKE_JIRA_PAT (Data Center)"
            )
        url = urlsplit(self.url)
        if url.scheme == "http" and not self.allow_http and not _is_loopback(url.hostname or ""):
            # Every request carries the API token or PAT in its Authorization header.
            raise ConfigError(
                "JIRALAKE_JIRA_URL is plain http: the Jira credentials would cross the network "
                "unencrypted; use https, or set JIRALAKE_JIRA_ALLOW_HTTP=true for a Jira reached only "
                "over a trusted network"
            )

    @property
    def api_version(self) -> str:
        return "3" if self.deployment == "cloud" else "2"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> JiraSettings:
        url = _base_url(require(env, "JIRALAKE_JIRA_URL"))
        email = env_secret(env, "JIRALAKE_JIRA_EMAIL")
        token = env_secret(env, "JIRALAKE_JIRA_API_TOKEN")
        pat = env_secret(env, "JIRALAKE_JIRA_PAT")
        if pat is not None and (email is not None or token is not None):
            raise ConfigError(
                "set either JIRALAKE_JIRA_EMAIL + JIRALAKE_JIRA_API_TOKEN or JIRALAKE_JIRA_PAT, not both"
            )
        if pat is None:
            if email is None and token is None:
                raise ConfigError(
                    "no Jira credentials: set JIRALAKE_JIRA_EMAIL and JIRALAKE_JIRA_API_TOKEN (Cloud) "
                    "or JIRALAKE_JIRA_PAT (Data Center)"
                )
            if email is None:
                raise ConfigError("JIRALAKE_JIRA_API_TOKEN is set but JIRALAKE_JIRA_EMAIL is not")
            if token is None:
                raise ConfigError("JIRALAKE_JIRA_EMAIL is set but JIRALAKE_JIRA_API_TOKEN is not")
        return cls(
            url=url,
            deployment=_deployment(env_str(env, "JIRALAKE_JIRA_DEPLOYMENT", "auto") or "auto", pat),
            email=email,
            api_token=token,
            pat=pat,
            max_concurrency=env_int(env, "JIRALAKE_JIRA_CONCURRENCY", 4, minimum=1),
            max_attempts=env_int(env, "JIRALAKE_JIRA_MAX_ATTEMPTS", 8, minimum=1),
            request_timeout_s=env_float(env, "JIRALAKE_JIRA_TIMEOUT_S", 60.0, minimum=1.0),
            page_size=_bounded(env, "JIRALAKE_JIRA_PAGE_SIZE", MAX_PAGE_SIZE, MAX_PAGE_SIZE),
            allow_http=env_bool(env, "JIRALAKE_JIRA_ALLOW_HTTP", False),
        )


@dataclass(frozen=True)
class BackfillSettings:
    """Everything ``backfill`` and ``reconcile`` need: Jira, the queue, Postgres."""

    jira: JiraSettings
    aws: AwsSettings
    queue_url: str
    database: DatabaseSettings
    # Attempts for SQS entries that failed retryably (throttled, network) before the run stops.
    sqs_attempts: int = 5

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BackfillSettings:
        return cls(
            jira=JiraSettings.from_env(env),
            aws=AwsSettings.from_env(env),
            queue_url=QueueSettings.from_env(env).queue_url,
            database=DatabaseSettings.from_env(env),
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_url(raw: str) -> str:
    # Not repeated: a value such as "me:TOKEN@jira.example" parses as scheme "me" with the token.
    parts = http_url("JIRALAKE_JIRA_URL", raw, "https://example.atlassian.net")
    if parts.username or parts.password:
        raise ConfigError("JIRALAKE_JIRA_URL must not carry credentials; use the JIRALAKE_JIRA_* variables")
    if parts.query or parts.fragment or raw.rstrip().endswith(("?", "#")):
        # Dropping them would hide a page's address pasted for the site's (a board, an issue).
        raise ConfigError(
            "JIRALAKE_JIRA_URL must be the site's base URL (https://example.atlassian.net, or a Data "
            "Center's with its context path: https://jira.example.com/jira), without a ? query or # part"
        )
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _deployment(raw: str, pat: str | None) -> Deployment:
    lowered = raw.lower()
    if lowered == "cloud":
        return "cloud"
    if lowered in {"datacenter", "data-center", "dc", "server"}:
        return "datacenter"
    if lowered != "auto":
        raise ConfigError(f"JIRALAKE_JIRA_DEPLOYMENT must be auto, cloud or datacenter, got {raw!r}")
    # Email + API token is Cloud's basic auth; a personal access token is Data Center's bearer auth.
    return "datacenter" if pat is not None else "cloud"


def _bounded(env: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    value = env_int(env, name, default, minimum=1)
    if value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value
