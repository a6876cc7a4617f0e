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
-- and this migration finds it. Any index build on ap_jira_task_event still running, this index's or
-- another's, stops setup with a message (building or dropping this index would queue behind it, the
-- consumer behind that, and a concurrent build waits for this migration in turn). A
-- concurrent build that failed leaves an INVALID index of that name, which the planner never uses: it
-- is dropped here and built again, waiting at most 5 s for its lock (queued behind a long query over
-- the history, the drop would hold up the consumer as long), else setup stops with a message. A valid
-- index of that name that is not a plain btree index on ap_jira_task_event (ingested_at) stops setup
-- with a message: it is not ours to drop.
DO $$
DECLARE
    found regclass := to_regclass('ap_jira_task_event_ingested_at_idx');
    builder integer;
    saved_lock_timeout text := current_setting('lock_timeout');
BEGIN
    -- Any index build on the history table under way in this database (its index visible here yet or
    -- not): this migration's CREATE INDEX or DROP INDEX would queue behind it, the consumer behind
    -- them, and a concurrent build waits for this transaction in turn (a deadlock). The view shows
    -- the table of another role's build only to members of pg_read_all_stats (or that role).
    IF current_setting('server_version_num')::integer >= 120000 THEN
        EXECUTE 'SELECT pid FROM pg_stat_progress_create_index WHERE relid = $1 AND datid = '
                || '(SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1'
            INTO builder USING 'ap_jira_task_event'::regclass;
        IF builder IS NOT NULL THEN
            RAISE EXCEPTION 'jiralake: an index on ap_jira_task_event is being built (CREATE INDEX, PostgreSQL backend pid %); wait for it to finish, then run setup again', builder;
        END IF;
    END IF;
    IF found IS NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = found AND NOT indisvalid) THEN
        -- Invalid and not being built (above): left by a failed concurrent build.
        PERFORM set_config('lock_timeout', '5s', true);
        BEGIN
            DROP INDEX ap_jira_task_event_ingested_at_idx;
        EXCEPTION WHEN lock_not_available THEN
            RAISE EXCEPTION 'jiralake: the invalid index ap_jira_task_event_ingested_at_idx (a failed concurrent build) could not be dropped within 5 s: ap_jira_task_event is in use; run DROP INDEX CONCURRENTLY ap_jira_task_event_ingested_at_idx, then setup again';
        END;
        PERFORM set_config('lock_timeout', saved_lock_timeout, true);
        RETURN;
    END IF;
    -- indkey is an int2vector, whose subscripts start at 0.
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
        WHERE i.indexrelid = found
          AND i.indrelid = 'ap_jira_task_event'::regclass
          AND am.amname = 'btree' AND NOT i.indisunique
          AND i.indnatts = 1
          AND i.indkey[0] = (
              SELECT attnum FROM pg_attribute
              WHERE attrelid = 'ap_jira_task_event'::regclass AND attname = 'ingested_at'
          )
          AND i.indexprs IS NULL AND i.indpred IS NULL
    ) THEN
        RAISE EXCEPTION 'jiralake: an index named ap_jira_task_event_ingested_at_idx exists but is not a plain index on ap_jira_task_event (ingested_at); drop it (history prune needs that one) and run setup again';
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS ap_jira_task_event_ingested_at_idx ON ap_jira_task_event (ingested_at);
