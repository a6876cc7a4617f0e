-- Load one CSV file written by `jiralake export` (history/, latest/ or changes/, format csv; gunzip a
-- csv.gz first) back into PostgreSQL, undoing the exporter's newline-safe text escaping. psql script:
--
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -v header="$(head -n 1 restore.csv)" \
--        -f deploy/restore/restore_history.sql
--
-- It reads restore.csv from the current directory (psql's \copy, so the file stays on your machine).
-- By default the rows go to a new table ap_jira_task_restored, shaped like ap_jira_task (dropped and
-- created again on every run); ap_jira_task is not touched. With `-v target=ap_jira_task` they go
-- into ap_jira_task itself, adding only the issues it lacks: a row it holds is never overwritten.
-- Procedure and what to do next: docs/runbook.md, "Restoring from S3 history".
--
-- Columns are matched by name with the file's header, so a file from an older schema loads too;
-- `raw` stays NULL unless the export had --include-raw. Timestamps are exported at millisecond
-- precision; is_deleted is computed again from deleted_version and version.

\set ON_ERROR_STOP on
\if :{?target}
\else
\set target ap_jira_task_restored
\endif
SET standard_conforming_strings = on;
-- The file's timestamps are UTC without an offset.
SET TIME ZONE 'UTC';

-- The exporter's escaping undone: 4 backslashes -> one, 2 backslashes + n / r -> line feed / CR.
CREATE FUNCTION pg_temp.jiralake_decode(value text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN strpos(value, chr(92)) = 0 THEN value ELSE (
        SELECT coalesce(string_agg(CASE t.token[1]
                WHEN repeat(chr(92), 4) THEN chr(92)
                WHEN repeat(chr(92), 2) || 'n' THEN chr(10)
                WHEN repeat(chr(92), 2) || 'r' THEN chr(13)
                ELSE t.token[1] END, '' ORDER BY t.n), '')
        FROM regexp_matches(value, '(\\\\\\\\|\\\\[nr]|[^\\]+|\\)', 'g') WITH ORDINALITY AS t(token, n)
    ) END
$$;

-- 1. The file as it is, every column text, named as in its header.
DROP TABLE IF EXISTS jiralake_restore_text;
SELECT format('CREATE TABLE jiralake_restore_text (%s)',
              string_agg(format('%I text', btrim(h.name, '" ')), ', ' ORDER BY h.n))
FROM regexp_split_to_table(:'header', ',') WITH ORDINALITY AS h(name, n)
\gexec
\copy jiralake_restore_text FROM 'restore.csv' WITH (FORMAT csv, HEADER true)

-- 2. The target table.
SELECT :'target' = 'ap_jira_task_restored' AS fresh_table \gset
\if :fresh_table
DROP TABLE IF EXISTS ap_jira_task_restored;
CREATE TABLE ap_jira_task_restored (LIKE ap_jira_task INCLUDING ALL);
\endif

-- 3. Typed, decoded rows: each column of the target that the file has, in the exporter's terms
--    (exporter/csv_format.py): numbers, booleans, dates and times as they are; text arrays as JSON
--    arrays; everything else escaped text.
SELECT format(
    'INSERT INTO %I (%s) SELECT %s FROM jiralake_restore_text ON CONFLICT (issue_id) DO NOTHING',
    :'target',
    string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum),
    string_agg(CASE
        WHEN t.typname IN ('int8', 'int4', 'int2', 'bool', 'float8', 'float4', 'timestamptz',
                           'timestamp', 'date')
            THEN format('%I::%s', a.attname, format_type(a.atttypid, a.atttypmod))
        WHEN t.typname IN ('_text', '_varchar', '_bpchar')
            THEN format('CASE WHEN %1$I IS NOT NULL THEN ARRAY(SELECT jsonb_array_elements_text('
                        'pg_temp.jiralake_decode(%1$I)::jsonb))::%2$s END',
                        a.attname, format_type(a.atttypid, a.atttypmod))
        ELSE format('pg_temp.jiralake_decode(%I)::%s', a.attname, format_type(a.atttypid, a.atttypmod))
    END, ', ' ORDER BY a.attnum))
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_attribute f ON f.attrelid = 'jiralake_restore_text'::regclass AND f.attname = a.attname
WHERE a.attrelid = :'target'::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
\gexec

DROP TABLE jiralake_restore_text;
SELECT count(*) AS rows_in_target FROM :"target";
