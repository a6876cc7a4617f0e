-- apply_batch --
-- One received batch in one statement (atomic on its own, one round trip): upsert one row per issue
-- from the batch's coalesced changes, then record every delivery in the history with whether it
-- changed the row. Each part of the row moves only to a strictly newer state (jiralake_is_newer,
-- migration 0002): the field columns with the newest full issue object (version, version_tiebreak),
-- the deletion with the newest delete (deleted_version), last_event_* with the newest of both.
-- jsonb values arrive as JSON text (asyncpg would read a list inside a jsonb[] as another array
-- dimension). `raw` comes either as that text (raw_json) or as the winning message's whole body
-- (fields_body), from which PostgreSQL takes the issue object: cheaper than re-encoding it in Python.
-- due_date arrives as ISO text: asyncpg's binary codec turns date.max and date.min (a Jira due date of
-- 9999-12-31 or 0001-01-01) into infinity and -infinity, which are no dates to an analyst or Parquet.
-- `winner` reads ap_jira_task as it was when the statement started (every part of one statement sees
-- the same snapshot, not the upsert's writes), which tells which winner actually changed its row. A
-- transaction that commits the same row between that snapshot and the upsert's row lock makes the
-- snapshot older than the row the upsert compared with, so a part counts as changed only where the
-- row as written (RETURNING) also holds this change's value for it: the newer state that the other
-- transaction wrote keeps its own, and this delivery is recorded and reported as stale.
-- `applied` is a hashed lookup in `won`, the set of winning deliveries: linear in the batch size.
-- ingested_at is the time of the write, not now() (the transaction's start): a batch that waited on
-- another issue's lock would stamp its write earlier than a batch that wrote this row before it, and
-- readers of changes/ keep the row with the greatest ingested_at. Writes of one row are serialized by
-- its lock, so this one is later than every earlier write's commit.
WITH change AS (
    SELECT *
    FROM unnest(
        $1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
        $8::integer[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
        $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::timestamptz[],
        $21::timestamptz[], $22::timestamptz[], $23::text[], $24::text[], $25::text[], $26::bigint[],
        $27::timestamptz[], $28::text[], $29::timestamptz[], $30::text[], $31::text[], $32::text[],
        $33::text[], $34::text[]
    ) AS c (
        issue_id, version, version_tiebreak, issue_key, project_id, project_key, project_name,
        issue_number, summary, status, status_category, issue_type, priority, resolution,
        assignee_account_id, assignee_display_name, reporter_account_id, reporter_display_name,
        labels_json, created_at, updated_at, resolved_at, due_date, parent_key, raw_json, deleted_version,
        deleted_at, last_event_type, last_event_at, last_event_tiebreak, fields_delivery,
        delete_delivery, last_delivery, fields_body
    )
),
event AS (
    SELECT *
    FROM unnest(
        $35::text[], $36::bigint[], $37::text[], $38::text[], $39::timestamptz[], $40::bigint[],
        $41::text[], $42::text[], $43::text[], $44::text[], $45::text[], $46::timestamptz[]
    ) AS e (
        delivery_id, issue_id, event_type, issue_event_type_name, event_at, event_version,
        event_tiebreak, source, changelog_json, actor_account_id, actor_display_name, received_at
    )
),
upserted AS (
    INSERT INTO ap_jira_task AS t (
        issue_id, issue_key, project_id, project_key, project_name, issue_number, summary, status,
        status_category, issue_type, priority, resolution, assignee_account_id, assignee_display_name,
        reporter_account_id, reporter_display_name, labels, created_at, updated_at, resolved_at,
        due_date, parent_key, raw, version, version_tiebreak, deleted_version, deleted_at,
        last_event_type, last_event_at, last_event_tiebreak
    )
    SELECT c.issue_id, c.issue_key, c.project_id, c.project_key, c.project_name, c.issue_number,
           c.summary, c.status, c.status_category, c.issue_type, c.priority, c.resolution,
           c.assignee_account_id, c.assignee_display_name, c.reporter_account_id,
           c.reporter_display_name,
           CASE WHEN c.labels_json IS NOT NULL
                THEN ARRAY(SELECT jsonb_array_elements_text(c.labels_json::jsonb)) END,
           c.created_at, c.updated_at, c.resolved_at, c.due_date::date, c.parent_key,
           coalesce(c.raw_json::jsonb, c.fields_body::jsonb -> 'issue'),
           c.version,
           c.version_tiebreak, c.deleted_version, c.deleted_at, c.last_event_type, c.last_event_at,
           c.last_event_tiebreak
    FROM change c
    ORDER BY c.issue_id
    ON CONFLICT (issue_id) DO UPDATE SET
        issue_key = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.issue_key ELSE t.issue_key END,
        project_id = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.project_id ELSE t.project_id END,
        project_key = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.project_key ELSE t.project_key END,
        project_name = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.project_name ELSE t.project_name END,
        issue_number = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.issue_number ELSE t.issue_number END,
        summary = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.summary ELSE t.summary END,
        status = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.status ELSE t.status END,
        status_category = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.status_category ELSE t.status_category END,
        issue_type = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.issue_type ELSE t.issue_type END,
        priority = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.priority ELSE t.priority END,
        resolution = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.resolution ELSE t.resolution END,
        assignee_account_id = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.assignee_account_id ELSE t.assignee_account_id END,
        assignee_display_name = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.assignee_display_name ELSE t.assignee_display_name END,
        reporter_account_id = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.reporter_account_id ELSE t.reporter_account_id END,
        reporter_display_name = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.reporter_display_name ELSE t.reporter_display_name END,
        labels = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.labels ELSE t.labels END,
        created_at = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.created_at ELSE t.created_at END,
        updated_at = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.updated_at ELSE t.updated_at END,
        resolved_at = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.resolved_at ELSE t.resolved_at END,
        due_date = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.due_date ELSE t.due_date END,
        parent_key = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.parent_key ELSE t.parent_key END,
        raw = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.raw ELSE t.raw END,
        version = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.version ELSE t.version END,
        version_tiebreak = CASE WHEN jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak) THEN excluded.version_tiebreak ELSE t.version_tiebreak END,
        deleted_version = CASE WHEN jiralake_is_newer(excluded.deleted_version, '', t.deleted_version, '') THEN excluded.deleted_version ELSE t.deleted_version END,
        deleted_at = CASE WHEN jiralake_is_newer(excluded.deleted_version, '', t.deleted_version, '') THEN excluded.deleted_at ELSE t.deleted_at END,
        last_event_type = CASE WHEN jiralake_is_newer(excluded.last_event_at, excluded.last_event_tiebreak, t.last_event_at, t.last_event_tiebreak) THEN excluded.last_event_type ELSE t.last_event_type END,
        last_event_at = CASE WHEN jiralake_is_newer(excluded.last_event_at, excluded.last_event_tiebreak, t.last_event_at, t.last_event_tiebreak) THEN excluded.last_event_at ELSE t.last_event_at END,
        last_event_tiebreak = CASE WHEN jiralake_is_newer(excluded.last_event_at, excluded.last_event_tiebreak, t.last_event_at, t.last_event_tiebreak) THEN excluded.last_event_tiebreak ELSE t.last_event_tiebreak END,
        ingested_at = clock_timestamp()
    WHERE jiralake_is_newer(excluded.version, excluded.version_tiebreak, t.version, t.version_tiebreak)
       OR jiralake_is_newer(excluded.deleted_version, '', t.deleted_version, '')
       OR jiralake_is_newer(excluded.last_event_at, excluded.last_event_tiebreak, t.last_event_at, t.last_event_tiebreak)
    RETURNING t.issue_id, t.version AS written_version, t.version_tiebreak AS written_version_tiebreak,
              t.deleted_version AS written_deleted_version, t.last_event_at AS written_last_event_at,
              t.last_event_tiebreak AS written_last_event_tiebreak
),
winner AS (
    -- The deliveries that changed their row: each part's winner, where that part was newer than the
    -- row before and is what the upsert wrote (see above).
    SELECT c.issue_id,
           CASE WHEN jiralake_is_newer(c.version, c.version_tiebreak, b.version, b.version_tiebreak)
                 AND (u.written_version, u.written_version_tiebreak) = (c.version, c.version_tiebreak)
                THEN c.fields_delivery END AS fields_delivery,
           CASE WHEN jiralake_is_newer(c.deleted_version, '', b.deleted_version, '')
                 AND u.written_deleted_version = c.deleted_version
                THEN c.delete_delivery END AS delete_delivery,
           CASE WHEN jiralake_is_newer(c.last_event_at, c.last_event_tiebreak, b.last_event_at, b.last_event_tiebreak)
                 AND (u.written_last_event_at, u.written_last_event_tiebreak) = (c.last_event_at, c.last_event_tiebreak)
                THEN c.last_delivery END AS last_delivery
    FROM change c
    JOIN upserted u ON u.issue_id = c.issue_id
    LEFT JOIN ap_jira_task b ON b.issue_id = c.issue_id  -- the row before the upsert: see above
),
won AS (
    -- One row per delivery that changed its row.
    SELECT d.delivery_id
    FROM winner w
    CROSS JOIN LATERAL unnest(ARRAY[w.fields_delivery, w.delete_delivery, w.last_delivery])
        AS d (delivery_id)
    WHERE d.delivery_id IS NOT NULL
),
recorded AS (
    INSERT INTO ap_jira_task_event (
        delivery_id, issue_id, event_type, issue_event_type_name, event_at, event_version,
        event_tiebreak, source, changelog, actor_account_id, actor_display_name, applied, received_at
    )
    SELECT e.delivery_id, e.issue_id, e.event_type, e.issue_event_type_name, e.event_at,
           e.event_version, e.event_tiebreak, e.source, e.changelog_json::jsonb, e.actor_account_id,
           e.actor_display_name, e.delivery_id IN (SELECT delivery_id FROM won), e.received_at
    FROM event e
    ON CONFLICT (delivery_id) DO NOTHING
    RETURNING delivery_id
)
-- recorded: false when the delivery was already in the history (a redelivery: a duplicate).
SELECT d.delivery_id, r.delivery_id IS NOT NULL AS recorded,
       d.delivery_id IN (SELECT delivery_id FROM won) AS applied
FROM unnest($35::text[]) AS d (delivery_id)
LEFT JOIN recorded r ON r.delivery_id = d.delivery_id;
