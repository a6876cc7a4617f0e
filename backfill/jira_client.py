"""A small aiohttp client for the Jira REST endpoints backfill and reconcile use.

- Cloud: ``GET /rest/api/2/search/jql`` paged by ``nextPageToken``; Data Center:
  ``GET /rest/api/2/search`` paged by ``startAt``. Both surface as :class:`SearchPage` with an
  opaque text cursor, so callers (and the resume state) need not care. Data Center pages overlap
  (:class:`OffsetCursor`): an issue that leaves the result while the run reads it shifts every later
  one up a place, and a plain ``startAt + issues returned`` would skip one issue per shift.
  Search is REST v2 on Cloud too: v3 returns rich text (description, environment, comments, text
  custom fields) as Atlassian Document Format objects, while Cloud webhooks carry the v2
  representation (wiki-markup strings); a snapshot must be the same issue object a webhook
  carries, or ``raw`` changes shape by source.
- Throttling and transient failures (429, 500, 502, 503, 504, network errors) are retried: a
  ``Retry-After`` header is honoured; failing that, on a 429, Jira Cloud's ``X-RateLimit-Reset``;
  otherwise exponential backoff with jitter (backfill/jira_retry.py).
- Bounded concurrency: one semaphore caps requests in flight across the whole client; a request
  that waits out a ``Retry-After`` (or a reset) keeps its slot, so a throttled client slows down as
  a whole.
- 401 ends the command (:class:`JiraAuthError`); other 4xx are :class:`JiraRequestError` with Jira's
  own message, except where a caller expects a status (404/403 on an issue lookup).
- A 2xx that is not what was asked (an SSO login page behind a redirect, a proxy's page, JSON
  without ``issues``) is a :class:`JiraError` naming its content type and first bytes, never an
  empty result: an empty last page would complete the run and store a watermark.

Credentials go only into the ``Authorization`` header; nothing here logs bodies, nor headers beyond
the wait Jira asked for and a ``RateLimit-Reason`` that has the shape of one
(:func:`backfill.jira_retry.loggable_reason`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import aiohttp
import structlog

from backfill.jira_retry import (
    RATE_LIMIT_REASON,
    RATE_LIMIT_RESET,
    RETRY_AFTER,
    RETRYABLE_STATUSES,
    RequestedWait,
    RetryPolicy,
    loggable_reason,
    requested_wait,
)
from backfill.jql import split_order_by
from backfill.settings import JiraSettings
from shared import strict_json

log = structlog.get_logger()

USER_AGENT = "jiralake-backfill/0.1"
# Enhanced search in REST v2 on Cloud: issue objects in the shape Cloud webhooks carry (module doc).
SEARCH_PATH_CLOUD = "rest/api/2/search/jql"
# Data Center: each next page is asked from this many issues before where the last one ended (at
# most half a page), so that a page starts with issues already read (docs/backfill.md, "Data Center
# paging"). A shift larger than the overlap is found that way and stepped back over.
DC_OVERLAP_MAX = 10
# Ids of the issues read last, carried in the Data Center cursor: what a page's first issue is
# matched against, and which issues of an overlapping page are not sent again. Bounded: a run of
# any length remembers this many.
DC_RECENT_IDS = 1000
# Bytes of an unexpected answer quoted in the error (a login page's title, a proxy's banner).
HEAD_BYTES = 60

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


class JiraError(Exception):
    """Jira did not give what was asked; the message is one line a person can act on."""


class JiraAuthError(JiraError):
    """Jira answered 401: the credentials are wrong, expired or lack access to the site."""


class JiraRequestError(JiraError):
    def __init__(self, status: int, path: str, reason: str) -> None:
        super().__init__(f"Jira answered HTTP {status} to {path}: {reason}")
        self.status = status
        self.path = path
        self.reason = reason


class JiraUnavailable(JiraError):
    """Retries ran out (still throttled, failing or unreachable)."""


@dataclass(frozen=True)
class SearchPage:
    issues: list[dict[str, Any]]
    # Cursor of the next page (a nextPageToken, or a startAt as text); None on the last page.
    next_cursor: str | None
    # Data Center reports the total; Cloud's enhanced search does not (see JiraClient.count).
    total: int | None = None


@dataclass(frozen=True)
class OffsetCursor:
    """Where a Data Center search goes on: ``start_at`` is just past the last issue read, and
    ``recent`` the ids read last (oldest first, at most :data:`DC_RECENT_IDS`). As text it is JSON;
    a plain number is a cursor saved before pages overlapped (nothing remembered)."""

    start_at: int
    recent: tuple[str, ...] = ()

    def encode(self) -> str:
        return json.dumps({"startAt": self.start_at, "recent": list(self.recent)}, separators=(",", ":"))

    @classmethod
    def decode(cls, cursor: str | None) -> OffsetCursor:
        if cursor is None:
            return cls(0)
        bad = JiraError(f"saved startAt cursor {cursor[:40]!r} is not readable; run with --restart")
        text = cursor.strip()
        if not text.startswith("{"):
            try:
                return cls(max(int(text), 0))
            except ValueError:
                raise bad from None
        try:
            data = json.loads(text)
        except ValueError:
            raise bad from None
        start_at = data.get("startAt") if isinstance(data, dict) else None
        recent = data.get("recent") if isinstance(data, dict) else None
        if not isinstance(start_at, int) or not isinstance(recent, list):
            raise bad
        return cls(max(start_at, 0), tuple(str(i) for i in recent[-DC_RECENT_IDS:]))


@dataclass(frozen=True)
class Reply:
    status: int
    # Parsed JSON; else (not JSON) the first 500 bytes as text; None when empty.
    body: Any
    content_type: str
    head: bytes


@dataclass(frozen=True)
class FailedWebhookPage:
    values: list[dict[str, Any]]
    max_results: int
    # Entries of the list that are not JSON objects: reported as invalid, not dropped unseen.
    not_objects: int = 0


@dataclass(frozen=True)
class Unavailable:
    """An optional endpoint this account or deployment cannot use, and why."""

    status: int
    reason: str


class JiraClient:
    """``async with JiraClient(settings) as jira: ...``. ``sleep``, ``rng`` and ``clock`` (wall
    time, which an HTTP-date Retry-After and X-RateLimit-Reset are read against) are injectable."""

    def __init__(
        self,
        settings: JiraSettings,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.policy = RetryPolicy(
            max_attempts=settings.max_attempts,
            base_s=settings.backoff_base_s,
            max_s=settings.backoff_max_s,
            max_retry_after_s=settings.max_retry_after_s,
        )
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._clock = clock
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self.retries = 0
        self._answered = False  # whether Jira has answered any request of this client

    async def __aenter__(self) -> JiraClient:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self.settings.pat is not None:
            headers["Authorization"] = f"Bearer {self.settings.pat}"
        else:
            assert self.settings.email is not None and self.settings.api_token is not None
            pair = f"{self.settings.email}:{self.settings.api_token}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s),
            connector=aiohttp.TCPConnector(limit=self.settings.max_concurrency),
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- endpoints --

    def _api(self, path: str) -> str:
        return f"rest/api/{self.settings.api_version}/{path}"

    async def myself(self) -> dict[str, Any]:
        """The authenticated account (checks the credentials; ``timeZone`` interprets JQL dates).
        Cloud names it by ``accountId``, Data Center by ``name`` and ``key``: a 2xx with none of
        them is not Jira's answer (a login page, say), and the credentials check fails."""
        path = self._api("myself")
        reply = await self._request("GET", path)
        body = reply.body
        if isinstance(body, dict) and any(
            isinstance(body.get(k), str) and body[k] for k in ("accountId", "name", "key")
        ):
            return body
        raise _not_jira(reply, path, "an account")

    async def search_page(
        self,
        jql: str,
        cursor: str | None,
        *,
        fields: str = "*all",
        expand: str | None = None,
        page_size: int | None = None,
    ) -> SearchPage:
        size = self.settings.page_size if page_size is None else page_size
        params: dict[str, str] = {"jql": jql, "maxResults": str(size), "fields": fields}
        if expand:
            params["expand"] = expand
        if self.settings.deployment == "cloud":
            if cursor is not None:
                params["nextPageToken"] = cursor
            reply = await self._request("GET", SEARCH_PATH_CLOUD, params=params)
            body = _search_result(reply, SEARCH_PATH_CLOUD, cloud=True)
            return SearchPage(issues=_issues(body), next_cursor=_next_token(body, cursor))
        return await self._offset_page(params, OffsetCursor.decode(cursor), size)

    async def _offset_page(self, params: dict[str, str], at: OffsetCursor, size: int) -> SearchPage:
        """One Data Center page, overlapping the one before: asked from ``overlap`` issues before
        ``at.start_at``, it must begin with an issue read already. When it does not, issues before it
        left the result (deleted, no longer matching, or moved to the end by ``ORDER BY updated``)
        and the ones behind them moved up past the overlap: the overlap doubles until the page
        begins with a known issue, or starts at 0. Only issues not read recently are returned."""
        path = self._api("search")
        overlap = min(DC_OVERLAP_MAX, max(size // 2, 1)) if at.start_at > 0 and size > 0 else 0
        recent = list(at.recent)
        known = set(recent)
        back = overlap
        while True:
            start_at = max(at.start_at - back, 0)
            params["startAt"] = str(start_at)
            params["maxResults"] = str(size + overlap)
            reply = await self._request("GET", path, params=params)
            body = _search_result(reply, path, cloud=False)
            issues = _issues(body)
            total = body.get("total") if isinstance(body.get("total"), int) else None
            _check_offset_page(body, path, start_at, size, len(issues), total)
            if size == 0 or start_at == 0 or not known:
                break  # page one, a count, or a cursor saved before pages overlapped: nothing to match
            if issues and _issue_id(issues[0]) in known:
                break
            if not issues and total is None:
                break  # no total to tell a shift from the end: the end, as before
            log.warning("jira_page_shifted", start_at=start_at, expected_at=at.start_at, total=total)
            back *= 2
        end = start_at + len(issues)
        more = bool(issues) and (total is None or end < total)
        if more and end <= at.start_at and back == overlap:
            raise JiraError(
                f"Jira returned {len(issues)} issues for maxResults={size + overlap} at /{path}: "
                "too few to page with an overlap; lower JIRALAKE_JIRA_PAGE_SIZE"
            )
        fresh: list[dict[str, Any]] = []
        for issue in issues:
            issue_id = _issue_id(issue)
            if issue_id is not None and issue_id in known:
                continue
            fresh.append(issue)
            if issue_id is not None:
                known.add(issue_id)
                recent.append(issue_id)
        next_cursor = OffsetCursor(end, tuple(recent[-DC_RECENT_IDS:])).encode() if more else None
        return SearchPage(issues=fresh, next_cursor=next_cursor, total=total)

    async def count(self, jql: str) -> int | None:
        """How many issues match: Cloud's approximate count, Data Center's exact total.
        None when Jira will not say (an older Cloud without the endpoint): progress runs without it.
        A 200 that is no count (a login page, a proxy's JSON) is a :class:`JiraError`, as for search;
        a 400 is Jira refusing the JQL (a misspelt field), which a dry run is there to tell."""
        if self.settings.deployment == "cloud":
            path = self._api("search/approximate-count")
            reply = await self._request(
                "POST", path, json_body={"jql": split_order_by(jql)[0]}, allow_status={404, 405}
            )
            body = reply.body
            if reply.status != 200:
                return None
            if not isinstance(body, dict) or not isinstance(body.get("count"), int):
                raise _not_jira(reply, path, "a count")
            count: int = body["count"]
            return count
        page = await self.search_page(jql, None, fields="id", page_size=0)
        return page.total

    async def issue_status(self, issue_id: str) -> int:
        """HTTP status of ``GET issue/{id}``: 200 (exists and visible), 404, 403 or 401."""
        reply = await self._request(
            "GET", self._api(f"issue/{issue_id}"), params={"fields": "id"}, allow_status={401, 403, 404}
        )
        return reply.status

    async def failed_webhooks(
        self, after_ms: int | None, *, max_results: int = 100
    ) -> FailedWebhookPage | Unavailable:
        """Cloud's webhooks that failed after all retries (Connect apps only; docs/backfill.md)."""
        if self.settings.deployment != "cloud":
            return Unavailable(404, "Jira Data Center has no failed-webhook list")
        params = {"maxResults": str(max_results)}
        if after_ms is not None:
            params["after"] = str(after_ms)
        reply = await self._request(
            "GET", self._api("webhook/failed"), params=params, allow_status={401, 403, 404, 405}
        )
        status, body = reply.status, reply.body
        if status != 200:
            return Unavailable(status, _reason(body, status))
        if not isinstance(body, dict) or not isinstance(body.get("values"), list):
            # A login page or a proxy's answer: not "no failed deliveries", which would read as all clear.
            return Unavailable(
                status, str(_not_jira(reply, self._api("webhook/failed"), "a failed-webhook list"))
            )
        values = [v for v in body["values"] if isinstance(v, dict)]
        size = body.get("maxResults")
        return FailedWebhookPage(
            values=values,
            max_results=size if isinstance(size, int) and size > 0 else max_results,
            not_objects=len(body["values"]) - len(values),
        )

    # -- transport --

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        allow_status: Collection[int] = (),
    ) -> Reply:
        assert self._session is not None, "use JiraClient as an async context manager"
        async with self._slots:
            for attempt in range(self.policy.max_attempts):
                requested: RequestedWait | None = None
                reason: str | None = None
                try:
                    async with self._session.request(
                        method, f"{self.settings.url}/{path}", params=params, json=json_body
                    ) as resp:
                        self._answered = True
                        status = resp.status
                        content_type = resp.content_type
                        raw = await resp.read()
                        if status in RETRYABLE_STATUSES:
                            requested = requested_wait(status, resp.headers, now_s=self._clock())
                            reason = loggable_reason(resp.headers.get(RATE_LIMIT_REASON))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if not self._answered and _name_unknown(exc):
                        # The resolver's definite "no such name" before Jira ever answered: a typo in the
                        # URL, which 8 attempts (minutes of backoff) would not mend. A name that resolved
                        # before, or a resolver failing for now (EAI_AGAIN), is retried as usual.
                        host = urlsplit(self.settings.url).hostname
                        raise JiraUnavailable(
                            f"Jira's host name {host!r} does not resolve ({exc.os_error.strerror}): check "
                            "JIRALAKE_JIRA_URL"
                        ) from None
                    status, raw, content_type = 0, b"", ""
                    problem = f"{type(exc).__name__}: {exc}"
                else:
                    problem = f"HTTP {status}"
                body = _decode(raw)
                if 200 <= status < 300 or status in allow_status:
                    return Reply(status, body, content_type, raw[:HEAD_BYTES])
                if status == 401:
                    raise JiraAuthError(
                        f"Jira rejected the credentials (HTTP 401) at {self.settings.url}: check "
                        "JIRALAKE_JIRA_EMAIL + JIRALAKE_JIRA_API_TOKEN or JIRALAKE_JIRA_PAT"
                    )
                if status != 0 and status not in RETRYABLE_STATUSES:
                    raise JiraRequestError(status, "/" + path, _reason(body, status))
                if attempt + 1 >= self.policy.max_attempts:
                    raise JiraUnavailable(
                        f"Jira still failing after {self.policy.max_attempts} attempts at /{path}: {problem}"
                    )
                requested_s = requested.seconds if requested is not None else None
                delay_s = self.policy.delay_s(attempt, requested_s, self._rng)
                self.retries += 1
                log.warning(
                    "jira_retry",
                    path="/" + path,
                    problem=problem,
                    attempt=attempt + 1,
                    wait_reason=requested.header if requested is not None else "backoff",
                    retry_after_s=_seconds_from(requested, RETRY_AFTER),
                    reset_in_s=_seconds_from(requested, RATE_LIMIT_RESET),
                    rate_limit_reason=reason,
                    delay_s=round(delay_s, 3),
                )
                await self._sleep(delay_s)
        raise AssertionError("unreachable: the loop returns or raises")


def _name_unknown(exc: BaseException) -> TypeGuard[aiohttp.ClientConnectorError]:
    """Whether the system resolver answered that the host name does not exist (EAI_NONAME). aiohttp's
    optional aiodns resolver reports no such code: its failures are retried like any other."""
    return (
        isinstance(exc, aiohttp.ClientConnectorError)
        and isinstance(exc.os_error, socket.gaierror)
        and exc.os_error.errno == socket.EAI_NONAME
    )


def _seconds_from(requested: RequestedWait | None, header: str) -> float | None:
    return round(requested.seconds, 3) if requested is not None and requested.header == header else None


def _decode(raw: bytes) -> Any:
    """The answer's JSON, or the start of its text when it is not JSON (NaN and nesting too deep
    included: what the consumer would dead-letter is no answer of Jira's)."""
    if not raw:
        return None
    try:
        return strict_json.loads(raw)
    except ValueError:
        return raw[:500].decode("utf-8", errors="replace")


def _reason(body: Any, status: int) -> str:
    """Jira's own words: ``errorMessages`` and ``errors`` of its error body, else the text."""
    if isinstance(body, dict):
        parts = [str(m) for m in body.get("errorMessages") or [] if m]
        errors = body.get("errors")
        if isinstance(errors, dict):
            parts += [f"{k}: {v}" for k, v in errors.items()]
        if isinstance(body.get("message"), str):
            parts.append(body["message"])
        if parts:
            return "; ".join(parts)[:500]
    if isinstance(body, str) and body.strip():
        return " ".join(body.split())[:200]
    return f"HTTP {status}"


def _search_result(reply: Reply, path: str, *, cloud: bool) -> dict[str, Any]:
    """The search answer, if it is one: a JSON object with an ``issues`` list (Cloud's enhanced
    search may leave the list out of an empty last page, which still says ``isLast``)."""
    body = reply.body
    if not isinstance(body, dict):
        raise _not_jira(reply, path, "a search result")
    empty_last = cloud and "issues" not in body and body.get("isLast") is True
    if isinstance(body.get("issues"), list) or empty_last:
        return body
    raise _not_jira(reply, path, "a search result")


def _next_token(body: dict[str, Any], asked: str | None) -> str | None:
    """Cloud: the next page's ``nextPageToken``, None on the last page. An answer that says there is
    more but gives no new token to ask for it with would end the run early (the rest never fetched,
    a watermark stored) or page forever: a :class:`JiraError`."""
    token = body.get("nextPageToken")
    is_last = body.get("isLast", token is None)
    if not isinstance(is_last, bool):
        raise JiraError(f"Jira's search answer at /{SEARCH_PATH_CLOUD} has an isLast neither true nor false")
    if is_last:
        return None
    if not isinstance(token, str) or not token:
        raise JiraError(
            f"Jira's search answer at /{SEARCH_PATH_CLOUD} says more pages follow (isLast false) but "
            "gives no nextPageToken to ask for them"
        )
    if token == asked:
        raise JiraError(
            f"Jira's search answer at /{SEARCH_PATH_CLOUD} gives the nextPageToken it was asked with: "
            "paging would never end"
        )
    return token


def _check_offset_page(
    body: dict[str, Any], path: str, start_at: int, size: int, count: int, total: int | None
) -> None:
    """Data Center: an answer for another ``startAt`` (a proxy or plugin ignoring it would page
    forever or skip issues), or one with no issues although its own ``total`` says there are some
    from ``startAt`` on (the run would end early, the rest never fetched), is a :class:`JiraError`."""
    answered = body.get("startAt")
    if isinstance(answered, int) and not isinstance(answered, bool) and answered != start_at:
        raise JiraError(f"Jira answered startAt={answered} to a search at /{path} for startAt={start_at}")
    if size > 0 and count == 0 and total is not None and start_at < total:
        raise JiraError(
            f"Jira's search at /{path} returned no issues from startAt={start_at} although its total is "
            f"{total}"
        )


def _not_jira(reply: Reply, path: str, wanted: str) -> JiraError:
    """A 2xx that is not Jira's answer, in one line: content type and first bytes, nothing else."""
    head = " ".join(reply.head.decode("utf-8", errors="replace").split())
    head = "".join(c if c.isprintable() else "?" for c in head)
    return JiraError(
        f"Jira answered HTTP {reply.status} to /{path} with {reply.content_type or 'no content type'} "
        f"that is not {wanted} (starts {head!r}): is JIRALAKE_JIRA_URL Jira itself, not a login page "
        "or proxy in front of it?"
    )


def _issues(body: dict[str, Any]) -> list[dict[str, Any]]:
    issues = body.get("issues")
    if not isinstance(issues, list):
        return []
    if not all(isinstance(issue, dict) for issue in issues):  # dropped, it would be lost unseen
        raise JiraError("Jira's search answer lists an issue that is not a JSON object")
    return issues


def _issue_id(issue: dict[str, Any]) -> str | None:
    issue_id = issue.get("id")
    return str(issue_id) if isinstance(issue_id, str | int) and str(issue_id) else None
