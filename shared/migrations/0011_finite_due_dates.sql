-- Due dates stored before the consumer sent them as text: asyncpg's binary codec had turned Jira's
-- 9999-12-31 and 0001-01-01 into infinity and -infinity, which are no dates to an analyst querying
-- the table (exports already wrote them as those two dates: exporter/columns.py). Only such rows are
-- rewritten; ingested_at stays, as every export since wrote the same values.
-- The rows are locked in issue_id order, the order the consumer's batches lock in, so a batch running
-- meanwhile waits for this one instead of deadlocking with it.
UPDATE ap_jira_task t
SET due_date = CASE WHEN t.due_date = 'infinity' THEN DATE '9999-12-31' ELSE DATE '0001-01-01' END
FROM (
    SELECT issue_id FROM ap_jira_task
    WHERE due_date IN ('infinity', '-infinity')
    ORDER BY issue_id
    FOR UPDATE
) AS locked
WHERE t.issue_id = locked.issue_id;
