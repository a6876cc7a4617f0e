"""JSON as RFC 8259 has it, for every parse of text from outside (webhook bodies, Jira's REST
answers): the standard library's parser without its NaN / Infinity / -Infinity extension, which
PostgreSQL's jsonb, orjson and the receiver all refuse. Nesting too deep for the parser is a
ValueError like any other text that is not JSON, not a RecursionError."""

from __future__ import annotations

import json
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# Built once: json.loads(..., parse_constant=...) would build a decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def loads(text: str | bytes) -> Any:
    """``json.loads(text)`` without NaN and Infinity: a ValueError for anything that is not JSON
    (UnicodeDecodeError and json.JSONDecodeError are ValueErrors)."""
    try:
        if isinstance(text, bytes):
            text = text.decode(json.detect_encoding(text), "surrogatepass")  # as json.loads reads bytes
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
