-- Due dates stored before the consumer sent them as text: asyncpg's binary codec had turned Jira's
-- 9999-12-31 and 0001-01-01 into infinity and -infinity, which are no dates to an analyst querying
-- the table (exports already wrote them as those two dates: exporter/columns.py). Only such rows are
-- rewritten; ingested_at stays, as every export since wrote the same values.
UPDATE ap_jira_task SET due_date = DATE '9999-12-31' WHERE due_date = 'infinity';
UPDATE ap_jira_task SET due_date = DATE '0001-01-01' WHERE due_date = '-infinity';
