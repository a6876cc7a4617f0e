"""Pre-filling ``ap_jira_task`` with synthetic rows of realistic widths, set-based (one INSERT ... SELECT
over ``generate_series``), for the apply stage (100k rows) and the exporter stage (1M and 4M rows).

Widths follow what Jira Cloud sends: keys like ``PRJ7-123456``, 40-80 character summaries, Cloud
account ids (``557058:`` + 32 hex), display names, two labels, timestamps on about half the optional
columns. A CSV row of the exporter's default columns comes to about 560 bytes. ``raw`` (the whole issue
object, left out of CSV exports) is a small object plus ``raw_pad_chars`` characters of description.
"""

from __future__ import annotations

import asyncpg

# -- fill_tasks --
# $1 first issue id, $2 last issue id, $3 description characters in raw. Rows are older than any
# benchmark event (version 1.6e12 ms = 2020-09-13), so events always win over them.
FILL_TASKS = """
INSERT INTO ap_jira_task (
    issue_id, issue_key, project_id, project_key, project_name, issue_number, summary, status,
    status_category, issue_type, priority, resolution, assignee_account_id, assignee_display_name,
    reporter_account_id, reporter_display_name, labels, created_at, updated_at, resolved_at, due_date,
    parent_key, version, version_tiebreak, last_event_type, last_event_at, last_event_tiebreak, raw
)
SELECT i,
       'PRJ' || (i % 40) || '-' || i,
       10000 + i % 40,
       'PRJ' || (i % 40),
       'Project ' || (i % 40) || ' ' || substr(md5((i % 40)::text), 1, 12),
       i,
       'Summary of issue ' || i || ': ' || substr(repeat(md5(i::text), 3), 1, 25 + (i * 7) % 45),
       (ARRAY['To Do', 'In Progress', 'In Review', 'Done'])[1 + i % 4],
       (ARRAY['new', 'indeterminate', 'indeterminate', 'done'])[1 + i % 4],
       (ARRAY['Bug', 'Story', 'Task', 'Sub-task'])[1 + i % 4],
       (ARRAY['Low', 'Medium', 'High'])[1 + i % 3],
       CASE WHEN i % 4 = 3 THEN 'Done' END,
       CASE WHEN i % 5 <> 0 THEN '557058:' || md5('assignee' || (i % 700)) END,
       CASE WHEN i % 5 <> 0 THEN 'Assignee ' || (i % 700) || ' ' || substr(md5((i % 700)::text), 1, 8) END,
       '557058:' || md5('reporter' || (i % 300)),
       'Reporter ' || (i % 300) || ' ' || substr(md5((i % 300)::text), 1, 8),
       ARRAY['team-' || (i % 7), 'component-' || (i % 11)],
       timestamptz '2020-01-01 00:00:00+00' + make_interval(mins => i % 1500000),
       timestamptz '2020-06-01 00:00:00+00' + make_interval(mins => i % 1500000),
       CASE WHEN i % 4 = 3 THEN timestamptz '2020-09-01 00:00:00+00' + make_interval(mins => i % 1500000) END,
       CASE WHEN i % 3 = 0 THEN date '2024-01-01' + i % 365 END,
       CASE WHEN i % 5 = 0 THEN 'PRJ' || (i % 40) || '-' || (i / 5) END,
       1600000000000 + i,
       '00000000000000000000:' || md5(i::text) || md5((-i)::text),
       'jira:issue_updated',
       timestamptz '2020-09-13 12:26:40+00' + make_interval(secs => i / 1000.0),
       '00000000000000000000:' || md5(i::text) || md5((-i)::text),
       jsonb_build_object(
           'id', i::text,
           'key', 'PRJ' || (i % 40) || '-' || i,
           'fields', jsonb_build_object(
               'description', substr(repeat(md5(i::text), 1 + $3::integer / 32), 1, $3::integer)
           )
       )
FROM generate_series($1::integer, $2::integer) AS i
"""

# -- count_tasks --
COUNT_TASKS = "SELECT count(*) FROM ap_jira_task"


async def fill_tasks(conn: asyncpg.Connection, first_id: int, last_id: int, *, raw_pad_chars: int) -> None:
    """Insert rows ``first_id..last_id`` (inclusive), then VACUUM ANALYZE so every later read sees
    settled pages (hint bits set, visibility map current) rather than paying for that itself."""
    await conn.execute(FILL_TASKS, first_id, last_id, raw_pad_chars, timeout=3600)
    await conn.execute("VACUUM (ANALYZE) ap_jira_task", timeout=3600)


async def count_tasks(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(COUNT_TASKS))
