"""The one place that decides what a failure means for the messages involved (arroyo's three outcomes):

- ``RETRY``: the message is fine, the world is not (Postgres or SQS unreachable, deadlock, timeout,
  throttling). Leave the messages; they come back after a backed-off visibility timeout.
- ``INVALID``: the message can never be applied (not an envelope, not JSON, fails validation, or
  Postgres rejects its data: a NUL in text, an out-of-range value). Dead-letter it with the reason.
- ``CRASH``: anything else is a bug or a misconfiguration (missing table, access denied): crash
  loudly and let the supervisor restart the process; the messages come back on their own.
"""

from __future__ import annotations

import enum
import re

import asyncpg
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
)

from shared import db
from shared.envelope import InvalidEnvelope
from shared.jira_event import InvalidEvent


class Outcome(enum.Enum):
    RETRY = "retry"
    INVALID = "invalid"
    CRASH = "crash"


class InvalidMessage(ValueError):
    """A queued message that can never be applied; the text says why."""


class ServerReadOnly(Exception):
    """PostgreSQL takes no writes (a standby, a failover in progress): nothing is received until it does,
    so no message spends a receive on a write that cannot happen."""


# Postgres errors that say nothing about the message: the server or the connection is in trouble.
_PG_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08: connection lost, refused, ...
    asyncpg.TransactionRollbackError,  # class 40: deadlock, serialization failure
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full, out of memory
    asyncpg.OperatorInterventionError,  # class 57: admin shutdown, statement timeout, cannot connect now
    asyncpg.LockNotAvailableError,  # 55P03
    # 25006: a standby, or a primary demoted by a failover that a connection still reaches. The next
    # receive waits until the server takes writes again (ServerReadOnly).
    asyncpg.ReadOnlySQLTransactionError,
)
# Postgres errors caused by the values a message carries: class 22 (data exception, also what asyncpg
# raises when it cannot encode an argument) and class 54 (a value past a program limit).
_PG_INVALID: tuple[type[BaseException], ...] = (asyncpg.DataError, asyncpg.ProgramLimitExceededError)

_BOTO_TRANSIENT: tuple[type[BaseException], ...] = (
    # The role's temporary credentials could not be refreshed (the ECS/EKS credentials endpoint did
    # not answer in time, or answered an error): the next call asks again. Credentials that are not
    # configured at all (NoCredentialsError) stay a crash.
    CredentialRetrievalError,
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
    HTTPClientError,
)
_SQS_RETRYABLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "KmsThrottled",
        "RequestTimeout",
    }
)


# How asyncpg words an argument it could not encode: "invalid input for query argument $45: <value> (<why>)".
_BAD_ARGUMENT = re.compile(r"^invalid input for query argument \$[0-9]+:")


def classify(exc: BaseException) -> Outcome:
    if isinstance(exc, (InvalidMessage, InvalidEnvelope, InvalidEvent, *_PG_INVALID)):
        return Outcome.INVALID
    # OSError covers refused, reset and unreachable connections and TimeoutError.
    if isinstance(exc, (*_PG_TRANSIENT, *_BOTO_TRANSIENT, OSError, ServerReadOnly)):
        return Outcome.RETRY
    if db.session_ended(exc):
        return Outcome.RETRY  # the pool replaces the connection on release
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if error.get("Code") in _SQS_RETRYABLE_CODES or status >= 500:
            return Outcome.RETRY
    return Outcome.CRASH


def describe(exc: BaseException) -> tuple[str, str]:
    """``(error_class, error_message)`` for a dead-letter's attributes and the log."""
    message = " ".join(str(exc).split()) or repr(exc)
    argument = _BAD_ARGUMENT.match(message)
    if isinstance(exc, asyncpg.DataError) and argument and exc.__cause__ is not None:
        # asyncpg quotes the start of the argument (for the batch's arrays, other events' values:
        # display names, summaries); the reason alone, from its cause, quotes at most one character.
        message = f"{argument[0]} {' '.join(str(exc.__cause__).split())}"
    return type(exc).__name__, message
