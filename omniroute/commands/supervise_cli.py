"""``omniroute supervise conversations|transfer|close|end-offer|presence``: a supervisor's
actions straight in the database.

No router needed: the command runs the same domain functions as the admin API
(``omniroute.domain.supervisor``), each in one transaction that also puts its events and the
``supervisor.acted`` audit record (naming ``--actor``) in the outbox; any running omniroute
process relays them. The configuration file supplies the queue names, offer timeouts and
each workstream's ``on_agent_offline`` policy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any

import asyncpg

from omniroute.domain import supervisor
from omniroute.domain.agents import agent_out, offline_requeue
from omniroute.domain.supervisor import (
    MAX_ACTOR_LENGTH,
    checked_actor,
    list_conversations,
    offer_seconds,
)
from omniroute.errors import StoreUnavailable, WorkConflict
from omniroute.infra.config_loader import load_config
from omniroute.infra.settings import Settings
from omniroute.infra.store import Connection, Store
from router.admin_api import DEFAULT_LIMIT, MAX_LIMIT
from router.requests import as_uuid
from schemas.api import CONVERSATION_STATES, PRESENCES, ConversationOut
from schemas.config import Config
from schemas.events import EventType, utcnow

HEADERS = ("ID", "STATE", "QUEUE", "AGENT", "WAIT")


class UserError(Exception):
    """Input the command cannot act on: one line on stderr, exit 1."""


def _limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r}: an integer from 1 to {MAX_LIMIT}")
    return limit


def add_supervise_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``supervise`` and its subcommands on the ``omniroute`` parser."""
    supervise = subparsers.add_parser(
        "supervise", help="see waiting work; transfer, close, end offers, set presence"
    )
    sub = supervise.add_subparsers(dest="supervise_command", required=True, metavar="ACTION")
    listing = sub.add_parser("conversations", help="conversations, newest first")
    listing.add_argument(
        "--state",
        choices=CONVERSATION_STATES,
        metavar="STATE",
        help=f"only in this state: {', '.join(CONVERSATION_STATES)}",
    )
    listing.add_argument("--queue", help="only of this queue")
    listing.add_argument(
        "--agent",
        metavar="AGENT_ID",
        help="only those this agent holds (without --state: offered, active, waiting, wrap-up)",
    )
    listing.add_argument(
        "--limit", type=_limit, default=DEFAULT_LIMIT, help=f"at most this many (1-{MAX_LIMIT})"
    )

    acting = argparse.ArgumentParser(add_help=False)
    acting.add_argument(
        "--actor",
        help="who acts, recorded in the supervisor.acted audit event"
        f" (1-{MAX_ACTOR_LENGTH} printable characters; default: $USER, else cli)",
    )
    transfer = sub.add_parser(
        "transfer", parents=[acting], help="move a conversation to a queue, or offer it to an agent"
    )
    transfer.add_argument("id", metavar="ID", help="the conversation")
    target = transfer.add_mutually_exclusive_group(required=True)
    target.add_argument("--queue", help="put it in this queue")
    target.add_argument("--agent", metavar="AGENT_ID", help="offer it to this agent")
    transfer.add_argument("--reason", help="why, for the audit")
    close = sub.add_parser("close", parents=[acting], help="close a conversation")
    close.add_argument("id", metavar="ID", help="the conversation")
    close.add_argument("--reason", help="why, for the audit")
    end = sub.add_parser(
        "end-offer", parents=[acting], help="end a pending offer; the conversation is queued again"
    )
    end.add_argument("offer_id", metavar="OFFER_ID")
    presence = sub.add_parser(
        "presence",
        parents=[acting],
        help="set an agent's presence (offline applies each workstream's on_agent_offline)",
    )
    presence.add_argument("agent_id", metavar="AGENT_ID")
    presence.add_argument(
        "presence", choices=PRESENCES, metavar="PRESENCE", help=", ".join(PRESENCES)
    )


def _id(value: str, what: str) -> str:
    found = as_uuid(value)
    if found is None:
        raise UserError(f"no {what} with id {value}")
    return found


