"""``COPY (SELECT ...) TO STDOUT`` through asyncpg as a stream of byte chunks, with back-pressure.

asyncpg hands each chunk it reads to ``sink`` and stops reading the socket until ``sink`` returns
(asyncpg's protocol resumes reading only after the awaited sink call), so a sink that awaits a bounded
queue slows PostgreSQL down to the speed of S3 instead of piling rows up in memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

ChunkSink = Callable[[bytes], Awaitable[None]]


async def copy_csv(conn: asyncpg.Connection, query: str, args: Sequence[Any], sink: ChunkSink) -> int:
    """Stream ``query`` as CSV (header, every non-NULL value quoted) into ``sink``; returns the row count."""
    status: str = await conn.copy_from_query(
        query, *args, output=sink, format="csv", header=True, force_quote=True, encoding="UTF8"
    )
    # "COPY 12345"
    return int(status.split()[-1])
