-- Exporter bookkeeping (exporter/run_log.py). Nothing here is issue data.
--
-- Where each export run wrote (s3://bucket/prefix), so that the incremental watermark belongs to one
-- destination: two exporters of the same format to different buckets or prefixes on one database
-- (a production lake and a test lake) each export every change once to their own destination,
-- instead of each skipping what the other already wrote. Runs from before this migration have no
-- destination: the first incremental run to a destination after it exports every row once.
ALTER TABLE jiralake_export_run ADD COLUMN destination text;

DROP INDEX jiralake_export_run_watermark_idx;
CREATE INDEX jiralake_export_run_watermark_idx
    ON jiralake_export_run (destination, format, run_id DESC)
    WHERE mode = 'changes' AND status = 'succeeded';
