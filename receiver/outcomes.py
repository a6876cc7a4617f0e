"""How the receiver answers a webhook, decided in one place: every outcome, its HTTP status, the
metric label it is counted under, and the JSON body Jira gets back.

Jira Cloud retries a delivery on 408, 409, 425, 429 and 5xx (and on no answer at all), not on
other 4xx, so:
- ``accepted`` / ``ignored`` (202): stored on the queue / concerns no issue; Jira is done.
- ``bad_request``, ``unauthorized``, ``too_large``, ``unsupported_media_type`` (4xx): can never be
  stored; retrying would not help.
- ``request_timeout`` (408): the body did not arrive in time; the connection is closed and Jira
  retries.
- ``unavailable`` (503 + ``Retry-After``): not stored this time (SQS failed, timed out or refused
  the entry, the receiver is overloaded or shutting down); Jira retries the same delivery, which SQS
  deduplicates.
- ``client_closed`` (499, nginx's "client closed request"; never sent): the client closed the
  connection before its whole body arrived, so there is no one to answer. Nothing is stored; Jira
  retries a delivery that got no answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from aiohttp import web

RETRY_AFTER_S = 10


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    IGNORED = "ignored"
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    TIMED_OUT = "request_timeout"
    UNAVAILABLE = "unavailable"
    CLIENT_CLOSED = "client_closed"


STATUS: dict[Outcome, int] = {
    Outcome.ACCEPTED: 202,
    Outcome.IGNORED: 202,
    Outcome.BAD_REQUEST: 400,
    Outcome.UNAUTHORIZED: 401,
    Outcome.TOO_LARGE: 413,
    Outcome.UNSUPPORTED_MEDIA_TYPE: 415,
    Outcome.TIMED_OUT: 408,
    Outcome.UNAVAILABLE: 503,
    Outcome.CLIENT_CLOSED: 499,
}


@dataclass(frozen=True)
class Answer:
    outcome: Outcome
    # Why a request was not accepted; safe to show the caller (never secrets or SQS internals).
    reason: str | None = None
    # Extra fields for the response body (issue_id, event_type, delivery_id).
    details: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return STATUS[self.outcome]

    def response(self) -> web.Response:
        body: dict[str, str] = {"status": self.outcome.value, **self.details}
        if self.reason is not None:
            body["reason"] = self.reason
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.outcome is Outcome.UNAVAILABLE else None
        return web.json_response(body, status=self.status, headers=headers)


class Rejected(Exception):
    """Raised while admitting a request: answer it with ``answer`` and go no further."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.answer = Answer(outcome, reason)
