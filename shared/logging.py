"""structlog configuration: JSON lines when stderr is not a TTY, readable console output when it is.

Only ``main()`` calls :func:`configure`; modules call ``structlog.get_logger()``.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import ExcInfo

# Keys whose values never reach a log line, whatever a caller binds.
_SECRET_KEYS = ("secret", "signature", "password", "token", "authorization", "api_key", "credential")


# A password inside a URL (postgresql://user:password@host/db), wherever a string value holds one.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")
# libpq's (and asyncpg's) other place for it: postgresql://user@host/db?password=... (and sslpassword).
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#\s'\"]+", re.IGNORECASE)


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it replaced, in the user-info or the query string."""
    if "://" not in text:
        return text
    return _QUERY_PASSWORD.sub(r"\1[redacted]", _URL_PASSWORD.sub(r"\1[redacted]@", text))


@functools.lru_cache(maxsize=4096)
def _is_secret_key(key: str) -> bool:
    # Keys come from code, so a few dozen distinct ones: the answer is remembered instead of running
    # seven substring tests per key on every line (that was most of a webhook line's cost).
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_KEYS)


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if _is_secret_key(key):
            event_dict[key] = "[redacted]"
        elif isinstance(value, str) and "://" in value:
            event_dict[key] = redact_text(value)
    return event_dict


def _redacted_traceback(sio: TextIO, exc_info: ExcInfo) -> None:
    # The console renderer formats exceptions itself, after every processor: redact its text too.
    # Plain text, never rich's: it prints each frame's local variables (headers, settings, DSNs).
    buffer = io.StringIO()
    structlog.dev.plain_traceback(buffer, exc_info)
    sio.write(redact_text(buffer.getvalue()))


class _LibraryLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root logger's handler for libraries' stdlib records (configure() finds and replaces it).
    It writes to ``sys.stderr`` as it is when a record comes, not as it was when configured."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@functools.lru_cache(maxsize=8)
def _json_encoder(default: Callable[[Any], Any] | None) -> json.JSONEncoder:
    return json.JSONEncoder(default=default)


def json_dumps(event_dict: Any, **kwargs: Any) -> str:
    """``json.dumps(event_dict, **kwargs)``, the same text, from one encoder kept per ``default``
    (the only keyword structlog's JSONRenderer passes) instead of one built per line. orjson would
    be faster still, but writes ``"event":"webhook"`` where tests and operators' searches expect
    ``"event": "webhook"``."""
    if kwargs.keys() - {"default"}:
        return json.dumps(event_dict, **kwargs)
    return _json_encoder(kwargs.get("default")).encode(event_dict)


def configure(level: str = "INFO", *, json: bool | None = None) -> None:
    render_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=json_dumps)
        if render_json
        else structlog.dev.ConsoleRenderer(exception_formatter=_redacted_traceback)
    )
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        numeric_level = logging.INFO
    # Exceptions become text first, so the redaction sees the traceback's messages too.
    to_text: Any = (
        structlog.processors.format_exc_info if render_json else structlog.processors.StackInfoRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            to_text,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # Writes the same lines as PrintLoggerFactory (one write and flush per line), with less overhead.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (aiohttp's "Error handling request", asyncio, botocore) go through stdlib logging: keep
    # them quiet, on stderr, and through the same redaction and renderer, so a library's traceback is
    # one JSON line like ours rather than raw lines that bypass the redaction.
    handler = _LibraryLogHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                to_text,
                redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LibraryLogHandler)]:
        root.removeHandler(old)  # configured again (tests, `jiralake up`): one handler, the newest
    root.addHandler(handler)
    root.setLevel(max(numeric_level, logging.WARNING))
