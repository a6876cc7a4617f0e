"""The exporter's settings: one frozen object, built once in ``main()`` from the environment (and the
command line), constructed directly in tests, benchmarks and the local demo."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from shared.settings import (
    AwsSettings,
    ConfigError,
    DatabaseSettings,
    env_bool,
    env_host,
    env_int,
    env_port,
    env_str,
    require,
)

MIB = 1024 * 1024
# S3's multipart rules: every part but the last at least 5 MiB, at most 5 GiB, at most 10,000 parts.
S3_MIN_PART_BYTES = 5 * MIB
S3_MAX_PART_BYTES = 5 * 1024 * MIB
S3_MAX_PARTS = 10_000
# CopyObject copies at most 5 GiB in one request; larger objects are copied part by part.
S3_MAX_SINGLE_COPY_BYTES = 5 * 1024 * MIB

# The prefix is part of every key and of the LOCATION literals of the Athena DDL: S3's "safe" key
# characters without the quote, plus = for Hive-style folders (source=jira), in non-empty folders.
_SAFE_PREFIX = re.compile(r"([A-Za-z0-9!_.*()=-]+(/[A-Za-z0-9!_.*()=-]+)*)?")
# The bucket is in those LOCATION literals too: S3's bucket naming rules, 3-63 lowercase letters,
# digits, dots and hyphens, beginning and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

# 8 MiB, as the AWS CLI: (4 + 2) x 8 MiB of part buffers at most, and objects of up to 78 GiB.
DEFAULT_PART_SIZE_BYTES = 8 * MIB
# Each part in flight holds a buffer of part_size_bytes and an HTTP connection; one upload gains
# nothing past what the network takes, and a mistyped huge value started that many uploaders.
MAX_PARTS_IN_FLIGHT = 32


class ExportFormat(enum.StrEnum):
    CSV = "csv"
    CSV_GZ = "csv.gz"
    PARQUET = "parquet"

    @property
    def is_csv(self) -> bool:
        return self is not ExportFormat.PARQUET

    @classmethod
    def parse(cls, value: str) -> ExportFormat:
        try:
            return cls(value.strip().lower())
        except ValueError:
            choices = ", ".join(f.value for f in cls)
            raise ConfigError(f"export format must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True)
class ExporterSettings:
    aws: AwsSettings
    database: DatabaseSettings
    bucket: str
    # Key prefix inside the bucket, without leading or trailing "/" ("" = the bucket's root).
    prefix: str = "jiralake"
    format: ExportFormat = ExportFormat.CSV
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
    # Upload workers; part buffers take at most (parts_in_flight + 2) x part_size_bytes (one being filled,
    # one queued, parts_in_flight being sent; exporter/multipart.py keeps exactly one buffer per part).
    parts_in_flight: int = 4
    # CSV leaves the raw webhook JSON out unless asked; Parquet always keeps it.
    include_raw: bool = False
    gzip_level: int = 6
    # Rows per Parquet row group (one server-side cursor fetch each).
    parquet_rows_per_group: int = 10_000
    parquet_compression: str = "snappy"
    # Above this size latest/ is copied part by part (UploadPartCopy) instead of with one CopyObject.
    single_copy_max_bytes: int = S3_MAX_SINGLE_COPY_BYTES
    # Long-running mode: a cron expression evaluated in `timezone`; None = run once.
    schedule: str | None = None
    timezone: str = "UTC"
    # Seconds between progress log lines when stderr is not a terminal.
    progress_log_interval_s: float = 10.0
    # /healthz, /readyz and /metrics while running on a schedule; None = no admin server.
    admin_port: int | None = 9092
    admin_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ConfigError("JIRALAKE_BUCKET is not set (see the configuration table in README.md)")
        object.__setattr__(self, "prefix", self.prefix.strip("/"))
        if not S3_MIN_PART_BYTES <= self.part_size_bytes <= S3_MAX_PART_BYTES:
            raise ConfigError(
                "part size must be between 5 MiB and 5 GiB (S3's multipart limits), "
                f"got {self.part_size_bytes} bytes"
            )
        if not 1 <= self.parts_in_flight <= MAX_PARTS_IN_FLIGHT:
            raise ConfigError(
                f"parts in flight must be between 1 and {MAX_PARTS_IN_FLIGHT}, got {self.parts_in_flight}"
            )
        if not 0 <= self.gzip_level <= 9:
            raise ConfigError(f"gzip level must be 0..9, got {self.gzip_level}")
        if self.parquet_rows_per_group < 1:
            raise ConfigError(f"Parquet rows per group must be >= 1, got {self.parquet_rows_per_group}")
        if self.single_copy_max_bytes < 1 or self.single_copy_max_bytes > S3_MAX_SINGLE_COPY_BYTES:
            raise ConfigError("single_copy_max_bytes must be between 1 byte and 5 GiB")
        if self.admin_port is not None and not 1 <= self.admin_port <= 65535:
            raise ConfigError(f"admin port must be 1..65535 (0 or unset: none), got {self.admin_port}")
        # "." and ".." folders: S3 keeps them literally, but Athena's and Hadoop's paths normalise
        # them, so the tables' LOCATION would point somewhere else than the objects.
        dot_folder = any(folder in (".", "..") for folder in self.prefix.split("/"))
        if not _SAFE_PREFIX.fullmatch(self.prefix) or dot_folder:
            raise ConfigError(
                f"export prefix {self.prefix!r} may hold only letters, digits and / ! - _ . * ( ) =, "
                "with no empty, '.' or '..' folder: it goes into S3 keys and Athena LOCATION strings"
            )
        zone(self.timezone)
        if self.schedule is not None:
            check_schedule(self.schedule, self.tzinfo)

    @property
    def tzinfo(self) -> ZoneInfo:
        return zone(self.timezone)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ExporterSettings:
        admin_port = env_port(env, "JIRALAKE_EXPORT_ADMIN_PORT", 9092)
        return cls(
            aws=AwsSettings.from_env(env),
            database=DatabaseSettings.from_env(env),
            bucket=bucket_name(require(env, "JIRALAKE_BUCKET")),
            prefix=env_str(env, "JIRALAKE_EXPORT_PREFIX", "jiralake") or "",
            format=ExportFormat.parse(env_str(env, "JIRALAKE_EXPORT_FORMAT", "csv") or "csv"),
            part_size_bytes=env_int(
                env, "JIRALAKE_EXPORT_PART_SIZE_MIB", DEFAULT_PART_SIZE_BYTES // MIB, minimum=5
            )
            * MIB,
            parts_in_flight=env_int(env, "JIRALAKE_EXPORT_PARTS_IN_FLIGHT", 4, minimum=1),
            include_raw=env_bool(env, "JIRALAKE_EXPORT_INCLUDE_RAW", False),
            parquet_rows_per_group=env_int(env, "JIRALAKE_EXPORT_PARQUET_ROWS_PER_GROUP", 10_000, minimum=1),
            schedule=env_str(env, "JIRALAKE_EXPORT_SCHEDULE"),
            timezone=env_str(env, "JIRALAKE_EXPORT_TIMEZONE", "UTC") or "UTC",
            admin_port=admin_port or None,
            admin_host=env_host(env, "JIRALAKE_EXPORT_ADMIN_HOST", "127.0.0.1"),
        )


# croniter's random field (``R``, ``R(0-29)``) draws a new value at every next time asked for: after a
# 03:18 run of "R 3 * * *" the next one may come at 03:25 the same day. Month and day names (MAR,
# THU) hold the letter but never alone.
_RANDOM_FIELD = re.compile(r"(?<![A-Za-z])R(?![A-Za-z])", re.IGNORECASE)


def check_schedule(schedule: str, tz: ZoneInfo) -> None:
    """ConfigError unless ``schedule`` is a cron expression that fires: "0 0 31 2 *" is valid cron but
    never comes, and the scheduler loop would crash computing its next time. Only the five standard
    fields: croniter also takes seconds and a year, and a year field stops firing some day, when the
    running loop would crash the same way. Nicknames (``@hourly``, ``@daily``...) are five fields too."""
    fields = schedule.split()
    standard = len(fields) == 5 or (len(fields) == 1 and fields[0].startswith("@"))
    if not standard or _RANDOM_FIELD.search(schedule) or not croniter.is_valid(schedule):
        raise ConfigError(
            f"schedule {schedule!r} is not a valid cron expression (5 fields: minute hour day month weekday)"
        )
    try:
        croniter(schedule, datetime.now(tz)).get_next(datetime)
    except CroniterBadDateError:
        raise ConfigError(f"schedule {schedule!r} never fires (no such date)") from None


def bucket_name(name: str) -> str:
    if not _BUCKET_NAME.fullmatch(name):
        raise ConfigError(
            f"bucket {name!r} is not a valid S3 bucket name: 3-63 lowercase letters, digits, dots and "
            "hyphens, beginning and ending with a letter or digit"
        )
    return name


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder of zones, such as America
        raise ConfigError(
            f"unknown time zone {name!r} (use an IANA name such as America/Sao_Paulo)"
        ) from None
