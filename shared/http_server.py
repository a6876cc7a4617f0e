"""What every aiohttp server of jiralake shares (the receiver's webhook port, every admin port):
explicit connection limits, and aiohttp's own refusals of a client's request logged as one WARNING
line without the request's bytes, never as an ERROR with a traceback."""

from __future__ import annotations

import ast
import logging
import re
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

# aiohttp's limits on the request line and on one header line, set explicitly: a longer one gets
# 400 (request line: 414) before any handler runs. Jira's longest header is far below either.
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 100
# After answering a request whose body was not read to the end (413, 408), how long aiohttp goes on
# reading and discarding it so the client sees the answer, before it closes the connection.
LINGER_S = 2.0

# How aiohttp's HTTP errors begin their text ("400, message:\n  ...").
_STATUS_PREFIX = re.compile(r"^[0-9]{3}, message:")
# The bytes an aiohttp parser error quotes from the request (the repr of a bytes object, b'...' or
# b"...", whole or cut short), and the line with a caret under it that points into them.
_QUOTED_BYTES = re.compile(
    r""" (?<![\w'"]) b (?: '(?:[^'\\]|\\.)*(?:'|\\?$) | "(?:[^"\\]|\\.)*(?:"|\\?$) ) """,
    re.DOTALL | re.VERBOSE,
)
_CARET_LINE = re.compile(r"^[ \t]*\^[ \t]*$", re.MULTILINE)
FAULT_TEXT_CHARS = 200


def server_options(*, idle_timeout_s: float, logger: logging.Logger) -> dict[str, Any]:
    """aiohttp's connection-level limits (``AppRunner``/``TestServer`` keywords): explicit header size
    limits (beyond them: 400, or 414 for the request line), the idle timeout that also closes a
    connection whose headers never finish arriving (aiohttp's default keeps an idle one an hour), a
    short lingering time (aiohttp's default of 10 s would let a refused body keep trickling in that
    long), and the logger aiohttp reports its own refusals through (:func:`server_logger`)."""
    return {
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_FIELD_BYTES,
        "max_headers": MAX_HEADERS,
        "keepalive_timeout": idle_timeout_s,
        "lingering_time": LINGER_S,
        "logger": logger,
    }


def server_logger(name: str) -> logging.Logger:
    """The logger for one server's aiohttp request handler: a child of aiohttp's own "aiohttp.server",
    so its records go wherever that logger's go, with :class:`ClientFaultsAsWarnings` on it."""
    logger = logging.getLogger(f"aiohttp.server.{name}")
    if not any(isinstance(f, ClientFaultsAsWarnings) for f in logger.filters):
        logger.addFilter(ClientFaultsAsWarnings())
    return logger


# What a client alone can cause inside aiohttp: a request it cannot parse (a request line or header
# beyond the limits, broken chunked framing, a Content-Encoding that does not decode), a body that
# fails while aiohttp reads what is left of it after the answer, a connection the client dropped.
_CLIENT_FAULTS = (HttpProcessingError, RequestPayloadError, ConnectionError)


class ClientFaultsAsWarnings(logging.Filter):
    """aiohttp answers some requests itself, before or without the handler (400 for a request it
    cannot parse), and logs each of them at ERROR with a traceback, as it logs a server's crash. Those
    are the client's doing: they become one WARNING line naming the error (never the request bytes
    aiohttp's text quotes: :func:`fault_text`), without the traceback; a client that
    merely went away becomes DEBUG (the handler already logged its request, if any). Records of any
    other exception stay as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR or not isinstance(exc, _CLIENT_FAULTS):
            return True
        level = logging.DEBUG if isinstance(exc, ConnectionError) else logging.WARNING
        record.msg = f"{record.getMessage()}: {fault_text(exc)}"
        record.args = None
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.exc_info, record.exc_text = None, None
        # The level was checked for ERROR; a record made quieter is kept only if its new level is on.
        return logging.getLogger(record.name).isEnabledFor(level)


def fault_text(exc: BaseException) -> str:
    """An error of aiohttp's about a request, as one short line fit for a log or an answer: its class
    and its message, without the bytes of the request it quotes. aiohttp's text starts with "400,
    message:" and a line break, and a parser error quotes up to a line of the request (which can be
    body bytes) as ``b'...'`` with a caret under it: those become ``b'<n bytes elided>'``."""
    text = _STATUS_PREFIX.sub("", str(exc), count=1)
    text = _CARET_LINE.sub("", _QUOTED_BYTES.sub(_elide, text))
    message = " ".join(text.split())
    return f"{type(exc).__name__}: {message}"[:FAULT_TEXT_CHARS] if message else type(exc).__name__


def _elide(quoted: re.Match[str]) -> str:
    try:
        size = len(ast.literal_eval(quoted.group()))
    except (ValueError, SyntaxError):  # cut short: no closing quote
        return "b'<bytes elided>'"
    return f"b'<{size} bytes elided>'"
