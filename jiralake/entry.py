"""The ``jiralake`` executable's entry point. It imports the command line inside its own Ctrl-C
handling: importing it loads asyncio, structlog, asyncpg and the rest for a moment, and a Ctrl-C then
(the first moments of any command) exits 130 like a later one, not with a traceback."""

from __future__ import annotations


def main() -> int:
    try:
        from jiralake.cli import main as cli_main
    except KeyboardInterrupt:
        return 130
    return cli_main()
