-- Backfill bookkeeping (backfill/state.py). Nothing here is issue data.
--
-- How many snapshots of a run in progress were not enqueued (too large for SQS, not valid), saved with
-- each page like the cursor. A run resumed after a crash then still knows that an earlier part of it
-- left issues out, and stores no watermark: `--updated-since last-run` would otherwise skip them.
ALTER TABLE jiralake_backfill_run ADD COLUMN issues_refused bigint NOT NULL DEFAULT 0;
