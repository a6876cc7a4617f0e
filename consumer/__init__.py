"""The SQS-to-Postgres worker: ordered, idempotent upserts into ap_jira_task (docs/consumer.md)."""
