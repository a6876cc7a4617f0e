-- One row per Jira issue, keyed by Jira's immutable numeric id. Rows are never deleted: a deleted
-- issue keeps its data and is flagged (is_deleted, deleted_at).
--
-- Ordering: every event carries a version (its own time in ms) and a tie-break string for equal
-- times (see docs/consumer.md; tie-breaks compare byte-wise, COLLATE "C"). Field columns come from
-- the newest event that carries a full issue object (version, version_tiebreak); deletion from the
-- newest delete event (deleted_version). An issue is deleted when its newest delete is not older
-- than its field state, so any delivery order of the same events gives the same row.
CREATE TABLE ap_jira_task (
    issue_id                bigint PRIMARY KEY,
    issue_key               text,
    project_id              bigint,
    project_key             text,
    project_name            text,
    issue_number            integer,
    summary                 text,
    status                  text,
    status_category         text,
    issue_type              text,
    priority                text,
    resolution              text,
    assignee_account_id     text,
    assignee_display_name   text,
    reporter_account_id     text,
    reporter_display_name   text,
    labels                  text[],
    created_at              timestamptz,
    updated_at              timestamptz,
    resolved_at             timestamptz,
    due_date                date,
    parent_key              text,
    version                 bigint,
    version_tiebreak        text,
    deleted_version         bigint,
    deleted_at              timestamptz,
    is_deleted              boolean GENERATED ALWAYS AS (
        deleted_version IS NOT NULL AND (version IS NULL OR deleted_version >= version)
    ) STORED,
    last_event_type         text,
    last_event_at           timestamptz,
    last_event_tiebreak     text,
    raw                     jsonb,
    ingested_at             timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ap_jira_task_issue_number_idx ON ap_jira_task (issue_number);
CREATE INDEX ap_jira_task_project_key_idx ON ap_jira_task (project_key, issue_number);
CREATE INDEX ap_jira_task_updated_at_idx ON ap_jira_task (updated_at);

-- Append-only history: one row per distinct delivery, late and no-op ones included.
CREATE TABLE ap_jira_task_event (
    delivery_id             text PRIMARY KEY,
    issue_id                bigint NOT NULL,
    event_type              text NOT NULL,
    issue_event_type_name   text,
    event_at                timestamptz NOT NULL,
    event_version           bigint NOT NULL,
    event_tiebreak          text NOT NULL,
    source                  text NOT NULL DEFAULT 'webhook',
    changelog               jsonb,
    actor_account_id        text,
    actor_display_name      text,
    applied                 boolean NOT NULL,
    received_at             timestamptz,
    ingested_at             timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ap_jira_task_event_issue_idx ON ap_jira_task_event (issue_id, event_at);
