"""The exporter's parts on their own: settings, layout, text escaping, multipart parts and copies,
failure reasons, progress lines."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import zlib
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import pytest
from botocore.awsrequest import AWSPreparedRequest
from botocore.exceptions import ClientError

from exporter.csv_format import decode_file_text
from exporter.errors import ExportError, failure_reason
from exporter.layout import ExportLayout
from exporter.multipart import MultipartUpload, StoredObject, copy_object
from exporter.progress import LogProgress, Progress, ProgressSnapshot, TerminalProgress, progress_line
from exporter.settings import MIB, ExporterSettings, ExportFormat
from shared import aws
from shared.settings import AwsSettings, ConfigError, DatabaseSettings
from tests.s3_pause_proxy import S3PauseProxy, complete_upload
from tests.test_export_support import get_object, list_keys, open_multipart_uploads

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

DB = DatabaseSettings(url="postgresql://x@127.0.0.1/none")


def settings(**kwargs: object) -> ExporterSettings:
    return ExporterSettings(aws=AwsSettings(), database=DB, bucket="b", **kwargs)  # type: ignore[arg-type]


# -- settings --
def test_settings_from_env_with_defaults() -> None:
    s = ExporterSettings.from_env({"JIRALAKE_BUCKET": "lake-bucket"})
    assert (s.bucket, s.prefix, s.format, s.part_size_bytes, s.parts_in_flight) == (
        "lake-bucket",
        "jiralake",
        ExportFormat.CSV,
        8 * MIB,
        4,
    )
    assert (s.include_raw, s.schedule, s.timezone, s.admin_port) == (False, None, "UTC", 9092)
    no_admin = ExporterSettings.from_env({"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_ADMIN_PORT": "0"})
    assert no_admin.admin_port is None
    at_root = ExporterSettings.from_env({"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_PREFIX": "/"})
    assert at_root.prefix == ""
    hive_style = ExporterSettings.from_env(
        {"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_PREFIX": "lake/source=jira/"}
    )
    assert hive_style.prefix == "lake/source=jira"


def test_settings_from_env_reads_every_variable() -> None:
    s = ExporterSettings.from_env(
        {
            "JIRALAKE_BUCKET": "bkt",
            "JIRALAKE_EXPORT_PREFIX": "/exports/jira/",
            "JIRALAKE_EXPORT_FORMAT": "PARQUET",
            "JIRALAKE_EXPORT_PART_SIZE_MIB": "64",
            "JIRALAKE_EXPORT_PARTS_IN_FLIGHT": "8",
            "JIRALAKE_EXPORT_INCLUDE_RAW": "true",
            "JIRALAKE_EXPORT_PARQUET_ROWS_PER_GROUP": "5000",
            "JIRALAKE_EXPORT_SCHEDULE": "0 3 * * *",
            "JIRALAKE_EXPORT_TIMEZONE": "America/Sao_Paulo",
            "JIRALAKE_EXPORT_ADMIN_PORT": "9103",
        }
    )
    assert (s.prefix, s.format, s.part_size_bytes, s.parts_in_flight, s.include_raw) == (
        "exports/jira",
        ExportFormat.PARQUET,
        64 * MIB,
        8,
        True,
    )
    assert (s.parquet_rows_per_group, s.schedule, s.timezone, s.admin_port) == (
        5000,
        "0 3 * * *",
        "America/Sao_Paulo",
        9103,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "JIRALAKE_BUCKET is not set"),
        (
            {"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_PART_SIZE_MIB": "4"},
            "JIRALAKE_EXPORT_PART_SIZE_MIB must be >= 5",
        ),
        (
            {"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_FORMAT": "xlsx"},
            "export format must be one of csv, csv.gz",
        ),
        (
            {"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_TIMEZONE": "Mars/Olympus"},
            "unknown time zone 'Mars/Olympus'",
        ),
        ({"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_SCHEDULE": "every day"}, "not a valid cron expression"),
        (
            {"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_ADMIN_PORT": "70000"},
            "JIRALAKE_EXPORT_ADMIN_PORT must be a port number, 0..65535",
        ),
        ({"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_PREFIX": "team's lake"}, 'export prefix "team\'s lake"'),
        ({"JIRALAKE_BUCKET": "bkt", "JIRALAKE_EXPORT_PREFIX": "a//b"}, "export prefix 'a//b'"),
    ],
)
def test_bad_settings_are_one_line_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        ExporterSettings.from_env(env)


def test_part_size_must_respect_s3_limits() -> None:
    with pytest.raises(ConfigError, match="between 5 MiB and 5 GiB"):
        settings(part_size_bytes=5 * MIB - 1)
    with pytest.raises(ConfigError, match="between 5 MiB and 5 GiB"):
        settings(part_size_bytes=5 * 1024 * MIB + 1)
    assert settings(part_size_bytes=5 * MIB).part_size_bytes == 5 * MIB


# -- layout --
def test_layout_keys_for_every_format() -> None:
    day = date(2024, 5, 10)
    csv = ExportLayout("b", "lake", ExportFormat.CSV)
    assert (csv.latest_key, csv.history_key(day)) == (
        "lake/ap_jira_task/latest/ap_jira_task.csv",
        "lake/ap_jira_task/history/dt=2024-05-10/ap_jira_task.csv",
    )
    gz = ExportLayout("b", "lake", ExportFormat.CSV_GZ)
    assert gz.latest_key == "lake/ap_jira_task_csv_gz/latest/ap_jira_task.csv.gz"
    parquet = ExportLayout("b", "", ExportFormat.PARQUET)
    assert parquet.history_key(day) == "ap_jira_task_parquet/history/dt=2024-05-10/ap_jira_task.parquet"
    changes = csv.changes_key(datetime(2024, 5, 10, 3, 4, 5, tzinfo=UTC), 42)
    assert changes == "lake/ap_jira_task/changes/dt=2024-05-10/ap_jira_task-20240510T030405Z-r42.csv"
    # manifests start with "_" so Athena never reads them as data
    assert csv.manifest_key(csv.latest_key) == "lake/ap_jira_task/latest/_manifest.json"
    assert csv.manifest_key(changes) == (
        "lake/ap_jira_task/changes/dt=2024-05-10/_ap_jira_task-20240510T030405Z-r42.manifest.json"
    )
    assert csv.location(csv.history_folder) == "s3://b/lake/ap_jira_task/history/"


# -- text escaping --
@pytest.mark.parametrize(
    ("in_file", "in_table"),
    [
        ("plain", "plain"),
        ("a\\\\nb", "a\nb"),
        ("a\\\\rb", "a\rb"),
        ("a\\\\\\\\b", "a\\b"),
        ("\\\\\\\\n", "\\n"),
        ("\\\\\\\\\\\\n", "\\\n"),
    ],
)
def test_decode_file_text_undoes_the_newline_safe_escaping(in_file: str, in_table: str) -> None:
    assert decode_file_text(in_file) == in_table


# -- multipart --
async def test_multipart_cuts_parts_of_at_least_the_part_size_and_completes_them_in_order(
    aws_settings: AwsSettings, bucket: str
) -> None:
    # GIVEN 12 MiB + 7 bytes written in odd-sized chunks with 5 MiB parts, 3 uploaders
    payload = bytes(range(256)) * (12 * MIB // 256) + b"tail..."
    stored_parts: list[tuple[int, int]] = []
    async with aws.s3_client(aws_settings) as s3:
        async with MultipartUpload(
            s3,
            bucket=bucket,
            key="t/object.bin",
            part_size_bytes=5 * MIB,
            parts_in_flight=3,
            content_type="application/octet-stream",
            on_part_stored=lambda n, size: stored_parts.append((n, size)),
        ) as upload:
            view = memoryview(payload)
            for start in range(0, len(payload), 777_777):
                await upload.write(bytes(view[start : start + 777_777]))
            stored = await upload.complete()
    # THEN two full parts (each >= 5 MiB) and a short last one, completed as one object
    sizes = dict(stored_parts)
    assert sorted(sizes) == [1, 2, 3]
    assert sizes[1] >= 5 * MIB and sizes[2] >= 5 * MIB and sizes[3] < 5 * MIB
    assert sum(sizes.values()) == len(payload) == stored.size_bytes
    assert stored.parts == 3 and stored.etag.endswith('-3"')
    assert await get_object(aws_settings, bucket, "t/object.bin") == payload
    assert stored.sha256 == hashlib.sha256(payload).hexdigest()


async def test_an_upload_lost_before_its_completion_fails_as_one_export_error(
    aws_settings: AwsSettings, bucket: str
) -> None:
    assert aws_settings.endpoint_url is not None
    async with S3PauseProxy(aws_settings.endpoint_url) as proxy:
        held = proxy.hold("complete", complete_upload("t/lost.csv"))
        via_proxy = AwsSettings(aws_settings.region, proxy.url)
        async with aws.s3_client(via_proxy) as s3, aws.s3_client(aws_settings) as direct:
            async with MultipartUpload(
                s3, bucket=bucket, key="t/lost.csv", part_size_bytes=5 * MIB, parts_in_flight=1,
                content_type="text/csv",
            ) as upload:  # fmt: skip
                # GIVEN every part stored, and the completion on its way
                await upload.write(b"issue_id\n1\n")
                completing = asyncio.create_task(upload.complete())
                await held.reached.wait()
                # WHEN S3 loses the upload before the completion reaches it (aborted behind its back)
                [lost] = (await direct.list_multipart_uploads(Bucket=bucket))["Uploads"]
                await direct.abort_multipart_upload(Bucket=bucket, Key=lost["Key"], UploadId=lost["UploadId"])
                proxy.release()
                # THEN the export fails with one line naming the object and the S3 call, like a lost
                # part does, not with botocore's exception
                with pytest.raises(ExportError) as failure:
                    await completing
    assert str(failure.value).startswith(
        f"uploading s3://{bucket}/t/lost.csv failed: S3 CompleteMultipartUpload failed: "
    )


async def upload_in_chunks(
    s3: S3Client, bucket: str, key: str, payload: bytes, *, chunk_bytes: int
) -> StoredObject:
    """``payload`` through a MultipartUpload of 5 MiB parts, written ``chunk_bytes`` at a time."""
    async with MultipartUpload(
        s3, bucket=bucket, key=key, part_size_bytes=5 * MIB, parts_in_flight=2, content_type="text/csv"
    ) as upload:
        for start in range(0, len(payload), chunk_bytes):
            await upload.write(payload[start : start + chunk_bytes])
        return await upload.complete()


@pytest.mark.parametrize(
    ("calculation", "declared"), [(None, "CRC32"), ("when_required", None)], ids=["default", "when_required"]
)
async def test_multipart_declares_crc32_when_the_client_sends_checksums(
    aws_settings: AwsSettings,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    calculation: str | None,
    declared: str | None,
) -> None:
    # GIVEN an S3 client with botocore's default checksum setting, or with
    # AWS_REQUEST_CHECKSUM_CALCULATION=when_required
    if calculation is not None:
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", calculation)
    payload = bytes(range(256)) * (6 * MIB // 256) + b"tail"
    async with aws.s3_client(aws_settings) as s3:
        # WHEN an object of two parts is uploaded
        stored = await upload_in_chunks(s3, bucket, "t/checked.csv", payload, chunk_bytes=MIB)
        head = await s3.head_object(Bucket=bucket, Key="t/checked.csv", ChecksumMode="ENABLED")
    # THEN by default S3 keeps a composite CRC32 of its parts (as the AWS CLI's uploads do); when the
    # client sends no checksums, none is declared
    assert stored.parts == 2
    if declared is None:
        assert "ChecksumCRC32" not in head
    else:
        # S3's composite checksum: the CRC32 of the parts' CRC32s (S3 appends "-2", moto does not)
        part_crcs = b"".join(
            zlib.crc32(part).to_bytes(4, "big") for part in (payload[: 5 * MIB], payload[5 * MIB :])
        )
        composite = base64.b64encode(zlib.crc32(part_crcs).to_bytes(4, "big")).decode()
        assert head["ChecksumCRC32"].removesuffix("-2") == composite
    assert await get_object(aws_settings, bucket, "t/checked.csv") == payload


async def test_multipart_aborts_when_the_writer_fails(aws_settings: AwsSettings, bucket: str) -> None:
    async with aws.s3_client(aws_settings) as s3:
        with pytest.raises(RuntimeError, match="source broke"):
            async with MultipartUpload(
                s3,
                bucket=bucket,
                key="t/broken.bin",
                part_size_bytes=5 * MIB,
                parts_in_flight=2,
                content_type="x",
            ) as upload:
                await upload.write(b"x" * (6 * MIB))
                raise RuntimeError("source broke")
    assert await open_multipart_uploads(aws_settings, bucket) == []
    assert await list_keys(aws_settings, bucket) == []


async def test_copy_above_the_single_copy_limit_goes_part_by_part(
    aws_settings: AwsSettings, bucket: str
) -> None:
    # GIVEN an 11 MiB object
    payload = b"0123456789abcdef" * (11 * MIB // 16)
    async with aws.s3_client(aws_settings) as s3:
        source = await upload_in_chunks(s3, bucket, "t/src.csv", payload, chunk_bytes=len(payload))
        # WHEN it is copied with a single-copy limit below its size
        etag = await copy_object(
            s3,
            bucket=bucket,
            source=source,
            dest_key="t/dest.csv",
            part_size_bytes=5 * MIB,
            single_copy_max_bytes=1 * MIB,
            content_type="text/csv",
        )
        head = await s3.head_object(Bucket=bucket, Key="t/dest.csv")
    # THEN the copy was made in 3 ranged parts and holds the same bytes
    assert etag.endswith('-3"')
    assert head["ContentType"] == "text/csv"
    assert await get_object(aws_settings, bucket, "t/dest.csv") == payload
    assert await open_multipart_uploads(aws_settings, bucket) == []


@pytest.mark.parametrize(
    ("size_bytes", "single_copy_max_bytes", "calls"),
    [(1 * MIB, 5 * MIB, ["CopyObject"]), (6 * MIB, 1 * MIB, ["UploadPartCopy", "UploadPartCopy"])],
    ids=["one-copy", "part-by-part"],
)
async def test_every_copy_request_copies_only_the_object_that_was_uploaded(
    aws_settings: AwsSettings, bucket: str, size_bytes: int, single_copy_max_bytes: int, calls: list[str]
) -> None:
    # moto ignores x-amz-copy-source-if-match (docs/exporter.md, "Limits and notes"), so a copy of an
    # object replaced in between cannot be refused here: the requests as sent on the wire are checked
    # instead (botocore's before-send event, after signing).
    payload = b"0123456789abcdef" * (size_bytes // 16)
    sent: list[tuple[str, str | None]] = []

    def record_copy(request: AWSPreparedRequest, event_name: str, **_: Any) -> None:
        value = request.headers.get("x-amz-copy-source-if-match")  # bytes once signed
        condition = value.decode() if isinstance(value, bytes) else value
        sent.append((event_name.rsplit(".", 1)[-1], condition))

    async with aws.s3_client(aws_settings) as s3:
        # GIVEN an object the exporter uploaded, and the ETag S3 gives it
        source = await upload_in_chunks(s3, bucket, "t/src.csv", payload, chunk_bytes=len(payload))
        uploaded_etag = (await s3.head_object(Bucket=bucket, Key="t/src.csv"))["ETag"]
        assert source.etag == uploaded_etag
        # WHEN it is copied, in one CopyObject or part by part
        for operation in ("CopyObject", "UploadPartCopy"):
            s3.meta.events.register(f"before-send.s3.{operation}", record_copy)
        await copy_object(
            s3,
            bucket=bucket,
            source=source,
            dest_key="t/dest.csv",
            part_size_bytes=5 * MIB,
            single_copy_max_bytes=single_copy_max_bytes,
            content_type="text/csv",
        )
    # THEN every copy request is conditional on that ETag: S3 would refuse (412) to copy any other
    # version of the source, such as one a concurrent run put there after this upload
    assert sent == [(call, uploaded_etag) for call in calls]
    assert await get_object(aws_settings, bucket, "t/dest.csv") == payload


# -- failure reasons --
def test_failure_reasons_are_one_line_and_bugs_are_none() -> None:
    client_error = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")
    assert failure_reason(client_error) == "S3 PutObject failed: AccessDenied: Access Denied"
    assert failure_reason(ExportError("table missing")) == "table missing"
    # an S3-compatible store's multi-line message stays on the one line the CLI prints
    snag = {"Error": {"Code": "InternalError", "Message": "We hit\n  a snag"}}
    multi_line = ClientError(snag, "UploadPart")  # type: ignore[arg-type]
    assert failure_reason(multi_line) == "S3 UploadPart failed: InternalError: We hit a snag"
    assert failure_reason(ConnectionRefusedError(111, "Connection\nrefused")) == (
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    assert failure_reason(KeyError("bug")) is None


# -- progress --
def test_progress_line_shows_rows_megabytes_and_rate() -> None:
    line = progress_line(
        ProgressSnapshot(
            rows=12345, source_bytes=45_600_000, uploaded_bytes=40_000_000, parts_stored=3, elapsed_s=4.0
        )
    )
    assert line == "12,345 rows  45.6 MB read  40.0 MB stored  10.0 MB/s  3 parts"


def test_terminal_progress_rewrites_one_line_at_most_every_interval_and_ends_it() -> None:
    now = [0.0]
    out = io.StringIO()
    terminal = TerminalProgress(out, interval_s=1.0, clock=lambda: now[0])
    progress = Progress(terminal, clock=lambda: now[0])
    progress.read(rows=10, source_bytes=1_000_000)  # shown
    now[0] = 0.5
    progress.read(rows=10, source_bytes=1_000_000)  # too soon
    now[0] = 2.0
    progress.part_stored(1, 2_000_000)  # shown
    progress.finish(rows=20)  # always shown, ends the line
    assert out.getvalue().count("\r\x1b[2K") == 3
    assert out.getvalue().endswith("20 rows  2.0 MB read  2.0 MB stored  1.0 MB/s  1 parts\n")


def test_log_progress_logs_at_most_every_interval(capsys: pytest.CaptureFixture[str]) -> None:
    now = [0.0]
    shown: list[float] = []
    logger = LogProgress(interval_s=10.0, clock=lambda: now[0])
    for t in (1.0, 9.0, 10.5, 15.0, 21.0):
        now[0] = t
        logger(ProgressSnapshot(rows=1, source_bytes=1, uploaded_bytes=1, parts_stored=0, elapsed_s=t))
        captured = capsys.readouterr()
        if "export_progress" in captured.out + captured.err:
            shown.append(t)
    assert shown == [10.5, 21.0]
