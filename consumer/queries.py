"""The consumer's SQL, kept in ``queries.sql`` as named sections (``-- name --``), loaded once."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_SECTION = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


@cache
def load() -> dict[str, str]:
    text = resources.files("consumer").joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    # parts: [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str) -> str:
    return load()[name]
