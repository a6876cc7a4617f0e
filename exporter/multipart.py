"""One S3 object written as a stream: a multipart upload fed chunk by chunk, atomic on complete.

The writer cuts the stream into parts of exactly ``part_size_bytes`` but the last (S3: at least 5 MiB
except the last, at most 5 GiB): a chunk is split at the part boundary and its rest starts the next
part, so a chunk larger than a part (a Parquet row group) fills several. It hands each part to a
bounded queue; ``parts_in_flight`` uploader tasks take parts from it. When the queue is full the
writer waits, and so does whatever feeds it (the COPY stream): memory stays at about
``(parts_in_flight + 2) x part_size_bytes`` whatever the object's size (one part being filled, one
queued, ``parts_in_flight`` being sent). ``complete`` sends the parts sorted by number; until then
readers see the previous object under the key, or none.

Each part is one buffer, written once: the chunks (or memoryview slices of them, not copies) go
straight into an ``io.BytesIO`` that is handed to ``upload_part`` as the body. botocore and aiohttp
read a file-like body in small chunks (checksums, signing, sending) without copying it; a ``bytes``
body, by contrast, is wrapped by botocore in a ``BytesIO`` sharing it, which aiohttp's ``getbuffer()``
then un-shares: a full copy of every part.

On any failure (an upload error, the source failing, cancellation on SIGTERM) the upload is aborted,
so S3 keeps no orphan parts (``ListMultipartUploads`` stays empty). The abort runs to its end even if
a stop arrives meanwhile (exporter/shutdown.py: ``finish_cleanup``), and the first failure is the one
raised. The same pattern as aioboto3's own ``upload_fileobj``, with the part size and concurrency ours
to set. A killed process runs no code: for that, an :class:`UploadRecorder` (exporter/uploads.py)
keeps each upload's id in PostgreSQL from before its first part until S3 confirmed it completed or
aborted, and the next export aborts what a dead one left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from exporter.errors import ExportError, failure_reason
from exporter.settings import S3_MAX_PARTS, S3_MIN_PART_BYTES
from exporter.shutdown import CLEANUP_CALL_TIMEOUT_S, finish_cleanup, finish_then_stop
from shared.errors import one_line

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = structlog.get_logger()

# Called after each part is stored, with (part_number, part_bytes).
PartCallback = Callable[[int, int], None]


class UploadRecorder(Protocol):
    """Keeps the open uploads somewhere that survives the process (exporter/uploads.py: PostgreSQL)."""

    async def opening(self, bucket: str, key: str) -> int:
        """Before CreateMultipartUpload; returns a reference for the two calls below."""

    async def opened(self, ref: int, upload_id: str) -> None:
        """S3 created the upload: before its first part."""

    async def closed(self, ref: int) -> None:
        """S3 confirmed the upload completed or aborted."""


def part_checksum_algorithm(s3: S3Client) -> str | None:
    """``CRC32`` when the client sends checksums with every upload (botocore's default,
    ``request_checksum_calculation = when_supported``), else None.

    Declared at CreateMultipartUpload, as the AWS CLI and s3transfer do, S3 checks every part against
    the CRC32 botocore sends with it and keeps a composite CRC32 of the object. A client set to
    ``when_required`` (``AWS_REQUEST_CHECKSUM_CALCULATION``, for S3-compatible stores without checksum
    support) sends none, so nothing is declared either."""
    setting = getattr(s3.meta.config, "request_checksum_calculation", None)
    return "CRC32" if setting in (None, "when_supported") else None


async def start_upload(
    s3: S3Client,
    recorder: UploadRecorder | None,
    *,
    bucket: str,
    key: str,
    content_type: str,
    checksum_algorithm: str | None = None,
) -> tuple[str, int | None]:
    """CreateMultipartUpload, recorded before any part is sent; returns (upload id, recorder reference).

    If recording the id fails, the upload is aborted before the error is raised."""
    ref = await recorder.opening(bucket, key) if recorder is not None else None
    extra: Any = {"ChecksumAlgorithm": checksum_algorithm} if checksum_algorithm else {}
    try:
        # To its end even when a stop comes meanwhile: cancelled while S3 answers, the call would
        # leave an upload S3 created and nobody knows the id of.
        created, stopped = await finish_then_stop(
            s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type, **extra),
            name="multipart-create",
        )
    except ClientError:
        # S3 answered: no upload was created.
        if recorder is not None and ref is not None:
            await recorder.closed(ref)
        raise
    upload_id = created["UploadId"]
    if stopped:
        await finish_cleanup(
            abort_upload(s3, recorder, ref, bucket=bucket, key=key, upload_id=upload_id),
            after=None,
            name="multipart-abort",
        )
        raise asyncio.CancelledError
    if recorder is not None and ref is not None:
        try:
            await recorder.opened(ref, upload_id)
        except BaseException as exc:
            await finish_cleanup(
                abort_upload(s3, recorder, ref, bucket=bucket, key=key, upload_id=upload_id),
                after=exc,
                name="multipart-abort",
            )
            raise
    return upload_id, ref


async def abort_upload(
    s3: S3Client, recorder: UploadRecorder | None, ref: int | None, *, bucket: str, key: str, upload_id: str
) -> bool:
    """AbortMultipartUpload, then forget the record; False (logged) when S3 did not confirm it."""
    try:
        async with asyncio.timeout(CLEANUP_CALL_TIMEOUT_S):
            await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as exc:
        # The record stays: the next export aborts it again; the lifecycle rule is the last backstop.
        log.warning(
            "multipart_abort_failed",
            key=key,
            upload_id=upload_id,
            reason=cleanup_failure(exc, "S3"),
        )
        return False
    await forget_upload(recorder, ref, key=key, upload_id=upload_id)
    return True


def cleanup_failure(exc: Exception, service: str) -> str:
    """The reason a cleanup call failed, for its log line."""
    if isinstance(exc, TimeoutError):
        return f"no answer from {service} within {CLEANUP_CALL_TIMEOUT_S:g} s"
    return failure_reason(exc) or repr(exc)


async def forget_upload(
    recorder: UploadRecorder | None, ref: int | None, *, key: str, upload_id: str
) -> None:
    """Clear the record of an upload S3 completed or aborted; if that fails, the next export's abort of
    it is a no-op (NoSuchUpload), so it is only logged."""
    if recorder is None or ref is None:
        return
    try:
        async with asyncio.timeout(CLEANUP_CALL_TIMEOUT_S):
            await recorder.closed(ref)
    except Exception as exc:
        log.warning(
            "multipart_record_not_cleared",
            key=key,
            upload_id=upload_id,
            reason=cleanup_failure(exc, "PostgreSQL"),
        )


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    size_bytes: int
    etag: str
    parts: int
    sha256: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class MultipartUpload:
    """``async with MultipartUpload(...) as upload: await upload.write(b); stored = await upload.complete()``.

    Leaving the block without :meth:`complete` having returned, for whatever reason, aborts the upload.
    """

    def __init__(
        self,
        s3: S3Client,
        *,
        bucket: str,
        key: str,
        part_size_bytes: int,
        parts_in_flight: int,
        content_type: str,
        on_part_stored: PartCallback | None = None,
        recorder: UploadRecorder | None = None,
    ) -> None:
        if part_size_bytes < S3_MIN_PART_BYTES:
            raise ValueError(f"part_size_bytes must be >= {S3_MIN_PART_BYTES}")
        self._s3 = s3
        self.bucket = bucket
        self.key = key
        self._part_size = part_size_bytes
        self._content_type = content_type
        self._on_part_stored = on_part_stored
        self._recorder = recorder
        self._ref: int | None = None
        self._queue: asyncio.Queue[tuple[int, io.BytesIO, int] | None] = asyncio.Queue(maxsize=1)
        self._workers_count = parts_in_flight
        self._workers: list[asyncio.Task[None]] = []
        # The part being filled and its length (BytesIO.tell(), kept as an int to skip a call per chunk).
        self._buffer = io.BytesIO()
        self._buffered = 0
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._next_part = 1
        self._checksum_algorithm = part_checksum_algorithm(s3)
        # Per part number: what CompleteMultipartUpload lists (ETag, and its checksum when declared).
        self._parts: dict[int, dict[str, Any]] = {}
        self._error: BaseException | None = None
        self._upload_id: str | None = None
        self._all_sent = False
        self._completed = False

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    async def __aenter__(self) -> MultipartUpload:
        self._upload_id, self._ref = await start_upload(
            self._s3,
            self._recorder,
            bucket=self.bucket,
            key=self.key,
            content_type=self._content_type,
            checksum_algorithm=self._checksum_algorithm,
        )
        self._workers = [
            asyncio.create_task(self._upload_parts(), name=f"multipart-uploader-{i}")
            for i in range(self._workers_count)
        ]
        log.debug("multipart_started", key=self.key, upload_id=self._upload_id)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._completed:
            return
        # To its end, the stopping of the uploaders too, even if a stop (cancellation) arrives meanwhile:
        # cut short, the caller would close the S3 client under the abort and leave the parts behind.
        # A failure that came first (exc) is what the caller goes on to raise.
        await finish_cleanup(self._stop_and_abort(exc), after=exc, name="multipart-abort")

    async def _stop_and_abort(self, cause: BaseException | None) -> None:
        await self._stop_workers()
        await self._abort(cause)

    async def write(self, data: bytes) -> None:
        """Append bytes to the object; waits while the upload queue is full.

        Every part but the last is exactly ``part_size_bytes``: ``data`` is cut where the part being
        filled is full (slices of a memoryview, no copy), and what follows goes into the next part."""
        self._raise_if_failed()
        if not data:
            return
        self._sha256.update(data)
        self._size += len(data)
        rest = memoryview(data)
        while len(rest) >= (room := self._part_size - self._buffered):
            self._buffer.write(rest[:room])
            self._buffered += room
            rest = rest[room:]
            await self._send_buffer()
        if rest:
            self._buffered += self._buffer.write(rest)

    async def send_remaining(self) -> None:
        """Upload what is left as the last part and wait until every part is stored. The upload stays
        open (readers see nothing new yet): leaving the block without :meth:`complete` aborts it."""
        if self._all_sent:
            self._raise_if_failed()
            return
        if self._buffered or self._next_part == 1:
            await self._send_buffer()
        for _ in self._workers:
            await self._queue.put(None)
        await asyncio.gather(*self._workers)
        self._all_sent = True
        self._raise_if_failed()

    async def complete(self) -> StoredObject:
        """:meth:`send_remaining` if not done yet, then complete the upload: S3 shows the object now."""
        await self.send_remaining()
        parts = [{**self._parts[n], "PartNumber": n} for n in sorted(self._parts)]
        try:
            done = await self._s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self._require_upload_id(),
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except (ClientError, BotoCoreError) as exc:  # S3 lost the upload, or did not answer
            self._error = exc
            raise self._failure() from exc
        self._completed = True
        await forget_upload(self._recorder, self._ref, key=self.key, upload_id=self._require_upload_id())
        stored = StoredObject(
            bucket=self.bucket,
            key=self.key,
            size_bytes=self._size,
            etag=done.get("ETag", ""),
            parts=len(parts),
            sha256=self._sha256.hexdigest(),
        )
        log.debug("multipart_completed", key=self.key, parts=stored.parts, size_bytes=stored.size_bytes)
        return stored

    async def _send_buffer(self) -> None:
        """Queue the part being filled (its buffer becomes the request body) and start a new one."""
        part, size = self._buffer, self._buffered
        self._buffer, self._buffered = io.BytesIO(), 0
        part.seek(0)
        await self._send(part, size)

    async def _send(self, part: io.BytesIO, size: int) -> None:
        number = self._next_part
        if number > S3_MAX_PARTS:
            raise ExportError(
                f"s3://{self.bucket}/{self.key} would need more than {S3_MAX_PARTS} parts of "
                f"{self._part_size} bytes; raise JIRALAKE_EXPORT_PART_SIZE_MIB"
            )
        self._next_part += 1
        await self._queue.put((number, part, size))
        self._raise_if_failed()

    async def _upload_parts(self) -> None:
        # Keeps taking parts after a failure (and drops them) so the writer never waits on a full queue.
        while True:
            item = await self._queue.get()
            if item is None:
                return
            number, body, size = item
            if self._error is not None:
                _release(body)
                continue
            try:
                response = await self._s3.upload_part(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self._require_upload_id(),
                    PartNumber=number,
                    Body=body,
                )
            except Exception as exc:
                if self._error is None:
                    self._error = exc
                continue
            finally:
                _release(body)
            part: dict[str, Any] = {"ETag": response["ETag"]}
            if self._checksum_algorithm and response.get("ChecksumCRC32"):
                part["ChecksumCRC32"] = response["ChecksumCRC32"]
            self._parts[number] = part
            if self._on_part_stored is not None:
                try:
                    self._on_part_stored(number, size)
                except Exception as exc:
                    if self._error is None:
                        self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._failure() from self._error

    def _failure(self) -> ExportError:
        error = self._error
        if error is None:
            reason = "?"
        else:
            reason = failure_reason(error) or f"{type(error).__name__}: {one_line(str(error))}"
        return ExportError(f"uploading s3://{self.bucket}/{self.key} failed: {reason}")

    def _require_upload_id(self) -> str:
        if self._upload_id is None:
            raise RuntimeError("the multipart upload was not started (use `async with`)")
        return self._upload_id

    async def _stop_workers(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _abort(self, cause: BaseException | None) -> None:
        if self._upload_id is None:
            return
        aborted = await abort_upload(
            self._s3, self._recorder, self._ref, bucket=self.bucket, key=self.key, upload_id=self._upload_id
        )
        if not aborted:
            return
        log.info(
            "multipart_aborted",
            key=self.key,
            upload_id=self._upload_id,
            parts_stored=len(self._parts),
            cause=type(cause).__name__ if cause else None,
        )


def _release(body: io.BytesIO) -> None:
    """Free a part's memory now, whoever still holds a reference to its buffer."""
    # A view still exported (a request interrupted mid-send) keeps the buffer until it is released.
    with contextlib.suppress(BufferError):
        body.close()


