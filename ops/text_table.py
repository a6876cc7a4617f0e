"""Plain-text output for the ops commands: aligned tables for a terminal, durations people read."""

from __future__ import annotations

from collections.abc import Sequence


def one_line_text(text: str) -> str:
    """``text`` as one printable line: line breaks and tabs become spaces, and every other control
    or unprintable character (a terminal's escape sequences) its ``\\xNN`` / ``\\uNNNN`` escape.
    Table cells come from messages anyone with access to a queue may have sent."""
    if text.isprintable():
        return text
    return "".join(
        " " if char in "\r\n\t" else char if char.isprintable() else repr(char)[1:-1] for char in text
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded (it may be long). Each cell
    is shown as one printable line (:func:`one_line_text`)."""
    rows = [[one_line_text(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_age(seconds: float | None) -> str:
    """``"3d 4h"``, ``"2h 5m"``, ``"4m 10s"``, ``"12s"``; ``"unknown"`` for None."""
    if seconds is None:
        return "unknown"
    total = int(seconds)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
