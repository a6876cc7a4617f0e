"""Every SQS call jiralake makes is counted in ``jiralake_sqs_requests_total`` (operation, ok/error),
here; and the errors an SQS call raises when SQS, the network or the credentials fail."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import ClientConnectorError
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError

from shared.aws import error_code
from shared.metrics import SQS_CALLS

# What an SQS call raises when SQS refuses it, the network fails, or it takes too long.
SQS_ERRORS = (ClientError, BotoCoreError, OSError, TimeoutError)

# How long an SQS call someone waits on (an on-call command's, the release of held messages) may go
# unanswered before it is given up: SQS answers in milliseconds, and botocore alone (30 s a try, and
# its retries) took over 2 minutes to give up one SendMessageBatch of `dlq replay`. Pass it as
# ``counted(..., timeout_s=PROMPT_CALL_TIMEOUT_S)``.
PROMPT_CALL_TIMEOUT_S = 10.0

T = TypeVar("T")


class Unanswered(TimeoutError):
    """A call given up after its timeout without an answer; its text names the call and the bound
    (``no answer from SQS within 10 s to CreateQueue``). Whether SQS (or S3) did it is unknown."""


# SQS's code for a queue URL that names no queue, by its query-compatible code and its JSON type.
_NO_SUCH_QUEUE = frozenset(("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"))


def no_such_queue(exc: BaseException) -> bool:
    """Whether SQS answered that the queue URL names no queue."""
    return error_code(exc) in _NO_SUCH_QUEUE


async def answered_within(
    operation: str, call: Awaitable[T], timeout_s: float | None, *, service: str = "SQS"
) -> T:
    """Await one AWS call; past ``timeout_s`` (None: no limit) it is cancelled and :class:`Unanswered`
    (a :class:`TimeoutError`) raised, naming ``operation``."""
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            return await call
    except TimeoutError:
        if deadline.expired():
            raise Unanswered(f"{no_answer(timeout_s or 0.0, service=service)} to {operation}") from None
        raise


async def counted(operation: str, call: Awaitable[T], *, timeout_s: float | None = None) -> T:
    """Await one SQS call (:func:`answered_within`) and count it as ``ok`` or ``error``."""
    try:
        result = await answered_within(operation, call, timeout_s)
    except Exception:
        SQS_CALLS.labels(operation, "error").inc()
        raise
    SQS_CALLS.labels(operation, "ok").inc()
    return result


def describe(exc: BaseException) -> str:
    """A failed SQS call in a few words: one given up says which and after how long (``no answer from
    SQS within 10 s to GetQueueAttributes``), anything else its class and text."""
    return str(exc) if isinstance(exc, Unanswered) and str(exc) else f"{type(exc).__name__}: {exc}"


def maybe_done(exc: BaseException) -> bool:
    """Whether SQS may have done what a call that raised ``exc`` (one of SQS_ERRORS) asked: False only
    when it certainly did not, because SQS answered with a refusal, or no connection to SQS was made.

    - A 4xx error SQS answered at the first try (no such queue, access denied, invalid entries): not
      done. After botocore retried, an earlier try may have been carried out and its answer lost; a
      5xx (``InternalError``, ``ServiceUnavailable``) says SQS failed, not that it did nothing.
    - No connection made (refused, name not resolved, connect timeout): not done. aiobotocore raises
      ``EndpointConnectionError`` for a connection reset while the answer was read as well, so its
      cause decides.
    - Anything else (``ReadTimeoutError``, ``ConnectionClosedError``, a reset mid-answer, a call given
      up as :class:`Unanswered`): the request may have reached SQS and its answer been lost.

    Connection errors are judged by botocore's last try only (they carry no count of tries): a first
    try whose answer was lost, then tries that could not connect, reads as not done.
    """
    if isinstance(exc, ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        return int(meta.get("HTTPStatusCode") or 500) >= 500 or int(meta.get("RetryAttempts") or 0) > 0
    if isinstance(exc, ConnectTimeoutError):
        return False
    if isinstance(exc, EndpointConnectionError):
        return not isinstance(exc.kwargs.get("error"), (ClientConnectorError, socket.gaierror))
    return True


def no_answer(timeout_s: float, *, service: str = "SQS") -> str:
    """How a call given up after ``timeout_s`` without an answer is reported: whether SQS (or S3) did
    it is unknown."""
    return f"no answer from {service} within {timeout_s:g} s"
