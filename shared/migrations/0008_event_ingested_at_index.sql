-- History retention (ops/history_prune.py, `jiralake history prune`).
--
-- The prune deletes history rows by ingested_at (when the consumer recorded the row) in small
-- batches, oldest first, each batch starting where the last one ended. Without this index every
-- batch scanned the table from its start, through the rows earlier batches had deleted, and the last
-- batch and a --dry-run count read the whole table. Its cost on the consumer's insert is one small
-- entry at the right edge of the index per delivery (about 12 bytes a row on the sample webhooks,
-- against about 730 for the row and its other indexes; no difference measurable in the apply step).
--
-- On a large history, building it here holds a SHARE lock on ap_jira_task_event while it builds: the
-- consumer's batches wait (and are retried in place). To avoid that, build it beforehand with
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS ap_jira_task_event_ingested_at_idx
--       ON ap_jira_task_event (ingested_at);
-- and this migration finds it. A concurrent build that failed leaves an INVALID index of that name,
-- which the planner never uses: it is dropped here and built again. A valid index of that name on
-- anything else than ap_jira_task_event (ingested_at) stops setup with a message: it is not ours to drop.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_index
        WHERE indexrelid = to_regclass('ap_jira_task_event_ingested_at_idx') AND NOT indisvalid
    ) THEN
        DROP INDEX ap_jira_task_event_ingested_at_idx;
    END IF;
    IF EXISTS (
        SELECT 1 FROM pg_index i
        WHERE i.indexrelid = to_regclass('ap_jira_task_event_ingested_at_idx')
          AND NOT (
              i.indrelid = 'ap_jira_task_event'::regclass
              AND i.indkey::int2[] = ARRAY[(
                  SELECT attnum FROM pg_attribute
                  WHERE attrelid = 'ap_jira_task_event'::regclass AND attname = 'ingested_at'
              )]
              AND i.indexprs IS NULL AND i.indpred IS NULL
          )
    ) THEN
        RAISE EXCEPTION 'jiralake: an index named ap_jira_task_event_ingested_at_idx exists but is not on ap_jira_task_event (ingested_at); drop it (history prune needs that one) and run setup again';
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS ap_jira_task_event_ingested_at_idx ON ap_jira_task_event (ingested_at);
