"""What ``omniroute demo --keep-running`` hands a person after the scripted run: the console's
URLs, a ready agent and the supervisor's token, and how to write as a customer, so a shift
can be run in the browser against the same router, stages and Twilio emulator."""

from __future__ import annotations

import secrets
import shlex

import orjson
from pydantic import BaseModel

from omniroute.domain.agents import create_agent
from omniroute.infra.store import Store
from schemas.api import AgentCreate
from schemas.config import Account, Config
from schemas.rules import Outputs

CONSOLE_AGENT = "Console Agent"


def admin_token(configured: str | None) -> str:
    """The configured admin token, or a fresh one for this run (printed, never stored)."""
    return configured or secrets.token_urlsafe(24)


def rule_skills(node: object) -> set[str]:
    """Every skill a classification rule of the configuration can ask for."""
    if isinstance(node, Outputs):
        return set(node.skills)
    if isinstance(node, BaseModel):
        return set().union(*(rule_skills(getattr(node, f)) for f in type(node).model_fields))
    if isinstance(node, list | tuple):
        return set().union(*(rule_skills(item) for item in node))
    if isinstance(node, dict):
        return set().union(*(rule_skills(item) for item in node.values()))
    return set()


async def console_agent(store: Store, config: Config) -> str:
    """An agent in every queue with every skill the rules ask for (so every conversation can
    reach it), offline until it signs in; its token, shown once."""
    queues = [q.name for q in config.queues]
    skills = dict.fromkeys(sorted(rule_skills(config)), 10)
    spec = AgentCreate(name=CONSOLE_AGENT, queues=queues, skills=skills, capacity=3, language=None)
    async with store.transaction() as conn:
        _, token = await create_agent(conn, spec, known_queues=set(queues))
    return token


def customer_command(emulator_url: str, router_url: str, account: Account) -> str:
    """A curl line that writes to the first number as a new WhatsApp customer."""
    number = account.numbers[0].number
    body = {
        "account_sid": account.account_sid,
        "url": f"{router_url}/twilio/{account.name}/inbound",
        "from": "whatsapp:+5511988887777",
        "to": f"whatsapp:{number}",
        "profile_name": "Paula",
        "body": "Oi! I need help with my order",
    }
    return (
        f"curl -s -X POST {emulator_url}/_emulator/customers/send "
        f"-H 'Content-Type: application/json' -d {shlex.quote(orjson.dumps(body).decode())}"
    )


def print_console(router_url: str, agent_token: str, supervisor_token: str, customer: str) -> None:
    print(
        "\nThe console (a shift in the browser):\n"
        f"  agent workspace   {router_url}/console\n"
        f"    Agent token     {agent_token}   ({CONSOLE_AGENT}, all queues and skills)\n"
        f"  supervisor view   {router_url}/console/supervisor\n"
        f"    Admin token     {supervisor_token}\n"
        "  write as a customer (the Twilio emulator signs and posts the webhook):\n"
        f"    {customer}\n"
        "  (demo tokens: valid for this run only; lifecycle timers back to the example's)"
    )
