-- Exporter bookkeeping (exporter/run_log.py). Nothing here is issue data.
--
-- One row per export run, written when it starts and updated when it ends. A run still 'running'
-- when the next export takes the advisory lock was cut short (killed process) and becomes
-- 'abandoned'. The incremental watermark (--changed-since-last) is watermark_xid8 of the newest
-- succeeded 'changes' run of the same format: the oldest transaction id (64-bit) that export's
-- snapshot saw running, or its xmax. Every row written by a transaction that the snapshot could not
-- see has a transaction id at or above it, so the next incremental export cannot miss a row
-- committed while this one ran (exporter/run.py, EXPORT_SNAPSHOT and CHANGED_SINCE).
CREATE TABLE jiralake_export_run (
    run_id          bigserial PRIMARY KEY,
    mode            text NOT NULL CHECK (mode IN ('full', 'changes')),
    format          text NOT NULL,
    status          text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'abandoned')),
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz,
    since_xid8      bigint,                 -- changes runs: the watermark this run started from
    watermark_xid8  bigint,                 -- where the next changes run starts (set on success)
    rows_exported   bigint,
    bytes_exported  bigint,
    sha256          text,
    data_key        text,
    latest_key      text,
    manifest_key    text,
    error           text
);

CREATE INDEX jiralake_export_run_watermark_idx
    ON jiralake_export_run (format, run_id DESC)
    WHERE mode = 'changes' AND status = 'succeeded';
