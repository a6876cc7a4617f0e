"""structlog configuration: JSON lines when stderr is not a TTY, readable console output when it is.

Only ``main()`` calls :func:`configure`; modules call ``structlog.get_logger()``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

# Keys whose values never reach a log line, whatever a caller binds.
_SECRET_KEYS = ("secret", "signature", "password", "token", "authorization", "api_key", "credential")


# A password inside a URL (postgresql://user:password@host/db), wherever a string value holds one.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")


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
            event_dict[key] = _URL_PASSWORD.sub(r"\1[redacted]@", value)
    return event_dict


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
        else structlog.dev.ConsoleRenderer()
    )
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        numeric_level = logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info if render_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # Writes the same lines as PrintLoggerFactory (one write and flush per line), with less overhead.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (aiohttp access log, botocore) go through stdlib logging: keep them quiet and on stderr.
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=sys.stderr, format="%(message)s")
