"""The security review, as tests: no SQL built from input, no secrets in logs, a constant-time
signature check over both secrets during a rotation, admin ports on the loopback interface by
default, explicit request and header limits, and finite timeouts on every network client."""

from __future__ import annotations

import ast
import asyncio
import hmac
import io
import math
import os
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import structlog.testing
from prometheus_client import REGISTRY

from consumer.settings import ConsumerSettings
from exporter.settings import ExporterSettings
from ops.local_aws import free_port
from receiver.app import build_app, server_options
from receiver.settings import ReceiverSettings
from receiver.signature import (
    MATCHED_CURRENT,
    MATCHED_PREVIOUS,
    BadSignature,
    WebhookSecrets,
    sign,
    verify,
)
from shared import aws, db
from shared import logging as jl_logging
from shared.provision import QueuePair
from shared.settings import AwsSettings, ConfigError, DatabaseSettings
from tests import jira_fixtures
from tests.conftest import drain
from tests.test_receiver import RECEIVED_AT_MS
from tests.test_receiver_process import LogLines

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jiralake", "receiver", "consumer", "exporter", "shared", "ops", "backfill")
ISSUE_FIXTURE = "mattermost-plugin-jira__webhook-issue-created.json"


def product_sources() -> Iterator[tuple[str, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=rel)


# -- no SQL assembled from input ---------------------------------------------------------------

# asyncpg methods whose first argument is SQL text.
SQL_METHODS = {
    "execute",
    "executemany",
    "fetch",
    "fetchrow",
    "fetchval",
    "cursor",
    "prepare",
    "copy_from_query",
}
# (file, function) -> why its non-constant SQL is safe. Nothing here comes from a request or a message.
SQL_ALLOWLIST = {
    ("exporter/copy_stream.py", "copy_csv"): "runs the query csv_query() built (see exporter/streaming.py)",
    ("exporter/streaming.py", "stream_parquet"): "parquet_query(): catalog identifiers, quote_ident'ed",
    (
        "shared/migrate.py",
        "_execute_logging_warnings",
    ): "migration files shipped in the package (shared/migrations/*.sql)",
    ("ops/local_postgres.py", "ensure_database"): "CREATE DATABASE of the local stack's fixed name",
    ("receiver/app.py", "_answer_and_close"): "aiohttp's StreamResponse.prepare(request), not SQL",
}


def constant_names(tree: ast.Module) -> set[str]:
    """Module-level names bound once to string constants (SQL kept as named constants)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                names.add(node.targets[0].id)
    return names


def is_constant_sql(arg: ast.expr, constants: set[str]) -> bool:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return True
    if isinstance(arg, ast.Name) and arg.id in constants:
        return True
    # queries.query("name"): a named section of a .sql file shipped with the package
    return (
        isinstance(arg, ast.Call)
        and isinstance(arg.func, ast.Attribute)
        and arg.func.attr == "query"
        and len(arg.args) == 1
        and isinstance(arg.args[0], ast.Constant)
    )


def sql_built_from_parts() -> list[tuple[str, str, int]]:
    found: list[tuple[str, str, int]] = []
    for rel, tree in product_sources():
        constants = constant_names(tree)
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SQL_METHODS
                    and node.args
                    and not is_constant_sql(node.args[0], constants)
                ):
                    found.append((rel, func.name, node.lineno))
    return found


def test_no_sql_is_assembled_from_non_constant_parts_outside_the_allowlist() -> None:
    found = sql_built_from_parts()
    unexplained = [f for f in found if (f[0], f[1]) not in SQL_ALLOWLIST]
    assert unexplained == [], "SQL built at run time; use a named constant or add a reason to the allowlist"
    # Every allowlist entry is still needed (a stale entry would hide a new use).
    assert {(f[0], f[1]) for f in found} == set(SQL_ALLOWLIST)


def test_the_sql_check_catches_f_strings_format_and_percent() -> None:
    source = (
        "Q = 'SELECT 1'\n"
        "async def f(conn, x):\n"
        "    await conn.fetch(Q)\n"
        "    await conn.fetch(f'SELECT {x}')\n"
        "    await conn.execute('SELECT %s' % x)\n"
        "    await conn.fetchval('SELECT {}'.format(x))\n"
        "    await conn.fetchrow('SELECT ' + x)\n"
    )
    tree = ast.parse(source)
    constants = constant_names(tree)
    calls = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") in SQL_METHODS
    ]
    assert [is_constant_sql(c.args[0], constants) for c in calls] == [True, False, False, False, False]


# -- the signature check ------------------------------------------------------------------------


def test_signatures_are_compared_with_compare_digest_before_any_answer() -> None:
    tree = ast.parse((ROOT / "receiver/signature.py").read_text(encoding="utf-8"))
    [verify_def] = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "verify"]
    digests = [
        n.lineno
        for n in ast.walk(verify_def)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "compare_digest"
    ]
    matches = [
        n.lineno
        for n in ast.walk(verify_def)
        if isinstance(n, ast.Return) and isinstance(n.value, ast.Name) and n.value.id.startswith("MATCHED_")
    ]
    # Two comparisons (current, previous), both made before either result is returned
    assert len(digests) == 2 and len(matches) == 2
    assert max(digests) < min(matches)
    # and no plain == / != anywhere in the module (a digest compared with == leaks timing)
    assert not [
        n for n in ast.walk(tree) if isinstance(n, ast.Compare) and isinstance(n.ops[0], ast.Eq | ast.NotEq)
    ]


def test_both_secrets_are_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(real(a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    secrets = WebhookSecrets("new", "old")
    body = b'{"a": 1}'
    for secret, matched in (("new", MATCHED_CURRENT), ("old", MATCHED_PREVIOUS)):
        calls.clear()
        assert verify(secrets, body, sign(secret, body)) == matched
        assert len(calls) == 2
    calls.clear()
    with pytest.raises(BadSignature, match="does not match the body"):
        verify(secrets, body, sign("other", body))
    assert calls == [False, False]


# -- secret rotation ----------------------------------------------------------------------------


def rotation_settings(aws_settings: AwsSettings, queue_url: str, previous: str | None) -> ReceiverSettings:
    return ReceiverSettings(
        aws=aws_settings, queue_url=queue_url, webhook_secret="new-secret", webhook_secret_previous=previous
    )


async def post_signed(client: Any, body: bytes, secret: str) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", "X-Hub-Signature": sign(secret, body)}
    async with client.post("/webhooks/jira", data=body, headers=headers) as response:
        return response.status, await response.json()


def previous_matches() -> float:
    return REGISTRY.get_sample_value("jiralake_receiver_previous_secret_matches_total") or 0.0


async def test_during_a_rotation_both_secrets_are_accepted_and_the_previous_is_counted(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    # GIVEN a receiver with a current and a previous secret
    settings = rotation_settings(aws_settings, queues.queue_url, "old-secret")
    bodies = [
        jira_fixtures.raw(name)
        for name in (
            "mattermost-plugin-jira__webhook-issue-created.json",
            "zulip__issue_created_with_unicode.json",
        )
    ]
    before = previous_matches()
    async with aws.sqs_client(aws_settings) as sqs:
        app = build_app(settings, sqs, clock_ms=lambda: RECEIVED_AT_MS)
        async with TestClient(TestServer(app)) as client:
            with structlog.testing.capture_logs() as logs:
                # WHEN one webhook is signed with each, and one with neither
                current = await post_signed(client, bodies[0], "new-secret")
                previous = await post_signed(client, bodies[1], "old-secret")
                neither = await post_signed(client, bodies[1], "some-other-secret")
    # THEN the first two are accepted, the third refused, and nothing but those two is queued
    assert (current[0], current[1]["status"]) == (202, "accepted")
    assert (previous[0], previous[1]["status"]) == (202, "accepted")
    assert neither == (401, {"status": "unauthorized", "reason": "X-Hub-Signature does not match the body"})
    assert len(await drain(aws_settings, queues.queue_url)) == 2
    # AND the log says which secret matched (never its value), and the previous one is counted once
    webhooks = [entry for entry in logs if entry["event"] == "webhook"]
    assert [entry.get("signed_with") for entry in webhooks] == ["current", "previous", None]
    assert previous_matches() == before + 1
    assert "old-secret" not in repr(logs) and "new-secret" not in repr(logs)


def test_previous_secret_settings() -> None:
    base = {"JIRALAKE_QUEUE_URL": "https://sqs.example/q.fifo"}
    both = ReceiverSettings.from_env(
        {**base, "JIRALAKE_WEBHOOK_SECRET": "a", "JIRALAKE_WEBHOOK_SECRET_PREVIOUS": "b"}
    )
    assert both.secrets == WebhookSecrets("a", "b")
    assert "'a'" not in repr(both) and "'b'" not in repr(both) and "b" not in repr(both.secrets).split("(")[1]
    assert ReceiverSettings.from_env({**base, "JIRALAKE_WEBHOOK_SECRET": "a"}).secrets == WebhookSecrets("a")
    message = "JIRALAKE_WEBHOOK_SECRET_PREVIOUS is set but JIRALAKE_WEBHOOK_SECRET is not"
    with pytest.raises(ConfigError, match=message):
        ReceiverSettings.from_env({**base, "JIRALAKE_WEBHOOK_SECRET_PREVIOUS": "b"})
    with pytest.raises(ConfigError, match=message):
        ReceiverSettings.from_env({**base, "JIRALAKE_WEBHOOK_SECRET_PREVIOUS": "b"}, allow_unsigned=True)


# -- no secrets in logs -------------------------------------------------------------------------

WEBHOOK_SECRET = "whsec-current-7f3a9c"
PREVIOUS_SECRET = "whsec-previous-21b8e0"
AWS_SECRET = "aws-secret-key-Zq81LmN0pQ"


async def test_no_secret_or_signature_reaches_the_receiver_log(
    aws_settings: AwsSettings, queues: QueuePair
) -> None:
    # GIVEN `jiralake receiver` logging at DEBUG, with known secrets and AWS keys in its environment
    port, admin_port = free_port(), free_port()
    env = dict(
        os.environ,
        JIRALAKE_QUEUE_URL=queues.queue_url,
        JIRALAKE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        JIRALAKE_WEBHOOK_SECRET_PREVIOUS=PREVIOUS_SECRET,
        JIRALAKE_RECEIVER_ADMIN_PORT=str(admin_port),
        AWS_ACCESS_KEY_ID="AKIAEXAMPLEKEYID0001",
        AWS_SECRET_ACCESS_KEY=AWS_SECRET,
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jiralake", "--log-level", "DEBUG", "receiver",
        "--host", "127.0.0.1", "--port", str(port),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stderr is not None
    logs = LogLines(child.stderr)
    body = jira_fixtures.raw(ISSUE_FIXTURE)
    signatures = [sign(WEBHOOK_SECRET, body), sign(PREVIOUS_SECRET, body), sign("wrong", body), "sha256=zz"]
    try:
        started = await logs.wait_for("receiver_started")
        assert (started["admin_host"], started["rotation_in_progress"]) == ("127.0.0.1", True)
        # WHEN it gets good, previous-secret, wrong and malformed signatures
        url = f"http://127.0.0.1:{port}/webhooks/jira"
        statuses = []
        async with aiohttp.ClientSession() as http:
            for signature in signatures:
                headers = {"Content-Type": "application/json", "X-Hub-Signature": signature}
                async with http.post(url, data=body, headers=headers) as response:
                    statuses.append(response.status)
        await logs.wait_for("sqs_batch_sent")
    finally:
        child.terminate()
        await asyncio.wait_for(child.wait(), 30)
    assert statuses == [202, 202, 401, 401]
    # THEN no secret, key or signature value appears anywhere in what it logged
    text = "\n".join(logs.raw)
    assert "webhook_queued" in text and "receiver_stopped" in text
    for secret in (WEBHOOK_SECRET, PREVIOUS_SECRET, AWS_SECRET, *(s.split("=", 1)[1] for s in signatures)):
        assert secret not in text
    assert [line.get("signed_with") for line in logs.lines if line.get("event") == "webhook"] == [
        "current",
        "previous",
        None,
        None,
    ]


def test_every_service_logs_through_the_redacting_configuration() -> None:
    # The CLI configures logging once for every command (receiver, consumer, export, backfill, ...):
    # keys that name a secret, and passwords inside URLs, never reach the output.
    out = io.StringIO()
    with redirect_stderr(out):
        jl_logging.configure("DEBUG", json=True)
        try:
            structlog.get_logger().info(
                "probe",
                aws_secret_access_key=AWS_SECRET,
                webhook_secret=WEBHOOK_SECRET,
                x_hub_signature="sha256=abc123def",
                api_token="tok-123456",
                password="pw-98765",
                error="could not connect to postgresql://jiralake:pg-pass-4321@db:5432/jiralake",
            )
        finally:
            structlog.reset_defaults()
    line = out.getvalue()
    assert '"event": "probe"' in line
    for secret in (AWS_SECRET, WEBHOOK_SECRET, "abc123def", "tok-123456", "pw-98765", "pg-pass-4321"):
        assert secret not in line
    assert "postgresql://jiralake:[redacted]@db:5432/jiralake" in line
    cli = ast.parse((ROOT / "jiralake/cli.py").read_text(encoding="utf-8"))
    assert any(
        isinstance(n, ast.Attribute) and n.attr == "configure" and getattr(n.value, "id", "") == "jl_logging"
        for n in ast.walk(cli)
    )


# -- admin ports, limits, timeouts ---------------------------------------------------------------


ENV = {
    "JIRALAKE_QUEUE_URL": "https://sqs.example/q.fifo",
    "JIRALAKE_DLQ_URL": "https://sqs.example/d.fifo",
    "JIRALAKE_WEBHOOK_SECRET": "s",
    "JIRALAKE_BUCKET": "bkt",
}
OPENED = {
    "JIRALAKE_RECEIVER_ADMIN_HOST": "0.0.0.0",
    "JIRALAKE_CONSUMER_ADMIN_HOST": "0.0.0.0",
    "JIRALAKE_EXPORT_ADMIN_HOST": "0.0.0.0",
}


def test_the_receiver_admin_port_listens_on_loopback_by_default() -> None:
    # The webhook port stays on all interfaces (Jira must reach it); /metrics does not.
    assert ReceiverSettings.from_env(ENV).host == "0.0.0.0"
    assert ReceiverSettings.from_env(ENV).admin_host == "127.0.0.1"
    assert ReceiverSettings.from_env({**ENV, **OPENED}).admin_host == "0.0.0.0"


def test_consumer_and_exporter_admin_ports_listen_on_loopback_by_default() -> None:
    assert ConsumerSettings.from_env(ENV).admin_host == "127.0.0.1"
    assert ExporterSettings.from_env(ENV).admin_host == "127.0.0.1"
    assert ConsumerSettings.from_env({**ENV, **OPENED}).admin_host == "0.0.0.0"
    assert ExporterSettings.from_env({**ENV, **OPENED}).admin_host == "0.0.0.0"


def test_the_receiver_sets_explicit_request_and_header_limits(aws_settings: AwsSettings) -> None:
    settings = ReceiverSettings(aws=aws_settings, queue_url="https://sqs.example/q.fifo", webhook_secret="s")
    options = server_options(settings)
    assert options["max_line_size"] == options["max_field_size"] == 8190
    assert options["max_headers"] == 100
    assert 0 < options["keepalive_timeout"] < 600 and 0 < options["lingering_time"] <= 5
    assert 0 < settings.body_timeout_s < 600
    app = build_app(settings, sqs=None)  # type: ignore[arg-type]  # only the app's limits are read
    assert app._client_max_size == settings.max_body_bytes  # noqa: SLF001


async def test_aws_clients_carry_finite_timeouts_and_bounded_retries(aws_settings: AwsSettings) -> None:
    async with aws.sqs_client(aws_settings) as sqs, aws.s3_client(aws_settings) as s3:
        for client in (sqs, s3):
            config: Any = client.meta.config
            assert 0 < config.connect_timeout < 120 and 0 < config.read_timeout < 120
            assert config.retries is not None and config.retries["total_max_attempts"] <= 5


async def test_postgres_connections_carry_finite_timeouts(db_settings: DatabaseSettings) -> None:
    conn = await db.connect(db_settings)
    await conn.close()
    pool = await db.create_pool(db_settings, min_size=0)
    try:
        kwargs = pool._connect_kwargs  # noqa: SLF001 - what every pooled connection is opened with
        assert (
            kwargs["timeout"] == db.CONNECT_TIMEOUT_S
            and kwargs["command_timeout"] == db.POOL_COMMAND_TIMEOUT_S
        )
    finally:
        await pool.close()
    assert math.isfinite(db.CONNECT_TIMEOUT_S) and math.isfinite(db.POOL_COMMAND_TIMEOUT_S)
    # db.connect() passes the connect timeout unless the caller gives its own
    tree = ast.parse((ROOT / "shared/db.py").read_text(encoding="utf-8"))
    defaults = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "setdefault"
    ]
    assert (
        sum(1 for n in defaults if isinstance(n.args[0], ast.Constant) and n.args[0].value == "timeout") == 2
    )


# aiohttp ClientSessions made without timeout=: aiohttp's default (total 300 s) applies.
CLIENT_SESSION_ALLOWLIST = {"ops/demo.py": "posts the demo's fixtures to the local receiver"}


def test_every_http_client_session_has_a_timeout() -> None:
    without: set[str] = set()
    for rel, tree in product_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "ClientSession":
                if not any(k.arg == "timeout" for k in node.keywords):
                    without.add(rel)
    assert without == set(CLIENT_SESSION_ALLOWLIST)
    total = aiohttp.ClientTimeout().total  # what those sessions get
    default_total = aiohttp.client.DEFAULT_TIMEOUT.total
    assert total is None and default_total is not None and math.isfinite(default_total)
