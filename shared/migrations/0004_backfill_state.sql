-- Backfill and reconcile bookkeeping (backfill/state.py). Nothing here is issue data.

-- A backfill in progress: the JQL exactly as sent to Jira and the cursor of the next page, saved
-- after each page's snapshots were accepted by SQS. A restarted backfill with the same request
-- continues from here; a complete run deletes its row.
CREATE TABLE jiralake_backfill_run (
    job_key         text PRIMARY KEY,       -- sha256 of (Jira URL, request JQL, --updated-since, expand)
    jira_url        text NOT NULL,
    request_jql     text NOT NULL,          -- as the operator gave it ('' for the default)
    updated_since   text NOT NULL,          -- as the operator gave it ('' for none)
    effective_jql   text NOT NULL,          -- as sent to Jira
    covers_from     timestamptz,            -- the updated-since bound it asked for; NULL = all time
    -- nextPageToken (Cloud); Data Center: JSON {"startAt", "recent"} (backfill/jira_client.py
    -- OffsetCursor), or a plain startAt saved by an older version; NULL = first page
    next_cursor     text,
    pages_done      integer NOT NULL DEFAULT 0,
    issues_sent     bigint NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- When the last complete backfill of a query started: --updated-since last-run reads it.
CREATE TABLE jiralake_backfill_watermark (
    jira_url        text NOT NULL,
    request_jql     text NOT NULL,
    watermark       timestamptz NOT NULL,
    effective_jql   text NOT NULL,
    issues_sent     bigint NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (jira_url, request_jql)
);

-- Reconcile's place in Jira Cloud's failed-webhook list: the failureTime of the last entry replayed.
CREATE TABLE jiralake_failed_webhook_cursor (
    jira_url        text PRIMARY KEY,
    failed_after_ms bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
