-- What each jiralake service may do in PostgreSQL, one role per service (README.md, "Database").
--
-- The owner role runs `jiralake setup --skip-queues` and so owns every table (migration 0010 changes
-- storage settings only the owner may change). The roles below get only what their service uses.
-- Create them first, with passwords from your secret store (never in this file or in git):
--   CREATE ROLE jiralake_consumer LOGIN PASSWORD '...';   -- and the same for the others you use
-- Then, as the owner, after every `setup` (a new version's migration may add a table):
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/postgres/grants.sql
-- Other role names: -v consumer=name (also exporter, backfill, forget_user, prune, analyst). Granting
-- again changes nothing. A role that does not exist stops the script: create it, or pass the name of
-- one you have.
\if :{?consumer}
\else
\set consumer jiralake_consumer
\endif
\if :{?exporter}
\else
\set exporter jiralake_exporter
\endif
\if :{?backfill}
\else
\set backfill jiralake_backfill
\endif
\if :{?forget_user}
\else
\set forget_user jiralake_forget_user
\endif
\if :{?prune}
\else
\set prune jiralake_prune
\endif
\if :{?analyst}
\else
\set analyst jiralake_analyst
\endif

-- The consumer: upserts rows and history; reads the schema's version before each receive and the last
-- export's time for its freshness gauge.
GRANT SELECT, INSERT, UPDATE ON ap_jira_task, ap_jira_task_event TO :"consumer";
GRANT SELECT ON jiralake_schema_migrations, jiralake_export_run TO :"consumer";

-- The exporter: reads the table; records its runs and open multipart uploads.
GRANT SELECT ON ap_jira_task TO :"exporter";
GRANT SELECT, INSERT, UPDATE ON jiralake_export_run TO :"exporter";
GRANT SELECT, INSERT, UPDATE, DELETE ON jiralake_export_upload TO :"exporter";
GRANT USAGE ON SEQUENCE jiralake_export_run_run_id_seq, jiralake_export_upload_upload_ref_seq TO :"exporter";

-- backfill and reconcile: their progress; reconcile reads which issues the table holds.
GRANT SELECT ON ap_jira_task TO :"backfill";
GRANT SELECT, INSERT, UPDATE, DELETE
    ON jiralake_backfill_run, jiralake_backfill_watermark, jiralake_failed_webhook_cursor TO :"backfill";

-- forget-user: rewrites rows of both tables; reads (and, the first time, creates) the pseudonym key.
GRANT SELECT, UPDATE ON ap_jira_task, ap_jira_task_event TO :"forget_user";
GRANT SELECT, INSERT ON jiralake_pseudonym_key TO :"forget_user";

-- history prune: deletes old history rows.
GRANT SELECT, DELETE ON ap_jira_task_event TO :"prune";

-- Analysts and BI tools (Superset, QuickSight): the two tables, never the pseudonym key.
GRANT SELECT ON ap_jira_task, ap_jira_task_event TO :"analyst";
