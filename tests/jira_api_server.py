"""A local aiohttp server that speaks the Jira REST shapes backfill and reconcile use, serving issue
objects taken from the real webhook fixtures (ids, keys and times varied).

- Cloud: ``GET /rest/api/2/search/jql`` and ``/rest/api/3/search/jql`` (``nextPageToken``,
  ``isLast``; refuses unbounded JQL, a token minted for another JQL and an expired one; v3
  renders rich text as Atlassian Document Format, as real Cloud does),
  ``POST /rest/api/3/search/approximate-count``, ``GET /rest/api/3/issue/{id}``,
  ``GET /rest/api/3/myself``, ``GET /rest/api/3/webhook/failed``.
- Data Center: ``GET /rest/api/2/search`` (``startAt``, ``total``), ``/rest/api/2/issue/{id}``,
  ``/rest/api/2/myself`` (Data Center's account shape: ``name`` and ``key``, no ``accountId``).
- Auth: basic (email + API token) or bearer (PAT); anything else is 401.
- Faults on demand: queued throttling answers per page (429/503 with Retry-After, or Jira Cloud's
  429 with only ``X-RateLimit-Reset``, repeated until the reset on ``clock``), a page from which
  every search fails (a Jira that "dies" mid-run), 403/404 for chosen issue ids, a change to the
  issues right after a Data Center page was answered (a delete or an edit mid-run), and answers
  that are not Jira's: a redirect to an SSO login page, or a proxy's JSON.
- JQL: only ``updated >= "yyyy-MM-dd HH:mm"`` (read in ``time_zone``) filters; the rest is recorded.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from backfill.settings import BackfillSettings, JiraSettings
from shared.jira_event import parse_jira_time
from shared.provision import QueuePair
from shared.settings import AwsSettings, DatabaseSettings
from tests.jira_fixtures import load, names

EMAIL = "backfill@example.com"
API_TOKEN = "cloud-api-token-s3cr3t"
PAT = "dc-personal-access-token-s3cr3t"

_UPDATED_GE = re.compile(r'updated\s*>=\s*"(\d{4}-\d{2}-\d{2} \d{2}:\d{2})"', re.IGNORECASE)
# Fields REST v3 returns as Atlassian Document Format (v2 and webhooks: wiki-markup strings).
RICH_TEXT_FIELDS = ("description", "environment")
_UNBOUNDED = re.compile(r"^\s*(order\s+by\b.*)?$", re.IGNORECASE | re.DOTALL)


def adf_doc(text: str) -> dict[str, Any]:
    """Plain text as the Atlassian Document Format object REST v3 returns for a rich text field."""
    return {
        "type": "doc",
        "version": 1,
        "content": [{"type": "paragraph", "content": [{"type": "text", "text": text}]}],
    }


@cache
def template_names() -> tuple[str, ...]:
    """Fixtures whose ``issue`` is a full issue object (fields with project, status and updated)."""
    found = []
    for name in names():
        body = load(name)
        issue = body.get("issue") if isinstance(body, dict) else None
        fields = issue.get("fields") if isinstance(issue, dict) else None
        if isinstance(fields, dict) and {"project", "status", "updated", "issuetype"} <= fields.keys():
            found.append(name)
    return tuple(found)


def jira_time(when: datetime) -> str:
    """Jira's own format: ``2024-01-01T10:00:00.000+0000``."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}" + when.strftime("%z")


def fixture_issue(
    index: int, *, issue_id: int, key: str, updated: datetime, base_url: str = "https://jira.example"
) -> dict[str, Any]:
    """A real fixture's issue object with a new id, key and ``updated`` time."""
    templates = template_names()
    issue: dict[str, Any] = copy.deepcopy(load(templates[index % len(templates)])["issue"])
    issue["id"] = str(issue_id)
    issue["key"] = key
    issue["self"] = f"{base_url}/rest/api/2/issue/{issue_id}"
    issue["fields"]["updated"] = jira_time(updated)
    issue["fields"]["created"] = jira_time(updated - timedelta(days=30))
    return issue