async def copy_object(
    s3: S3Client,
    *,
    bucket: str,
    source: StoredObject,
    dest_key: str,
    part_size_bytes: int,
    single_copy_max_bytes: int,
    content_type: str,
    recorder: UploadRecorder | None = None,
) -> str:
    """Server-side copy of ``source`` to ``dest_key``, atomic for readers of ``dest_key``; returns its ETag.

    Copies only the exact object uploaded (``CopySourceIfMatch``). Up to ``single_copy_max_bytes`` (at
    most 5 GiB) one CopyObject; above, a multipart copy (UploadPartCopy by byte range), aborted on failure
    and recorded by ``recorder`` like any other upload.
    """
    copy_source: Any = {"Bucket": bucket, "Key": source.key}
    if source.size_bytes <= single_copy_max_bytes:
        # A full-object CRC32 of the copy, where uploads declare one. Without it moto gives the copy
        # the source's composite checksum as if it were a full-object one, and every reader that
        # validates checksums (boto3's default since 1.36) fails on latest/.
        algorithm = part_checksum_algorithm(s3)
        extra: Any = {"ChecksumAlgorithm": algorithm} if algorithm else {}
        copied = await s3.copy_object(
            Bucket=bucket,
            Key=dest_key,
            CopySource=copy_source,
            CopySourceIfMatch=source.etag,
            MetadataDirective="REPLACE",
            ContentType=content_type,
            **extra,
        )
        return copied.get("CopyObjectResult", {}).get("ETag", "")
    # Parts of at least part_size_bytes, and few enough for S3's 10,000-part limit.
    part_bytes = max(part_size_bytes, -(-source.size_bytes // S3_MAX_PARTS))
    upload_id, ref = await start_upload(s3, recorder, bucket=bucket, key=dest_key, content_type=content_type)
    try:
        parts: list[Any] = []
        for number, start in enumerate(range(0, source.size_bytes, part_bytes), start=1):
            end = min(start + part_bytes, source.size_bytes) - 1
            response = await s3.upload_part_copy(
                Bucket=bucket,
                Key=dest_key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource=copy_source,
                CopySourceIfMatch=source.etag,
                CopySourceRange=f"bytes={start}-{end}",
            )
            parts.append({"ETag": response["CopyPartResult"]["ETag"], "PartNumber": number})
        done = await s3.complete_multipart_upload(
            Bucket=bucket, Key=dest_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException as exc:
        await finish_cleanup(
            abort_upload(s3, recorder, ref, bucket=bucket, key=dest_key, upload_id=upload_id),
            after=exc,
            name="multipart-copy-abort",
        )
        raise
    await forget_upload(recorder, ref, key=dest_key, upload_id=upload_id)
    return done.get("ETag", "")