def _wait(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _table(items: list[ConversationOut]) -> str:
    lines = [HEADERS]
    for c in items:
        agent = str(c.agent_id) if c.agent_id else "-"
        lines.append((str(c.id), c.state, c.queue or "-", agent, _wait(c.wait_seconds)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


async def _conversations(conn: Connection, args: argparse.Namespace) -> str:
    agent = None if args.agent is None else _id(args.agent, "agent")
    found = await list_conversations(
        conn, state=args.state, queue=args.queue, agent=agent, limit=args.limit
    )
    return _table(found) if found else "no conversations"


async def _transfer(conn: Connection, args: argparse.Namespace, config: Config) -> str:
    conversation_id = _id(args.id, "conversation")
    to_agent = None if args.agent is None else _id(args.agent, "agent")
    await supervisor.transfer(
        conn,
        conversation_id,
        args.actor,
        utcnow(),
        to_queue=args.queue,
        to_agent=to_agent,
        known_queues=[q.name for q in config.queues],
        offer_seconds=await offer_seconds(conn, config, conversation_id),
        reason=args.reason,
    )
    if args.queue is not None:
        return f"conversation {conversation_id} queued in {args.queue}"
    return f"conversation {conversation_id} offered to agent {to_agent}"


async def _close(conn: Connection, args: argparse.Namespace) -> str:
    conversation_id = _id(args.id, "conversation")
    await supervisor.close(conn, conversation_id, args.actor, utcnow(), args.reason)
    return f"conversation {conversation_id} closed"


async def _end_offer(conn: Connection, args: argparse.Namespace) -> str:
    offer_id = _id(args.offer_id, "offer")
    ended, _ = await supervisor.end_offer(conn, offer_id, args.actor, utcnow())
    return f"offer {offer_id} ended; conversation {ended.conversation_id} queued"


async def _presence(conn: Connection, args: argparse.Namespace, config: Config) -> str:
    agent_id = _id(args.agent_id, "agent")
    changed = await supervisor.set_presence(
        conn,
        agent_id,
        args.presence,
        args.actor,
        utcnow(),
        requeue_workstreams=offline_requeue(config),
    )
    if changed is None:
        raise UserError(f"no agent with id {args.agent_id}")
    agent = agent_out(changed.after)
    moved = sum(1 for e in changed.events if e.type == EventType.CONVERSATION_TRANSFERRED)
    requeued = f"; {moved} conversation(s) requeued" if moved else ""
    return f"agent {agent.id} ({agent.name}) is {agent.presence}{requeued}"


async def _act(args: argparse.Namespace, settings: Settings, config: Config | None) -> str:
    store = Store(
        settings.database_url.get_secret_value(),
        min_size=0,
        max_size=1,
        connect_timeout=settings.db_connect_timeout,
    )
    try:
        async with store.transaction() as conn:
            command = args.supervise_command
            if command == "conversations":
                return await _conversations(conn, args)
            if command == "close":
                return await _close(conn, args)
            if command == "end-offer":
                return await _end_offer(conn, args)
            assert config is not None
            if command == "transfer":
                return await _transfer(conn, args, config)
            return await _presence(conn, args, config)
    finally:
        await store.close()


def _run(coro: Coroutine[Any, Any, str]) -> str:
    # A loop of our own, never installed as the thread's current loop.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


def cmd_supervise(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``omniroute supervise …``: 0 on success; 1 (one line on stderr) when the action
    is refused (the reason's code first) or the input or the database is wrong. A
    configuration that cannot be read raises ConfigError (``omniroute`` answers 2)."""
    command = args.supervise_command
    if command != "conversations":
        try:
            args.actor = checked_actor(args.actor or os.environ.get("USER") or "cli")
        except ValueError as exc:
            print(f"omniroute supervise: --actor: {exc}", file=sys.stderr)
            return 2
    config = None
    if command in ("transfer", "presence"):
        config = load_config(settings.config, os.environ, require_secrets=False)
    try:
        print(_run(_act(args, settings, config)))
    except WorkConflict as exc:
        print(f"omniroute supervise {command}: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"omniroute supervise {command}: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        print(f"omniroute supervise: {exc}", file=sys.stderr)
        return 1
    except asyncpg.PostgresError as exc:  # a role, a database or a migration missing
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"omniroute supervise: database error: {message}", file=sys.stderr)
        return 1
    return 0