def fixture_issues(
    count: int,
    *,
    first_id: int = 30_000,
    project: str = "BF",
    first_updated: datetime = datetime(2024, 1, 1, tzinfo=UTC),
) -> list[dict[str, Any]]:
    """``count`` issues cycling through the real fixtures, updated one minute apart."""
    return [
        fixture_issue(
            n, issue_id=first_id + n, key=f"{project}-{n + 1}", updated=first_updated + timedelta(minutes=n)
        )
        for n in range(count)
    ]


@dataclass(frozen=True)
class RateLimited:
    """A throttle entry: Jira Cloud's 429 without Retry-After, whose ``X-RateLimit-Reset`` lies
    ``reset_in_s`` ahead of the server's clock. Every search answers the same 429 until then."""

    reset_in_s: float
    reason: str = "jira-burst-based"


@dataclass
class JiraApiServer:
    issues: list[dict[str, Any]] = field(default_factory=list)
    # GET issue/{id} answers for ids that are not in ``issues`` (those answer 200).
    issue_status: dict[str, int] = field(default_factory=dict)
    # Issues that exist (GET answers 200) but no search returns: outside the JQL.
    outside_jql: set[str] = field(default_factory=set)
    time_zone: str = "UTC"
    # Page index -> answers served (and used up) before the page itself: (status, Retry-After), or
    # a RateLimited entry.
    throttle: dict[int, list[tuple[int, str | None] | RateLimited]] = field(default_factory=dict)
    # Wall time as the server sees it: when a rate limit resets, when each search arrived.
    clock: Callable[[], float] = time.time
    # Every search for this page index or later answers 500 (a Jira that went away mid-run).
    fail_from_page: int | None = None
    # None: 403 as for a non-Connect account. Else the entries, oldest failure first.
    failed_webhooks: list[dict[str, Any]] | None = None
    failed_webhooks_page_size: int = 100
    # Raising it expires every nextPageToken handed out so far (Cloud's expire after 7 days).
    token_generation: int = 0
    # What was asked.
    page_requests: Counter[int] = field(default_factory=Counter)
    # (page index, clock()) of every search, in arrival order.
    page_request_times: list[tuple[int, float]] = field(default_factory=list)
    # Epoch seconds of every X-RateLimit-Reset sent, as sent; the last one is in force.
    rate_limit_resets: list[float] = field(default_factory=list)
    jqls: list[str] = field(default_factory=list)
    search_paths: list[str] = field(default_factory=list)
    failed_webhook_afters: list[str | None] = field(default_factory=list)
    issue_lookups: list[str] = field(default_factory=list)
    count_requests: int = 0
    # Text in a JQL -> the error Jira's search and count answer it with (400): a misspelt field.
    refused_jql: dict[str, str] = field(default_factory=dict)
    # Data Center page index -> a change to ``issues`` made (once) right after that page was
    # answered: an issue deleted or edited while the backfill runs.
    change_after_page: dict[int, Callable[[list[dict[str, Any]]], None]] = field(default_factory=dict)
    # Endpoints ("search", "count", "myself", "webhook/failed") that answer 302 to an HTML SSO login page,
    # which answers 200 (an identity provider in front of Jira, with the credentials not accepted).
    login_redirect: set[str] = field(default_factory=set)
    # Endpoint ("search", "count", "myself", "webhook/failed") -> JSON answered with 200 instead of Jira's
    # (a proxy's page).
    foreign_json: dict[str, Any] = field(default_factory=dict)
    # Endpoint ("search", "webhook/failed") -> a change made to each of its 200 answers before it goes
    # out, given the request: a Jira (or a proxy) answering against its own contract.
    tamper: dict[str, Callable[[web.Request, dict[str, Any]], None]] = field(default_factory=dict)
    # Data Center page size, per ``fields``, learned from the first page-one search (startAt 0): a
    # search's page index is the first page boundary at or after its startAt, so a search that
    # overlaps the page before (startAt a few issues early) counts as the page it goes on to.
    _dc_page_sizes: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    # The rate limit in force: the X-RateLimit-Reset and RateLimit-Reason sent with its 429s.
    _limit_reset: str = field(default="", init=False, repr=False)
    _limit_reason: str = field(default="", init=False, repr=False)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/rest/api/{version:[23]}/search/jql", self._cloud_search)
        app.router.add_post("/rest/api/3/search/approximate-count", self._approximate_count)
        app.router.add_get("/rest/api/2/search", self._dc_search)
        app.router.add_get("/rest/api/{version:[23]}/issue/{issue_id}", self._issue)
        app.router.add_get("/rest/api/{version:[23]}/myself", self._myself)
        app.router.add_get("/rest/api/3/webhook/failed", self._failed_webhooks)
        app.router.add_get("/sso/login", self._sso_login)
        return app

    # -- middleware --

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        basic = "Basic " + base64.b64encode(f"{EMAIL}:{API_TOKEN}".encode()).decode()
        if request.path == "/sso/login":  # the identity provider's page: no Jira credentials
            login: web.StreamResponse = await handler(request)
            return login
        if request.headers.get("Authorization") not in {basic, f"Bearer {PAT}"}:
            return web.json_response(
                {
                    "errorMessages": [
                        "You are not authenticated. Authentication required to perform this operation."
                    ]
                },
                status=401,
            )
        response: web.StreamResponse = await handler(request)
        return response

    def _impostor(self, endpoint: str, request: web.Request) -> web.Response | None:
        """What stands in for Jira's answer at ``endpoint``, if a test put something there."""
        if endpoint in self.login_redirect:
            raise web.HTTPFound(f"/sso/login?redirect_to={request.path}")
        if endpoint in self.foreign_json:
            return web.json_response(self.foreign_json[endpoint])
        return None

    async def _sso_login(self, request: web.Request) -> web.Response:
        return web.Response(
            text="<!DOCTYPE html>\n<html><head><title>Sign in - Example SSO</title></head>"
            "<body><form method='post'>...</form></body></html>",
            content_type="text/html",
        )

    # -- search --

    def _matching(self, jql: str) -> list[dict[str, Any]]:
        found = [i for i in self.issues if i["id"] not in self.outside_jql]
        bound = _UPDATED_GE.search(jql)
        if bound:
            since = datetime.strptime(bound[1], "%Y-%m-%d %H:%M").replace(tzinfo=ZoneInfo(self.time_zone))
            found = [i for i in found if (parse_jira_time(i["fields"]["updated"]) or since) >= since]
        return found

    def _jql_refused(self, jql: str) -> web.Response | None:
        for text, message in self.refused_jql.items():
            if text in jql:
                return web.json_response({"errorMessages": [message], "errors": {}}, status=400)
        return None

    def _rate_limited(self) -> web.Response:
        return web.json_response(
            {"errorMessages": ["Rate limit exceeded."]},
            status=429,
            headers={
                "X-RateLimit-Reset": self._limit_reset,
                "RateLimit-Reason": self._limit_reason,
                "X-RateLimit-Limit": "100",
                "X-RateLimit-Remaining": "0",
            },
        )

    def _fault(self, page: int) -> web.Response | None:
        now = self.clock()
        self.page_requests[page] += 1
        self.page_request_times.append((page, now))
        if self.rate_limit_resets and now < self.rate_limit_resets[-1]:
            return self._rate_limited()
        queued = self.throttle.get(page)
        if queued:
            entry = queued.pop(0)
            if isinstance(entry, RateLimited):
                when = datetime.fromtimestamp(now + entry.reset_in_s, UTC).isoformat(timespec="milliseconds")
                self._limit_reset, self._limit_reason = when.replace("+00:00", "Z"), entry.reason
                # In force until the instant the header names (milliseconds), not a hair less.
                self.rate_limit_resets.append(datetime.fromisoformat(when).timestamp())
                return self._rate_limited()
            status, retry_after = entry
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return web.json_response(
                {"errorMessages": ["Rate limit exceeded."]}, status=status, headers=headers
            )
        if self.fail_from_page is not None and page >= self.fail_from_page:
            return web.json_response({"errorMessages": ["Internal server error"]}, status=500)
        return None

    def _shape(
        self, issue: dict[str, Any], fields: str, expand: str, *, cloud: bool, adf: bool = False
    ) -> dict[str, Any]:
        if fields == "id":
            return (
                {"id": issue["id"]}
                if cloud
                else {"id": issue["id"], "key": issue["key"], "self": issue["self"]}
            )
        shaped = copy.deepcopy(issue)
        if adf:  # REST v3: rich text fields are Atlassian Document Format, not wiki markup
            for name in RICH_TEXT_FIELDS:
                if isinstance(shaped["fields"].get(name), str):
                    shaped["fields"][name] = adf_doc(shaped["fields"][name])
        if "changelog" in expand.split(","):
            shaped["changelog"] = {"startAt": 0, "maxResults": 0, "total": 0, "histories": []}
        return shaped

    async def _cloud_search(self, request: web.Request) -> web.Response:
        impostor = self._impostor("search", request)
        if impostor is not None:
            return impostor
        jql = request.query.get("jql", "")
        self.jqls.append(jql)
        self.search_paths.append(request.path)
        refused = self._jql_refused(jql)
        if refused is not None:
            return refused
        if _UNBOUNDED.match(jql):
            return web.json_response(
                {
                    "errorMessages": [
                        "Unbounded JQL queries are not allowed here. "
                        "Please add a search restriction to your query."
                    ],
                    "errors": {},
                },
                status=400,
            )
        fields = request.query.get("fields", "id")
        limit = min(int(request.query.get("maxResults", "50")), 5000 if fields == "id" else 100)
        offset = 0
        token = request.query.get("nextPageToken")
        if token is not None:
            decoded = _read_token(token)
            if decoded is None or decoded[1] != _jql_hash(jql, self.token_generation):
                return web.json_response(
                    {"errorMessages": ["The provided next page token is invalid or expired."]}, status=400
                )
            offset = decoded[0]
        fault = self._fault(offset // max(limit, 1))
        if fault is not None:
            return fault
        matching = self._matching(jql)
        chunk = matching[offset : offset + limit]
        end = offset + len(chunk)
        body: dict[str, Any] = {
            "issues": [
                self._shape(
                    i,
                    fields,
                    request.query.get("expand", ""),
                    cloud=True,
                    adf=request.match_info["version"] == "3",
                )
                for i in chunk
            ],
            "isLast": end >= len(matching),
        }
        if end < len(matching):
            body["nextPageToken"] = _token(end, jql, self.token_generation)
        return self._answer("search", request, body)

    async def _approximate_count(self, request: web.Request) -> web.Response:
        self.count_requests += 1
        impostor = self._impostor("count", request)
        if impostor is not None:
            return impostor
        payload = await request.json()
        refused = self._jql_refused(payload.get("jql", ""))
        if refused is not None:
            return refused
        return web.json_response({"count": len(self._matching(payload.get("jql", "")))})

    async def _dc_search(self, request: web.Request) -> web.Response:
        impostor = self._impostor("search", request)
        if impostor is not None:
            return impostor
        jql = request.query.get("jql", "")
        self.jqls.append(jql)
        refused = self._jql_refused(jql)
        if refused is not None:
            return refused
        fields = request.query.get("fields", "*navigable")
        limit = min(int(request.query.get("maxResults", "50")), 1000)
        start_at = int(request.query.get("startAt", "0"))
        page = 0
        if limit > 0:
            if start_at == 0:
                self._dc_page_sizes.setdefault(fields, limit)
            size = self._dc_page_sizes.get(fields, limit)
            page = -(-start_at // size)
            fault = self._fault(page)
            if fault is not None:
                return fault
        matching = self._matching(jql)
        chunk = matching[start_at : start_at + limit]
        response = self._answer(
            "search",
            request,
            {
                "expand": "schema,names",
                "startAt": start_at,
                "maxResults": limit,
                "total": len(matching),
                "issues": [
                    self._shape(i, fields, request.query.get("expand", ""), cloud=False) for i in chunk
                ],
            },
        )
        change = self.change_after_page.pop(page, None) if limit > 0 else None
        if change is not None:
            change(self.issues)
        return response

    # -- single issue, account, failed webhooks --

    async def _issue(self, request: web.Request) -> web.Response:
        issue_id = request.match_info["issue_id"]
        self.issue_lookups.append(issue_id)
        if any(i["id"] == issue_id for i in self.issues):
            return web.json_response(
                {"id": issue_id, "self": f"https://jira.example/rest/api/2/issue/{issue_id}"}
            )
        status = self.issue_status.get(issue_id, 404)
        messages = {
            404: "Issue does not exist or you do not have permission to see it.",
            403: "You do not have the permission to see the specified issue.",
            401: "You are not authorized to see this issue.",
        }
        return web.json_response(
            {"errorMessages": [messages.get(status, "error")], "errors": {}}, status=status
        )

    async def _myself(self, request: web.Request) -> web.Response:
        impostor = self._impostor("myself", request)
        if impostor is not None:
            return impostor
        if request.match_info["version"] == "2":  # Data Center: users have a name and a key
            return web.json_response(
                {
                    "self": f"{request.url.origin()}/rest/api/2/user?username=backfill",
                    "key": "JIRAUSER10100",
                    "name": "backfill",
                    "displayName": "Backfill Bot",
                    "active": True,
                    "timeZone": self.time_zone,
                }
            )
        return web.json_response(
            {
                "accountId": "5b10a2844c20165700ede21g",
                "displayName": "Backfill Bot",
                "timeZone": self.time_zone,
            }
        )

    async def _failed_webhooks(self, request: web.Request) -> web.Response:
        after = request.query.get("after")
        self.failed_webhook_afters.append(after)
        impostor = self._impostor("webhook/failed", request)
        if impostor is not None:
            return impostor
        if self.failed_webhooks is None:
            return web.json_response(
                {"errorMessages": ["Only Connect apps can use this operation."], "errors": {}}, status=403
            )
        limit = min(int(request.query.get("maxResults", "100")), self.failed_webhooks_page_size)
        values = [w for w in self.failed_webhooks if after is None or w["failureTime"] > int(after)][:limit]
        body: dict[str, Any] = {"values": values, "maxResults": limit}
        if values:
            body["next"] = (
                f"{request.url.origin()}/rest/api/3/webhook/failed?after={values[-1]['failureTime']}"
            )
        return self._answer("webhook/failed", request, body)

    def _answer(self, endpoint: str, request: web.Request, body: dict[str, Any]) -> web.Response:
        if endpoint in self.tamper:
            self.tamper[endpoint](request, body)
        return web.json_response(body)  # json.dumps: a float("nan") put there goes out as NaN


def _jql_hash(jql: str, generation: int) -> str:
    return hashlib.sha256(f"{generation}:{jql}".encode()).hexdigest()[:12]


def _token(offset: int, jql: str, generation: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([offset, _jql_hash(jql, generation)]).encode()).decode()


def _read_token(token: str) -> tuple[int, str] | None:
    try:
        offset, digest = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError):
        return None
    return int(offset), str(digest)


@asynccontextmanager
async def serve(server: JiraApiServer) -> AsyncIterator[str]:
    """Run the server on 127.0.0.1 on a free port; yields its base URL."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def backfill_settings(
    url: str,
    queues: QueuePair,
    db_settings: DatabaseSettings,
    aws_settings: AwsSettings,
    *,
    deployment: str = "cloud",
    **jira: Any,
) -> BackfillSettings:
    """Backfill/reconcile settings against this server: Cloud (email + token) or Data Center (PAT)."""
    credentials: dict[str, Any] = (
        {"email": EMAIL, "api_token": API_TOKEN} if deployment == "cloud" else {"pat": PAT}
    )
    return BackfillSettings(
        jira=JiraSettings(url=url, deployment=deployment, **credentials, **jira),  # type: ignore[arg-type]
        aws=aws_settings,
        queue_url=queues.queue_url,
        database=db_settings,
    )
