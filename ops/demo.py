"""``jiralake up --demo``: send the repository's real sample webhooks to the local receiver, signed as
Jira signs them, wait until the consumer applied them, and show what landed in Postgres and S3."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from exporter.run import ExportResult
from exporter.settings import ExporterSettings
from receiver.intake import DELIVERY_HEADER
from receiver.signature import SIGNATURE_HEADER, sign
from shared import aws, db
from shared.errors import CommandError
from shared.jira_event import InvalidEvent, Routed, route
from shared.settings import DatabaseSettings

# The sample webhooks live with the tests (tests/fixtures/jira-webhooks, with their SOURCES.md): beside
# the code in a checkout (an editable install), else in the checkout the command runs from.
FIXTURES_IN_CHECKOUT = Path("tests") / "fixtures" / "jira-webhooks"
DEFAULT_FIXTURES = Path(__file__).resolve().parent.parent / FIXTURES_IN_CHECKOUT

# -- table_exists --
_TABLE_EXISTS = "SELECT to_regclass('ap_jira_task') IS NOT NULL"
# -- issues_not_in_the_samples --
_OTHER_ISSUES = "SELECT count(*) FROM ap_jira_task WHERE issue_id <> ALL($1::bigint[])"

# -- count_applied --
_COUNT_APPLIED = "SELECT count(*) FROM ap_jira_task_event WHERE delivery_id = ANY($1::text[])"

# -- demo_rows --
_DEMO_ROWS = """
SELECT issue_key, issue_type, status, is_deleted, left(coalesce(summary, ''), 48) AS summary
FROM ap_jira_task
ORDER BY project_key NULLS LAST, issue_number NULLS LAST, issue_id
"""


@dataclass
class Sent:
    total: int = 0
    queued: int = 0
    ignored: int = 0
    failed: list[str] = field(default_factory=list)
    delivery_ids: list[str] = field(default_factory=list)


def fixtures_dir(given: Path | None) -> Path:
    candidates = [given] if given is not None else [DEFAULT_FIXTURES, Path.cwd() / FIXTURES_IN_CHECKOUT]
    for path in candidates:
        if path.is_dir() and any(path.glob("*.json")):
            return path
    where = " or ".join(str(path) for path in candidates)
    raise CommandError(
        f"no sample webhooks in {where}: run from a checkout of the repository or pass --fixtures DIR",
        exit_code=2,
    )


def sample_issue_ids(folder: Path) -> list[int]:
    """The ids of the issues the sample webhooks are about."""
    ids: set[int] = set()
    for _, body in _read_bodies(folder):
        try:
            routed = route(json.loads(body))
        except (ValueError, InvalidEvent):
            continue
        if isinstance(routed, Routed):
            ids.add(int(routed.issue_id))
    return sorted(ids)


async def refuse_a_table_of_real_issues(database_url: str | None, folder: Path) -> None:
    """The demo adds its sample issues to ``ap_jira_task`` (and to the exports): only where that table
    holds nothing else, so a DATABASE_URL left pointing at a real jiralake database is refused before
    anything (migrations included) touches it."""
    conn = await asyncpg.connect(dsn=database_url)
    try:
        exists = await conn.fetchval(_TABLE_EXISTS)
        others = await conn.fetchval(_OTHER_ISSUES, sample_issue_ids(folder)) if exists else 0
    finally:
        await conn.close()
    if others:
        raise CommandError(
            f"the database holds {others} issue(s) that are not the demo's samples (DATABASE_URL pointing "
            "at a real jiralake database?): the demo would add its sample issues to that table and its "
            "exports; unset DATABASE_URL or point it at an empty database",
            exit_code=2,
        )


async def wait_until_listening(host: str, port: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise CommandError(f"the receiver did not listen on {host}:{port} within {timeout_s:.0f}s")


async def send_fixtures(url: str, secret: str | None, folder: Path) -> Sent:
    """POST every sample body as Jira would: signed, with a delivery identifier per body."""
    sent = Sent()
    bodies = await asyncio.to_thread(_read_bodies, folder)
    async with aiohttp.ClientSession() as session:
        for path, body in bodies:
            delivery_id = "demo-" + hashlib.sha256(body).hexdigest()[:32]
            headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery_id}
            if secret:
                headers[SIGNATURE_HEADER] = sign(secret, body)
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.json(content_type=None)
            sent.total += 1
            if resp.status == 202 and answer.get("status") == "accepted":
                sent.queued += 1
                sent.delivery_ids.append(delivery_id)
            elif resp.status == 202:
                sent.ignored += 1
            else:
                sent.failed.append(f"{path.name}: HTTP {resp.status} {json.dumps(answer)[:120]}")
    return sent


def _read_bodies(folder: Path) -> list[tuple[Path, bytes]]:
    return [(path, path.read_bytes()) for path in sorted(folder.glob("*.json"))]


async def wait_until_applied(
    database: DatabaseSettings, delivery_ids: list[str], timeout_s: float, stop: asyncio.Event
) -> bool:
    conn = await db.connect(database)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not stop.is_set():
            if await conn.fetchval(_COUNT_APPLIED, delivery_ids) >= len(set(delivery_ids)):
                return True
            await asyncio.sleep(0.25)
        return False
    finally:
        await conn.close()


async def print_results(database: DatabaseSettings, exporter: ExporterSettings, result: ExportResult) -> None:
    conn = await db.connect(database)
    try:
        rows = await conn.fetch(_DEMO_ROWS)
    finally:
        await conn.close()
    print(f"\nap_jira_task now holds {len(rows)} issues:")
    print(f"  {'issue':<12} {'type':<10} {'status':<14} {'deleted':<8} summary")
    for row in rows:
        print(
            f"  {row['issue_key'] or '?':<12} {(row['issue_type'] or '')[:10]:<10} "
            f"{(row['status'] or '')[:14]:<14} {'yes' if row['is_deleted'] else '':<8} {row['summary']}"
        )
    async with aws.s3_client(exporter.aws) as s3:
        listing = await s3.list_objects_v2(Bucket=exporter.bucket, Prefix=exporter.prefix)
    print(f"\nExport: {result.rows} rows, {result.bytes} bytes. Objects in s3://{exporter.bucket}/:")
    for obj in listing.get("Contents", []):
        print(f"  {obj['Key']}  ({obj['Size']} bytes)")
