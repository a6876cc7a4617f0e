"""Postgres connections from :class:`DatabaseSettings` (``DATABASE_URL``, else libpq's ``PG*`` variables)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from shared.settings import DatabaseSettings


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python objects; asyncpg leaves them as text otherwise.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(db: DatabaseSettings, **kwargs: Any) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn=db.url, **kwargs)
    await _init_connection(conn)
    return conn


async def create_pool(
    db: DatabaseSettings, *, min_size: int = 1, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn=db.url, min_size=min_size, max_size=max_size, init=_init_connection, **kwargs
    )
    assert pool is not None
    return pool
