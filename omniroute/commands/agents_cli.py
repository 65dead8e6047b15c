"""``omniroute agents add|list|set|remove``: manage agents straight in the database.

No router needed: the command uses the same functions as the admin API
(``omniroute.domain.agents``). Queue names are checked against the configuration file when it
exists. A presence change (``set --presence``, or removing an agent that was not offline)
puts ``agent.presence-changed`` in the outbox; any running omniroute stage relays it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Collection, Coroutine, Sequence
from typing import Any, TypeVar

import asyncpg
from pydantic import BaseModel, ValidationError

from omniroute.domain.agents import (
    agent_out,
    create_agent,
    delete_agent,
    list_agents,
    update_agent,
)
from omniroute.errors import StoreUnavailable, UnknownQueues
from omniroute.infra.config_loader import load_config
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store
from schemas.api import PRESENCES, AgentCreate, AgentUpdate

M = TypeVar("M", bound=BaseModel)
HEADERS = ("ID", "NAME", "PRESENCE", "LOAD", "QUEUES", "SKILLS", "LANGUAGE")


def _skill(text: str) -> tuple[str, int]:
    name, sep, level = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), int(level)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=LEVEL, e.g. billing=7") from None


def _agent_options(parser: argparse.ArgumentParser, *, required_capacity: bool) -> None:
    parser.add_argument(
        "--queue",
        dest="queues",
        action="append",
        metavar="QUEUE",
        help="a queue the agent serves (repeat for several)",
    )
    parser.add_argument(
        "--skill",
        dest="skills",
        action="append",
        type=_skill,
        metavar="NAME=LEVEL",
        help="a skill and its proficiency 1-10 (repeat for several)",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        required=required_capacity,
        help="units of work the agent handles at once",
    )
    parser.add_argument("--language", help="e.g. pt-BR")


def add_agents_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``agents`` and its subcommands on the ``omniroute`` parser."""
    agents = subparsers.add_parser("agents", help="add, list, change or remove agents")
    sub = agents.add_subparsers(dest="agents_command", required=True)
    add = sub.add_parser("add", help="add an agent and print its API token (shown once)")
    add.add_argument("name")
    _agent_options(add, required_capacity=True)
    listing = sub.add_parser("list", help="the agents, by name")
    listing.add_argument("--queue", help="only agents serving this queue")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    change = sub.add_parser(
        "set", help="change an agent (--queue and --skill replace the whole list)"
    )
    change.add_argument("id")
    change.add_argument("--name")
    _agent_options(change, required_capacity=False)
    change.add_argument("--presence", choices=PRESENCES)
    remove = sub.add_parser("remove", help="remove an agent; its token stops working")
    remove.add_argument("id")


def _known_queues(settings: Settings) -> set[str] | None:
    """The configured queue names; None (with a warning) when there is no config file."""
    if not settings.config.exists():
        print(
            f"warning: {settings.config} not found; queue names are not checked",
            file=sys.stderr,
        )
        return None
    config = load_config(settings.config, os.environ, require_secrets=False)
    return {q.name for q in config.queues}


def _table(rows: Sequence[asyncpg.Record]) -> str:
    lines = [HEADERS]
    for row in rows:
        agent = agent_out(row)
        lines.append(
            (
                str(agent.id),
                agent.name,
                agent.presence,
                f"{agent.used}/{agent.capacity}",
                ",".join(agent.queues) or "-",
                ",".join(f"{k}={v}" for k, v in sorted(agent.skills.items())) or "-",
                agent.language or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _invalid(exc: ValidationError) -> int:
    for problem in exc.errors():
        field = ".".join(str(p) for p in problem["loc"])
        print(f"invalid {field or 'agent'}: {problem['msg']}", file=sys.stderr)
    return 1


def _body(model: type[M], values: dict[str, Any]) -> M:
    """The model from the options given (an option left out is a field not sent)."""
    return model.model_validate({k: v for k, v in values.items() if v is not None})


async def _add(store: Store, args: argparse.Namespace, known: Collection[str] | None) -> int:
    body = _body(
        AgentCreate,
        {
            "name": args.name,
            "queues": args.queues,
            "skills": dict(args.skills) if args.skills else None,
            "capacity": args.capacity,
            "language": args.language,
        },
    )
    async with store.transaction() as conn:
        row, token = await create_agent(conn, body, known_queues=known)
    print(_table([row]))
    print(f"token (shown once): {token}")
    return 0


async def _list(store: Store, args: argparse.Namespace) -> int:
    async with store.transaction() as conn:
        rows = await list_agents(conn, queue=args.queue)
    if args.json:
        print(json.dumps([agent_out(r).model_dump(mode="json") for r in rows], indent=2))
    elif rows:
        print(_table(rows))
    else:
        print("no agents")
    return 0


async def _set(store: Store, args: argparse.Namespace, known: Collection[str] | None) -> int:
    body = _body(
        AgentUpdate,
        {
            "name": args.name,
            "queues": args.queues,
            "skills": dict(args.skills) if args.skills else None,
            "capacity": args.capacity,
            "language": args.language,
            "presence": args.presence,
        },
    )
    async with store.transaction() as conn:
        changed = await update_agent(conn, args.id, body, known_queues=known)
    if changed is None:
        print(f"no agent with id {args.id}", file=sys.stderr)
        return 1
    print(_table([changed.after]))
    if changed.events:
        print(
            f"presence {changed.before['presence']} → {changed.after['presence']}"
            " (agent.presence-changed is in the outbox)"
        )
    return 0


async def _remove(store: Store, args: argparse.Namespace) -> int:
    async with store.transaction() as conn:
        removed = await delete_agent(conn, args.id)
    if removed is None:
        print(f"no agent with id {args.id}", file=sys.stderr)
        return 1
    print(
        f"removed agent {removed.after['id']} ({removed.after['name']}); its token no longer works"
    )
    return 0


async def _agents(args: argparse.Namespace, settings: Settings) -> int:
    known = None
    if args.agents_command == "add" or (args.agents_command == "set" and args.queues):
        known = _known_queues(settings)
    store = Store(
        settings.database_url.get_secret_value(),
        min_size=0,
        max_size=1,
        connect_timeout=settings.db_connect_timeout,
    )
    try:
        if args.agents_command == "add":
            return await _add(store, args, known)
        if args.agents_command == "set":
            return await _set(store, args, known)
        if args.agents_command == "remove":
            return await _remove(store, args)
        return await _list(store, args)
    except ValidationError as exc:
        return _invalid(exc)
    except UnknownQueues as exc:
        print(f"invalid queues: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        print(f"database unreachable: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def _run(coro: Coroutine[Any, Any, int]) -> int:
    # A loop of our own, never installed as the thread's current loop.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


def cmd_agents(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``omniroute agents …``; 0 on success, 1 when the input or the agent is wrong."""
    return _run(_agents(args, settings))
