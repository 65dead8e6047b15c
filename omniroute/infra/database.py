"""Create the database a DSN names, when it does not exist yet."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg


def _admin_dsn(dsn: str) -> tuple[str, str]:
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/") or "postgres"
    return urlunsplit(parts._replace(path="/postgres")), name


async def create_database(dsn: str) -> bool:
    """CREATE DATABASE for the DSN's database if missing; True if it was created."""
    admin, name = _admin_dsn(dsn)
    conn = await asyncpg.connect(admin)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        try:
            await conn.execute(f'CREATE DATABASE "{name.replace(chr(34), "")}"')
        except asyncpg.exceptions.DuplicateDatabaseError:
            return False
        return True
    finally:
        await conn.close()


async def drop_database(dsn: str) -> None:
    """DROP DATABASE … WITH (FORCE) for the DSN's database (tests clean up with this)."""
    admin, name = _admin_dsn(dsn)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name.replace(chr(34), "")}" WITH (FORCE)')
    finally:
        await conn.close()
