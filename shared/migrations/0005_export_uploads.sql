-- Exporter bookkeeping (exporter/uploads.py). Nothing here is issue data.
--
-- The multipart uploads an export has open, so that a process killed mid-upload (SIGKILL, OOM) leaves
-- nothing behind in S3. A row is written before CreateMultipartUpload (upload_id NULL), gets the upload
-- id as soon as S3 returns it, and is deleted once S3 confirmed the upload completed or aborted. A row
-- still here when the next export takes the advisory lock belongs to a process that died: that export
-- aborts the upload (AbortMultipartUpload, a no-op for one S3 had completed) and deletes the row. A row
-- whose upload_id is still NULL means the process died around CreateMultipartUpload: the upload, if S3
-- created one, cannot be named; it is logged, and the bucket's lifecycle rule removes it.
CREATE TABLE jiralake_export_upload (
    upload_ref  bigserial PRIMARY KEY,
    run_id      bigint NOT NULL,        -- jiralake_export_run.run_id (no foreign key: runs may be deleted)
    bucket      text NOT NULL,
    key         text NOT NULL,
    upload_id   text,                   -- NULL until CreateMultipartUpload returned
    created_at  timestamptz NOT NULL DEFAULT now()
);
