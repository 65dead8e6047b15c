"""Durable timers: rows with a due time, one pending per conversation and kind, fired by
whichever replica's tick locks them first (``FOR UPDATE SKIP LOCKED``): they survive
restarts of every process and fire once."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from omniroute.infra.ids import new_id
from omniroute.infra.store import Connection

# A conversation still at the workstream's bot whose customer has been silent for the bot's
# ``close_after``: set by the bot stage (each customer message and each bot answer push it
# later), fired with the others by the lifecycle stage's tick, which closes it ``bot_idle``.
BOT_IDLE = "bot_idle"

# Did a timer of this kind already fire for this moment or a later one? (``timers_fired``)
FIRED_GUARD = (
    " WHERE NOT EXISTS (SELECT 1 FROM timers WHERE conversation_id = $2 AND kind = $3"
    " AND fired_at IS NOT NULL AND due_at >= $4)"
)
TAKE_DUE = (
    "SELECT id, conversation_id, kind, due_at FROM timers"
    " WHERE fired_at IS NULL AND due_at <= $1 ORDER BY due_at LIMIT $2"
    " FOR UPDATE SKIP LOCKED"
)


async def schedule(
    conn: Connection,
    conversation_id: str,
    kind: str,
    due_at: datetime,
    *,
    later_only: bool = False,
) -> None:
    """Set (or move) the conversation's pending timer of this kind.

    ``later_only``: only ever push it later (customer activity handled out of order must
    not pull an idle timer back).
    """
    moved = "GREATEST(timers.due_at, EXCLUDED.due_at)" if later_only else "EXCLUDED.due_at"
    # With later_only, a timer that already fired for this moment or a later one is not set
    # again (a redelivered customer message must not repeat a reminder).
    guard = FIRED_GUARD if later_only else ""
    await conn.execute(
        "INSERT INTO timers (id, conversation_id, kind, due_at)"
        " SELECT $1, $2::uuid, $3::text, $4::timestamptz"
        + guard
        + " ON CONFLICT (conversation_id, kind) WHERE fired_at IS NULL"
        f" DO UPDATE SET due_at = {moved}",
        new_id(),
        conversation_id,
        kind,
        due_at,
    )


async def cancel(conn: Connection, conversation_id: str, kinds: Sequence[str]) -> None:
    await conn.execute(
        "DELETE FROM timers WHERE conversation_id = $1 AND kind = ANY($2::text[])"
        " AND fired_at IS NULL",
        conversation_id,
        list(kinds),
    )


async def take_due(conn: Connection, now: datetime, limit: int = 100) -> list[Any]:
    """Lock and mark fired the timers due at ``now``; other replicas skip them."""
    rows = await conn.fetch(
        TAKE_DUE,
        now,
        limit,
    )
    if rows:
        await conn.execute(
            "UPDATE timers SET fired_at = $2 WHERE id = ANY($1::uuid[])",
            [r["id"] for r in rows],
            now,
        )
    return list(rows)
