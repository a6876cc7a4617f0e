"""Bad configuration is refused at start: exit 2 and one line on stderr naming the variable, never a
traceback, never the password of a ``DATABASE_URL``."""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backfill.settings import JiraSettings
from exporter.settings import ExporterSettings
from shared import argtypes
from shared.settings import AwsSettings, ConfigError, DatabaseSettings
from tests.conftest import empty_database
from tests.test_cli_log_level import _jiralake

CONFIG_ERROR = "jiralake: configuration error: "
DB_PORT = (
    "DATABASE_URL has a port that is not a number 1..65535 (percent-encode any #, ? or / in the password)"
)
QUEUES = {
    "JIRALAKE_QUEUE_URL": "http://127.0.0.1:1/1/q.fifo",
    "JIRALAKE_DLQ_URL": "http://127.0.0.1:1/1/dlq.fifo",
    "JIRALAKE_WEBHOOK_SECRET": "s",
}
HOST_LABELS = "has a host name with an empty label (a..b) or a label over 63 characters"
BUCKET_RULES = (
    "is not a valid S3 bucket name: 3-63 lowercase letters, digits, dots and hyphens, beginning and "
    "ending with a letter or digit"
)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The message of a configuration error: exit 2, one line on stderr, nothing on stdout."""
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith(CONFIG_ERROR), line
    return line.removeprefix(CONFIG_ERROR)


# -- DATABASE_URL --


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "postgresql://postgres:S3cretPW@[::1/db",
            "DATABASE_URL is not a valid URL (an IPv6 address goes in [ ]; percent-encode any [ or ] in "
            "the password)",
        ),
        ("postgresql://postgres:S3cretPW@127.0.0.1:5432:5433/db", DB_PORT),
        ("postgresql://postgres:S3cretPW@/db?host=127.0.0.1&port=abc", DB_PORT),
        ("postgresql://postgres:S3cretPW@/db?host=127.0.0.1:x", DB_PORT),
        ("postgresql://postgres:S3cretPW@127.0.0.1:²/db", DB_PORT),
        ("postgresql://postgres:S3cretPW@[::1]:5x/db", DB_PORT),
        # a raw @ in the password: asyncpg reads the hosts after the first @, "ret:12@127.0.0.1:5432"
        ("postgresql://postgres:S3c@ret:12@127.0.0.1:5432/db", DB_PORT),
        ("postgresql://postgres:S3cretPW@h1,/db", "DATABASE_URL has an empty host in its host list"),
        ("postgresql://postgres:S3cretPW@db..example.com/db", f"DATABASE_URL {HOST_LABELS}"),
        (
            "postgresql://postgres:S3cretPW@127.0.0.1/db?target_session_attrs=master",
            "DATABASE_URL's target_session_attrs must be one of any, primary, standby, prefer-standby, "
            "read-write, read-only, got 'master'",
        ),
        (
            "postgresql://postgres:S3cretPW@127.0.0.1/db?sslmode=verify_fulll",
            "DATABASE_URL's sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full, "
            "got 'verify_fulll'",
        ),
        (
            "postgresql://postgres:S3cretPW@127.0.0.1/db?sslnegotiation=tls",
            "DATABASE_URL's sslnegotiation must be one of postgres, direct, got 'tls'",
        ),
        (
            "postgresql://postgres:S3cretPW@127.0.0.1/db?sslmode=verify-full&sslrootcert=/etc/rds/missing.pem",
            "DATABASE_URL's sslrootcert is not a file this process can see: '/etc/rds/missing.pem'",
        ),
        (f"postgresql://postgres:S3cretPW@/db?host={'h' * 64}.example.com", f"DATABASE_URL {HOST_LABELS}"),
        (
            "postgresql://postgres:S3cretPW@127.0.0.1/db?sslmode",
            "DATABASE_URL has a query that is not name=value pairs joined by & (percent-encode any #, ? "
            "or / in the password)",
        ),
    ],
)
def test_a_malformed_database_url_is_one_line_without_the_password(url: str, message: str) -> None:
    # WHEN a command that needs the database starts with a DATABASE_URL asyncpg would choke on
    result = _jiralake("setup", "--skip-queues", DATABASE_URL=url)
    # THEN one line names the problem, exit 2, and no part of the password is repeated
    assert one_line(result) == message
    assert "S3c" not in result.stderr and "ret:12" not in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PGHOST": "db..example.com"}, f"PGHOST {HOST_LABELS}"),
        (
            {"PGHOST": "/var/run/postgresql,h1", "PGPORT": "5432,abc"},
            "PGPORT is not a port number 1..65535, got 'abc'",
        ),
        ({"PGPORT": "70000"}, "PGPORT is not a port number 1..65535, got '70000'"),
        (
            {"PGSSLMODE": "on"},
            "PGSSLMODE must be one of disable, allow, prefer, require, verify-ca, verify-full, got 'on'",
        ),
        ({"PGSSLNEGOTIATION": "tls"}, "PGSSLNEGOTIATION must be one of postgres, direct, got 'tls'"),
        (
            {"PGTARGETSESSIONATTRS": "read_write"},
            "PGTARGETSESSIONATTRS must be one of any, primary, standby, prefer-standby, read-write, "
            "read-only, got 'read_write'",
        ),
    ],
)
def test_libpq_variables_asyncpg_reads_are_checked_like_database_url(
    env: dict[str, str], message: str
) -> None:
    # WHEN a command that needs the database starts without DATABASE_URL, on PGHOST/PGPORT asyncpg
    # would fail on with a bare ValueError or UnicodeError THEN one line names the variable
    result = _jiralake("history", "prune", "--older-than", "30", **env)
    assert one_line(result) == message


@pytest.mark.parametrize(
    "env",
    [
        # a URL without a port: asyncpg reads PGPORT (and PGHOST where it has no host)
        {"DATABASE_URL": "postgresql://postgres@127.0.0.1/db", "PGPORT": "abc"},
        {"DATABASE_URL": "postgresql:///db", "PGHOST": "a..b"},
        # blank or list values the checks above take for unset, which asyncpg reads as they are
        {"PGPORT": " "},
        {"PGPORT": "5432,"},
        {"PGHOST": "127.0.0.1,"},
        {"PGSSLMODE": " "},
    ],
    ids=str,
)
def test_libpq_variables_asyncpg_cannot_use_are_one_line_not_a_traceback(env: dict[str, str]) -> None:
    # WHEN a command that needs the database starts on them THEN one line, exit 2, not exit 70 and a
    # traceback (an audit found these crashing, each past the checks above)
    result = _jiralake("history", "prune", "--older-than", "30", "--dry-run", **env)
    assert one_line(result).startswith(
        "PostgreSQL's connection parameters (DATABASE_URL and the PG* variables it leaves out: PGHOST, "
        "PGPORT, PGSSLMODE, ...) are not usable: "
    )


MISSING_PEM = "/nonexistent/jiralake-ca.pem"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PGSSLMODE": "verify-full", "PGSSLROOTCERT": MISSING_PEM},
            f"PGSSLROOTCERT is not a file this process can see: '{MISSING_PEM}' "
            "(sslmode verify-full reads it)",
        ),
        (
            {"DATABASE_URL": "postgresql://u@h/db?sslmode=require", "PGSSLCRL": MISSING_PEM},
            f"PGSSLCRL is not a file this process can see: '{MISSING_PEM}' (sslmode require reads it)",
        ),
        (  # a client certificate is read from sslmode "allow" up, so also at the default "prefer"
            {"PGSSLCERT": MISSING_PEM},
            f"PGSSLCERT is not a file this process can see: '{MISSING_PEM}' (sslmode prefer reads it)",
        ),
        (  # with the certificate it goes with
            {"PGSSLCERT": __file__, "PGSSLKEY": MISSING_PEM},
            f"PGSSLKEY is not a file this process can see: '{MISSING_PEM}' (sslmode prefer reads it)",
        ),
    ],
    ids=str,
)
def test_a_libpq_certificate_variable_naming_no_file_is_one_line_naming_it(
    env: dict[str, str], message: str
) -> None:
    # WHEN a command that needs the database starts with one THEN one line names the variable and the
    # path, exit 2 (asyncpg's own error is "FileNotFoundError: [Errno 2] No such file or directory")
    result = _jiralake("history", "prune", "--older-than", "30", "--dry-run", **env)
    assert one_line(result) == message


@pytest.mark.parametrize(
    "env",
    [
        {"PGSSLROOTCERT": MISSING_PEM},  # "prefer" verifies nothing: asyncpg never opens it
        {"DATABASE_URL": "postgresql://u@h/db?sslmode=disable", "PGSSLCERT": MISSING_PEM},
        {"PGSSLKEY": MISSING_PEM},  # a key without a certificate: asyncpg never opens it
        # Unix sockets only, no sslmode: asyncpg sets up no TLS at all
        {"DATABASE_URL": "postgresql://u@/db?host=/var/run/postgresql", "PGSSLCERT": MISSING_PEM},
        {"PGHOST": "/var/run/postgresql", "PGSSLCERT": MISSING_PEM},
        {
            "DATABASE_URL": f"postgresql://u@h/db?sslmode=verify-full&sslrootcert={__file__}",
            "PGSSLROOTCERT": MISSING_PEM,
        },
    ],
    ids=str,
)
def test_certificate_variables_asyncpg_would_not_read_are_not_checked(env: dict[str, str]) -> None:
    DatabaseSettings.from_env(env)


def test_database_urls_asyncpg_reads_are_still_accepted() -> None:
    for url in (
        "postgresql://u:p%23w@h1:5432,h2:5433/db",
        "postgresql://[::1]:5432/db",
        "postgresql://h:%35432/db",
        "postgresql:///db?host=h1,h2&port=5432,5433",
        "postgres:///db?host=/var/run/postgresql",
        "postgresql://u:p@h/db?sslmode=require&application_name=jiralake",
        "postgresql://u:p@h/db?sslmode=verify_ca&sslnegotiation=postgres&target_session_attrs=read-write",
    ):
        assert DatabaseSettings(url=url).url == url


def test_up_refuses_a_malformed_database_url_without_the_password(tmp_path: Path) -> None:
    # GIVEN a raw # in the password: the URL's user-info ends there, "Pa55" would be read as the port
    url = "postgresql://postgres:Pa55#wXrd@127.0.0.1/db"
    # WHEN the local stack starts on it
    result = _jiralake("up", "--port", "0", "--state-dir", str(tmp_path), DATABASE_URL=url)
    # THEN it is the same configuration error as in every command, without the password
    assert one_line(result) == DB_PORT
    assert "Pa55" not in result.stderr and "wXrd" not in result.stderr


# -- AWS_ENDPOINT_URL --


@pytest.mark.parametrize("command", [("queue", "stats"), ("consumer",), ("receiver",)])
@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("not a url", "AWS_ENDPOINT_URL must be an http(s) URL like http://127.0.0.1:5000"),
        ("http://[::1", "AWS_ENDPOINT_URL must be an http(s) URL like http://127.0.0.1:5000"),
        (
            "http://local_stack:4566",
            "AWS_ENDPOINT_URL has a host that is not a name (letters, digits, -, .) or an IP",
        ),
    ],
)
def test_a_bad_aws_endpoint_is_one_line_in_every_aws_command(
    command: tuple[str, ...], endpoint: str, message: str
) -> None:
    result = _jiralake(*command, AWS_ENDPOINT_URL=endpoint, **QUEUES)
    assert one_line(result) == message


@pytest.mark.parametrize("command", [("queue", "stats"), ("consumer",), ("receiver",)])
def test_a_region_botocore_refuses_is_a_configuration_error_in_every_aws_command(
    command: tuple[str, ...],
) -> None:
    # WHEN an AWS command starts with a region botocore refuses at its first call THEN exit 2, one line
    result = _jiralake(*command, AWS_REGION="garbage region!!", **QUEUES)
    assert one_line(result) == (
        "AWS_REGION (or AWS_DEFAULT_REGION) must be a region name like eu-west-1, got 'garbage region!!'"
    )


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("ftp://127.0.0.1:21", "must be an http(s) URL"),
        ("http://:4566", "must be an http(s) URL"),
        ("http://localhost:45x6", "has a port that is not a number 1..65535"),
        ("http://localhost:0", "has a port that is not a number 1..65535"),
        ("http://localhost:99999", "has a port that is not a number 1..65535"),
        ("http://[fe80::1%25eth[0]]:1", "has a host that is not a name"),  # an IPv6 zone botocore refuses
    ],
)
def test_aws_endpoints_botocore_would_refuse_are_config_errors(endpoint: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^AWS_ENDPOINT_URL {re.escape(message)}"):
        AwsSettings.from_env({"AWS_ENDPOINT_URL": endpoint})


def test_local_and_real_aws_endpoints_are_accepted() -> None:
    for endpoint in (
        "http://127.0.0.1:5000",
        "http://[::1]:5000",
        "http://localhost:4566/",
        "http://moto-server.local.:5000",
        "https://s3.sa-east-1.amazonaws.com",
    ):
        assert AwsSettings.from_env({"AWS_ENDPOINT_URL": endpoint}).endpoint_url == endpoint


# -- JIRALAKE_JIRA_URL --

JIRA_BASE_URL = (
    "JIRALAKE_JIRA_URL must be the site's base URL (https://example.atlassian.net, or a Data Center's with "
    "its context path: https://jira.example.com/jira), without a ? query or # part"
)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1", "JIRALAKE_JIRA_URL must be an http(s) URL like https://example.atlassian.net"),
        ("https://acme..atlassian.net", f"JIRALAKE_JIRA_URL {HOST_LABELS}"),
        ("https://jira.example.com:443x", "JIRALAKE_JIRA_URL has a port that is not a number 1..65535"),
        ("https://acme.atlassian.net/browse/X-1?focusedCommentId=7", JIRA_BASE_URL),
        ("https://acme.atlassian.net/#", JIRA_BASE_URL),
        ("https://jira.example.com/jira?", JIRA_BASE_URL),
    ],
)
def test_a_bad_jira_url_is_refused_at_start_not_retried(url: str, message: str) -> None:
    # WHEN a backfill starts with it THEN it stops at once (no request, no retries) in one line
    result = _jiralake("backfill", "--dry-run", JIRALAKE_JIRA_URL=url, JIRALAKE_JIRA_PAT="NjM0-pat", **QUEUES)
    assert one_line(result) == message


@pytest.mark.parametrize(
    "credentials",
    [
        {"JIRALAKE_JIRA_PAT": "NjM0\nSECRETPART"},
        {"JIRALAKE_JIRA_EMAIL": "me@example.com", "JIRALAKE_JIRA_API_TOKEN": "tok\x1bSECRETPART"},
    ],
)
def test_a_credential_with_a_control_character_is_one_line_and_never_echoed(
    credentials: dict[str, str],
) -> None:
    result = _jiralake(
        "backfill", "--dry-run", JIRALAKE_JIRA_URL="https://acme.atlassian.net", JIRALAKE_QUEUE_URL="q.fifo",
        **credentials,
    )  # fmt: skip
    name = [n for n in credentials if n != "JIRALAKE_JIRA_EMAIL"][0]
    assert one_line(result) == f"{name} holds a control character (a line break pasted into it?); remove it"
    assert "SECRETPART" not in result.stderr


@pytest.mark.parametrize("name", ["JIRALAKE_WEBHOOK_SECRET", "JIRALAKE_WEBHOOK_SECRET_PREVIOUS"])
def test_a_webhook_secret_with_a_control_character_is_one_line_and_never_echoed(name: str) -> None:
    # GIVEN a secret with a line break inside (two values pasted into one): no signature would match
    env = {**QUEUES, name: "first\nSECRETPART"}
    # WHEN the receiver starts THEN it refuses to, in one line, rather than answer every webhook 401
    result = _jiralake("receiver", **env)
    assert one_line(result) == f"{name} holds a control character (a line break pasted into it?); remove it"
    assert "SECRETPART" not in result.stderr


def test_a_jira_url_with_a_port_and_a_context_path_is_accepted() -> None:
    env = {"JIRALAKE_JIRA_URL": "https://jira.example.com:8443/jira/", "JIRALAKE_JIRA_PAT": "NjM0-pat"}
    assert JiraSettings.from_env(env).url == "https://jira.example.com:8443/jira"


# -- the exporter's schedule and bucket --


def test_a_schedule_that_never_fires_is_one_line() -> None:
    expected = "schedule '0 0 31 2 *' never fires (no such date)"
    flag = _jiralake("export", "--schedule", "0 0 31 2 *", "--admin-port", "0", "--bucket", "lake-bucket")
    assert one_line(flag) == expected
    env = _jiralake("export", JIRALAKE_EXPORT_SCHEDULE="0 0 31 2 *", JIRALAKE_BUCKET="lake-bucket")
    assert one_line(env) == expected


@pytest.mark.parametrize(
    ("name", "value", "line"),
    [
        ("JIRALAKE_MAX_RECEIVE_COUNT", "1001", "must be <= 1000, got 1001"),
        ("JIRALAKE_VISIBILITY_TIMEOUT_S", "43201", "must be <= 43200, got 43201"),
    ],
)
def test_setup_refuses_what_sqs_would_refuse_as_a_configuration_error(
    name: str, value: str, line: str
) -> None:
    # A configuration error (exit 2) before any call, rather than SQS's refusal at CreateQueue (exit 1)
    result = _jiralake(
        "setup", JIRALAKE_QUEUE_URL="jiralake.fifo", JIRALAKE_DLQ_URL="jiralake-dlq.fifo", **{name: value}
    )
    assert one_line(result) == f"{name} {line}"


@pytest.mark.parametrize("prefix", ["lake/../other", "./lake", "lake/.", ".."])
def test_a_prefix_with_a_dot_folder_is_refused(prefix: str) -> None:
    # S3 keeps the folder literally, Athena's LOCATION would normalise it away
    with pytest.raises(ConfigError, match=r"with no empty, '\.' or '\.\.' folder"):
        ExporterSettings.from_env({"JIRALAKE_BUCKET": "lake-bucket", "JIRALAKE_EXPORT_PREFIX": prefix})


def test_a_prefix_with_dots_inside_a_name_is_accepted() -> None:
    env = {"JIRALAKE_BUCKET": "lake-bucket", "JIRALAKE_EXPORT_PREFIX": "lake.v2/..hidden/x."}
    assert ExporterSettings.from_env(env).prefix == "lake.v2/..hidden/x."


@pytest.mark.parametrize(
    "schedule", ["59 23 31 12 * 0 2026", "*/5 * * * * *", "R 3 * * *", "0 R(1-4) * * *", "r 3 * * *"]
)
def test_a_schedule_with_seconds_a_year_or_a_random_field_is_refused(schedule: str) -> None:
    # A year field stops firing some day (the running loop would then crash); seconds are no export
    # rate; croniter's random field draws again at every next time, so it can fire twice a day
    with pytest.raises(ConfigError, match=r"not a valid cron expression \(5 fields: minute hour day month"):
        ExporterSettings.from_env({"JIRALAKE_BUCKET": "lake-bucket", "JIRALAKE_EXPORT_SCHEDULE": schedule})


@pytest.mark.parametrize("schedule", ["0 3 29 2 *", "@hourly", "@daily", "0 3 * MAR THU", "0 3 * * FRI"])
def test_a_schedule_that_fires_rarely_or_a_nickname_is_accepted(schedule: str) -> None:
    env = {"JIRALAKE_BUCKET": "lake-bucket", "JIRALAKE_EXPORT_SCHEDULE": schedule}
    assert ExporterSettings.from_env(env).schedule == schedule


def test_a_bucket_name_s3_would_refuse_never_reaches_the_athena_ddl() -> None:
    # WHEN the DDL is asked for a bucket that would break out of its LOCATION literal
    result = _jiralake("export", "--athena-ddl", "--bucket", "x'; DROP TABLE t; --")
    # THEN no SQL is printed, and one line says why
    assert one_line(result) == f'bucket "x\'; DROP TABLE t; --" {BUCKET_RULES}'
    assert one_line(_jiralake("export", "--athena-ddl", JIRALAKE_BUCKET="Lake_Bucket")) == (
        f"bucket 'Lake_Bucket' {BUCKET_RULES}"
    )
    # AND setup, which creates the bucket on a local endpoint, refuses it the same way
    assert one_line(_jiralake("setup", **QUEUES, JIRALAKE_BUCKET="Lake_Bucket")) == (
        f"bucket 'Lake_Bucket' {BUCKET_RULES}"
    )


@pytest.mark.parametrize(
    "bucket", ["ab", "a" * 64, "-lake", "lake-", ".lake", "Lake", "lake_bucket", "lake bucket"]
)
def test_bucket_names_outside_s3_rules_are_refused(bucket: str) -> None:
    with pytest.raises(ConfigError, match=f"^bucket '{bucket}' is not a valid S3 bucket name"):
        ExporterSettings.from_env({"JIRALAKE_BUCKET": bucket})


@pytest.mark.parametrize("bucket", ["abc", "a" * 63, "my.lake-2024", "1lake9"])
def test_bucket_names_within_s3_rules_are_accepted(bucket: str) -> None:
    assert ExporterSettings.from_env({"JIRALAKE_BUCKET": bucket}).bucket == bucket


def test_ctrl_c_while_the_commands_load_exits_130_without_a_traceback() -> None:
    # GIVEN a real SIGINT delivered while the command line is being built (it imports every command's
    # modules: the first ~0.5 s of any command, where a Ctrl-C most often lands)
    script = (
        "import os, signal, sys\n"
        "import jiralake.cli as cli\n"
        "load = cli.importlib.import_module\n"
        "def interrupted(name):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return load(name)\n"
        "cli.importlib.import_module = interrupted\n"
        "sys.exit(cli.main(['queue', 'stats']))\n"
    )
    # THEN it exits 130, as a Ctrl-C later does, and prints no traceback
    assert_exits_130_silently(script)


def test_ctrl_c_while_python_imports_the_command_line_exits_130_without_a_traceback() -> None:
    # GIVEN a real SIGINT delivered while the command line's own imports run (structlog, asyncpg, ...),
    # before its main() and its error handling exist
    script = (
        "import os, signal, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'structlog':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from jiralake.entry import main\n"
        "sys.exit(main())\n"
    )
    # THEN it exits 130 and prints nothing
    assert_exits_130_silently(script)


def assert_exits_130_silently(script: str) -> None:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "")


# -- hosts to listen on --


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("receiver", "--host", "bad..host"), {}, f"--host {HOST_LABELS}"),
        (("receiver",), {"JIRALAKE_RECEIVER_HOST": "bad..host"}, f"JIRALAKE_RECEIVER_HOST {HOST_LABELS}"),
        (
            ("receiver",),
            {"JIRALAKE_RECEIVER_ADMIN_HOST": "x" * 64},
            f"JIRALAKE_RECEIVER_ADMIN_HOST {HOST_LABELS}",
        ),
        (
            ("consumer",),
            {"JIRALAKE_CONSUMER_ADMIN_HOST": ".lan"},
            f"JIRALAKE_CONSUMER_ADMIN_HOST {HOST_LABELS}",
        ),
        (
            ("export", "--bucket", "lake-bucket"),
            {"JIRALAKE_EXPORT_ADMIN_HOST": "a..b"},
            f"JIRALAKE_EXPORT_ADMIN_HOST {HOST_LABELS}",
        ),
    ],
)
def test_a_host_name_the_resolver_refuses_is_one_line(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    # WHEN a service starts with a host to listen on that has an empty or too long label (a typo)
    result = _jiralake(*args, **env, **QUEUES)
    # THEN it stops at once with one line naming the setting, not a UnicodeError traceback
    assert one_line(result) == message


# -- the AWS configuration --


def test_a_missing_aws_profile_fails_only_the_commands_that_use_aws() -> None:
    # GIVEN a profile that does not exist (a typo in AWS_PROFILE)
    # WHEN the help is asked for THEN it is printed: the profile is read only when AWS is used
    help_text = _jiralake("--help", AWS_PROFILE="typo-profile")
    assert (help_text.returncode, help_text.stderr) == (0, "")
    # AND a command that uses AWS stops in one line naming the problem, not a traceback
    result = _jiralake("queue", "stats", AWS_PROFILE="typo-profile", **QUEUES)
    assert one_line(result) == (
        "the AWS configuration cannot be used: The config profile (typo-profile) could not be found"
    )


def test_an_aws_config_file_that_does_not_parse_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("[profile broken\nregion = us-east-1\n")
    result = _jiralake("dlq", "list", AWS_CONFIG_FILE=str(config), **QUEUES)
    assert one_line(result) == f"the AWS configuration cannot be used: Unable to parse config file: {config}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("consumer", "--pollers", "100000000"),
            "pollers (JIRALAKE_CONSUMER_POLLERS) must be between 1 and 32",
        ),
        (
            ("export", "--once", "--bucket", "lake-bucket", "--parts-in-flight", "1000000"),
            "parts in flight must be between 1 and 32",
        ),
    ],
)
def test_a_concurrency_past_its_ceiling_is_refused_at_start(args: tuple[str, ...], message: str) -> None:
    # WHEN a mistyped huge concurrency is asked for (it started that many tasks and connections, and
    # ignored Ctrl-C while it did) THEN it is refused in one line
    result = _jiralake(*args, **QUEUES)
    assert one_line(result) == f"{message}, got {args[-1]}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ("0", "must be more than 0 and at most 86400, got 0"),
        ("90000", "must be more than 0 and at most 86400, got 90000"),
        ("soon", None),
    ],
)
def test_an_idle_exit_that_is_no_duration_is_refused_at_start(env: str, message: str | None) -> None:
    # WHEN the consumer is told to exit after a wait for an idle queue that is no positive duration
    result = _jiralake("consumer", JIRALAKE_CONSUMER_EXIT_WHEN_IDLE_S=env, **QUEUES)
    # THEN it stops at once in one line naming the setting (never "exit at once" or "never")
    if message is None:
        assert one_line(result) == "JIRALAKE_CONSUMER_EXIT_WHEN_IDLE_S must be a number, got 'soon'"
    else:
        expected = "exit_when_idle_s (JIRALAKE_CONSUMER_EXIT_WHEN_IDLE_S, --exit-when-idle) " + message
        assert one_line(result) == expected
    # AND the option says so in argparse's words
    option = _jiralake("consumer", "--exit-when-idle", "-5", **QUEUES)
    assert option.returncode == 2
    assert option.stderr.splitlines()[-1] == (
        "jiralake consumer: error: argument --exit-when-idle: must be more than 0, got -5"
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ("forget-user", "--account-id", "a", "--account-id", "b"),
            "argument --account-id: given more than once; one per run",
        ),
        (
            ("forget-user", "--username", "a", "--username", "b"),
            "argument --username: given more than once; one per run",
        ),
        (
            ("forget-user", "--username", "a", "--pseudonym", "p", "--pseudonym", "q"),
            "argument --pseudonym: given more than once; one per run",
        ),
        (
            ("setup", "--skip-queues", "--skip-db"),
            "argument --skip-db: not allowed with argument --skip-queues",
        ),
    ],
)
def test_options_that_would_drop_an_argument_or_do_nothing_are_refused(
    args: tuple[str, ...], error: str
) -> None:
    # WHEN two people are named at once (argparse would keep the last and forget only that one), or
    # setup is told to skip both of its parts (exit 0, nothing done, nothing said)
    result = _jiralake(*args)
    # THEN argparse's one error line, exit 2, before anything runs
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == f"jiralake {args[0]}: error: {error}"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        # the schedule from the environment: --timezone and --admin-port are its own
        (("export", "--timezone", "UTC", "--admin-port", "0"), {"JIRALAKE_EXPORT_SCHEDULE": "0 3 * * *"}),
        # a variable set for every mode (compose, deploy/) is not refused where its mode does not run
        (
            ("export", "--once"),
            {
                "JIRALAKE_EXPORT_SCHEDULE": "0 3 * * *",
                "JIRALAKE_EXPORT_TIMEZONE": "Europe/Berlin",
                "JIRALAKE_EXPORT_ADMIN_PORT": "9999",
            },
        ),
        (
            ("export", "--athena-ddl"),
            {"JIRALAKE_EXPORT_PART_SIZE_MIB": "16", "JIRALAKE_EXPORT_PARTS_IN_FLIGHT": "2"},
        ),
    ],
)
def test_the_same_settings_from_the_environment_are_not_refused(
    args: tuple[str, ...], env: dict[str, str]
) -> None:
    # WHEN the settings an option would be refused for come from variables (JIRALAKE_BUCKET unset)
    result = _jiralake(*args, **env)
    # THEN the command goes past its options and stops only at the missing bucket
    assert one_line(result) == "JIRALAKE_BUCKET is not set (see the configuration table in README.md)"


def test_only_with_needs_an_option_that_can_tell_it_was_given() -> None:
    # GIVEN an option with a real default: given with that value, it would look not given
    parser = argparse.ArgumentParser()
    parser.add_argument("--wait", type=float, default=120.0)
    # WHEN a rule is put on it THEN that is refused when the parser is built
    with pytest.raises(ValueError, match="--wait defaults to 120.0: only_with cannot tell it was given"):
        argtypes.only_with(parser, "--wait", "with --demo", lambda args, environ: False)


@pytest.mark.parametrize(
    "args",
    [
        ("export", "--schedule", ""),
        ("export", "--once", "--timezone", " "),
        ("export", "--once", "--bucket", ""),
        ("receiver", "--host", ""),
        ("backfill", "--dry-run", "--jql", ""),
        ("reconcile", "--dry-run", "--jql", ""),
    ],
)
def test_an_empty_option_is_refused_not_taken_for_unset(args: tuple[str, ...]) -> None:
    # WHEN an option is given an empty value (an unset shell variable: --jql "$JQL") THEN it is refused,
    # rather than read as not given: a single export instead of a schedule, UTC, every interface, or
    # every issue in Jira
    result = _jiralake(*args, **QUEUES)
    assert result.returncode == 2
    option = next(a for a in args if a.startswith("--") and a != "--dry-run" and a != "--once")
    assert (
        result.stderr.splitlines()[-1] == f"jiralake {args[0]}: error: argument {option}: must not be empty"
    )


@pytest.mark.parametrize("name", ["America", "Etc", "../zoneinfo/UTC"])
def test_a_time_zone_that_is_a_folder_or_a_path_is_one_line(name: str) -> None:
    result = _jiralake("export", "--schedule", "0 3 * * *", "--timezone", name, "--bucket", "lake-bucket")
    assert one_line(result) == f"unknown time zone {name!r} (use an IANA name such as America/Sao_Paulo)"


@pytest.mark.parametrize("command", [("queue", "stats"), ("dlq", "list")])
def test_an_error_page_quoted_in_an_error_is_one_line(
    aws_settings: AwsSettings, command: tuple[str, ...]
) -> None:
    # GIVEN an endpoint with a path, where the server answers an HTML error page of several lines
    endpoint = f"{aws_settings.endpoint_url}/some/path"
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    # WHEN a command calls SQS there
    result = _jiralake(*command, AWS_ENDPOINT_URL=endpoint, **credentials, **QUEUES)
    # THEN the page is quoted on the command's one line, not printed as it came
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "<title>404 Not Found</title> <h1>Not Found</h1>" in result.stderr


# -- a database without the schema --


@pytest.mark.parametrize(
    "args",
    [("history", "prune", "--older-than", "30"), ("export", "--once", "--bucket", "lake-bucket")],
)
async def test_a_database_never_set_up_says_to_run_setup(pg_server_dsn: str, args: tuple[str, ...]) -> None:
    # GIVEN a database jiralake setup never ran on (or an upgrade deployed before its migrations)
    async with empty_database(pg_server_dsn, "unmigrated") as url:
        # WHEN a command that reads the tables runs on it
        result = await asyncio.to_thread(_jiralake, *args, DATABASE_URL=url, **QUEUES)
    # THEN its one line says what to do, after PostgreSQL's own words
    assert result.returncode == 1, result.stderr
    line = result.stderr.splitlines()[-1]
    assert "UndefinedTableError: relation " in line
    assert line.endswith(
        "; the database lacks jiralake's tables or a newer migration: run `jiralake setup --skip-queues` "
        "first (the migrations only; plain `jiralake setup` also creates the queues)"
    )


UNREACHABLE = {
    **QUEUES,
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/jiralake",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
}
SCHEDULED = "with --schedule (or JIRALAKE_EXPORT_SCHEDULE)"
TIMEZONE = f"{SCHEDULED}: it is the schedule's time zone; history/ is dated by the UTC day whatever it is"
NOT_DDL = "to an export, not with --athena-ddl"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("export", "--once", "--admin-port", "9999"), f"--admin-port applies only {SCHEDULED}"),
        (("export", "--admin-port", "0"), f"--admin-port applies only {SCHEDULED}"),
        (("export", "--athena-ddl", "--admin-port", "9092"), f"--admin-port applies only {SCHEDULED}"),
        (("export", "--once", "--timezone", "Europe/Berlin"), f"--timezone applies only {TIMEZONE}"),
        (("export", "--timezone", "UTC"), f"--timezone applies only {TIMEZONE}"),
        (("export", "--athena-ddl", "--timezone", "UTC"), f"--timezone applies only {TIMEZONE}"),
        (
            ("export", "--once", "--projection-start", "2024-01-01"),
            "--projection-start applies only with --athena-ddl: it shapes only the printed DDL",
        ),
        (
            ("export", "--schedule", "0 3 * * *", "--projection-start", "NOW-1YEARS"),
            "--projection-start applies only with --athena-ddl: it shapes only the printed DDL",
        ),
        (("export", "--athena-ddl", "--changed-since-last"), f"--changed-since-last applies only {NOT_DDL}"),
        (("export", "--athena-ddl", "--part-size-mib", "8"), f"--part-size-mib applies only {NOT_DDL}"),
        (("export", "--athena-ddl", "--parts-in-flight", "4"), f"--parts-in-flight applies only {NOT_DDL}"),
        (("up", "--fixtures", "tests/fixtures/jira-webhooks"), "--fixtures applies only with --demo"),
        (("up", "--demo-timeout", "120"), "--demo-timeout applies only with --demo"),
        (
            ("up", "--keep-running"),
            "--keep-running applies only with --demo (without --demo the stack keeps running)",
        ),
        (
            ("setup", "--skip-queues", "--max-receive-count", "3"),
            "--max-receive-count applies only when setup creates the queues, not with --skip-queues",
        ),
        (
            ("export", "--once", "--prefix", " "),
            "argument --prefix: must not be blank: give '' or / for the bucket's root",
        ),
    ],
)
def test_an_option_the_mode_would_ignore_is_a_usage_error(
    args: tuple[str, ...], error: str, tmp_path: Path
) -> None:
    # GIVEN every setting the command needs, so that only the option itself can stop it
    # WHEN an option is given where the mode chosen would not use it (or a prefix of spaces only,
    # which would read as unset and export under the default prefix)
    # (where the option were ignored, the run would stop at once: nothing listens at these addresses)
    extra = ("--host", "192.0.2.1", "--state-dir", str(tmp_path)) if args[0] == "up" else ()
    result = _jiralake(*args, *extra, **UNREACHABLE, JIRALAKE_BUCKET="lake-bucket")
    # THEN argparse's usage and one error line naming the option and the mode it needs, exit 2, before
    # anything runs, rather than a run as if it had not been given
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.splitlines()[0].startswith(f"usage: jiralake {args[0]} ")
    assert result.stderr.splitlines()[-1] == f"jiralake {args[0]}: error: {error}"


# -- setup --


@pytest.mark.parametrize(
    "dlq_url",
    [
        "http://127.0.0.1:1/1/events.fifo",  # the queue's own URL
        "http://127.0.0.1:1/2/events.fifo",  # another URL, but setup creates queues by name
    ],
)
def test_setup_refuses_a_dead_letter_queue_that_is_the_queue_itself(dlq_url: str) -> None:
    # WHEN setup would create one queue as its own dead-letter queue (the consumer refuses these too)
    result = _jiralake(
        "setup", "--skip-db", JIRALAKE_QUEUE_URL="http://127.0.0.1:1/1/events.fifo", JIRALAKE_DLQ_URL=dlq_url
    )
    # THEN one line says so, before any AWS call
    assert one_line(result) == "JIRALAKE_QUEUE_URL and JIRALAKE_DLQ_URL name the same queue (events.fifo)"


async def test_setup_skip_queues_needs_only_the_database(pg_server_dsn: str) -> None:
    # GIVEN queue and bucket settings setup --skip-queues does not use: empty, not FIFO, not a bucket
    async with empty_database(pg_server_dsn, "skipqueues") as url:
        # WHEN it applies the migrations
        result = await asyncio.to_thread(
            _jiralake,
            "setup",
            "--skip-queues",
            DATABASE_URL=url,
            JIRALAKE_QUEUE_URL="",
            JIRALAKE_DLQ_URL="http://127.0.0.1:1/1/events",
            JIRALAKE_BUCKET="Not_A_Bucket",
        )
    # THEN none of them is read: it applies them and exits 0
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("migrations applied: 0001_issue_tables, "), result.stdout
