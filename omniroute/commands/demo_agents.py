"""The agents' half of ``omniroute demo``: agents created through the same code as the admin
API, going available, accepting offers (push) or picking (pick mode) through the agent API,
replying inside the window, sending a template, declining an offer, transferring to another
queue, closing; a supervisor removing one of them — then retired."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from omniroute.domain import supervisor
from omniroute.domain.agents import create_agent, delete_agent
from omniroute.infra.store import Store
from schemas.api import AgentCreate
from schemas.config import Config
from schemas.events import utcnow

WORK_SECONDS = 20.0


@dataclass(frozen=True)
class DemoAgent:
    id: str
    name: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def create_demo_agents(store: Store, config: Config, run: str) -> list[DemoAgent]:
    """Two agents in every queue of the example (one a billing specialist), offline until
    they sign in. Either alone has room for the conversations it may be offered first:
    work left waiting for capacity is only taken once idle timers free some, and by then the
    conversation Maria's agent is to answer may have been closed as idle."""
    queues = [q.name for q in config.queues]
    specs = [
        AgentCreate(
            name=f"Ana Souza ({run})",
            queues=queues,
            skills={"billing": 8, "orders": 5},
            capacity=8,
            language="pt-BR",
        ),
        AgentCreate(
            name=f"Bruno Lima ({run})",
            queues=queues,
            skills={"orders": 7},
            capacity=4,
            language="pt-BR",
        ),
    ]
    agents = []
    async with store.transaction() as conn:
        for spec in specs:
            row, token = await create_agent(conn, spec, known_queues=set(queues))
            agents.append(DemoAgent(str(row["id"]), spec.name, token))
    return agents


async def retire_demo_agents(store: Store, agents: list[DemoAgent]) -> None:
    async with store.transaction() as conn:
        for agent in agents:
            await delete_agent(conn, agent.id)


async def _json(response: aiohttp.ClientResponse) -> Any:
    async with response:
        response.raise_for_status()
        return await response.json()


async def go_available(http: aiohttp.ClientSession, url: str, agents: list[DemoAgent]) -> None:
    for agent in agents:
        async with http.put(
            f"{url}/api/me/presence", headers=agent.auth, json={"presence": "available"}
        ) as response:
            response.raise_for_status()
        print(f"  {agent.name} is available")


async def take_work(
    http: aiohttp.ClientSession,
    url: str,
    agents: list[DemoAgent],
    wanted: set[str],
    queues: list[str],
) -> dict[str, str]:
    """Accept offers and pick from pick-mode queues until every wanted conversation is taken;
    conversation id → agent name."""
    taken: dict[str, str] = {}
    async with asyncio.timeout(WORK_SECONDS):
        while not wanted <= set(taken):
            for agent in agents:
                for offer in await _json(
                    await http.get(f"{url}/api/me/offers", headers=agent.auth)
                ):
                    async with http.post(
                        f"{url}/api/offers/{offer['id']}/accept", headers=agent.auth
                    ) as response:
                        if response.status == 200:
                            taken[offer["conversation_id"]] = agent.name
                            print(
                                f"  {agent.name} accepted the offer for "
                                f"{offer['customer']} (queue {offer['queue']})"
                            )
                for queue in queues:
                    items = await _json(
                        await http.get(f"{url}/api/queues/{queue}/items", headers=agent.auth)
                    )
                    for item in items:
                        if item["id"] not in wanted or not item["fits_capacity"]:
                            continue
                        async with http.post(
                            f"{url}/api/queue-items/{item['id']}/pick", headers=agent.auth
                        ) as response:
                            if response.status == 200:
                                taken[item["id"]] = agent.name
                                print(
                                    f"  {agent.name} picked {item['customer']} "
                                    f"from queue {queue} (pick mode)"
                                )
            await asyncio.sleep(0.2)
    return taken


async def converse(
    http: aiohttp.ClientSession,
    url: str,
    agent: DemoAgent,
    conversation_id: str,
    template: str | None,
) -> list[str]:
    """Reply inside the window, send a template, and close; the message ids."""
    base = f"{url}/api/conversations/{conversation_id}"
    sent = []
    reply = {"text": "Olá! Aqui é do suporte, já estou vendo o seu pedido."}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    for _ in range(2):  # a double click: the same key sends once
        async with http.post(f"{base}/messages", headers=agent.auth | key, json=reply) as r:
            answer = await r.json()
    print(
        f"  {agent.name} replies (sent twice with one Idempotency-Key): "
        f"{r.status} {answer['status']}, window open until {answer['window']['closes_at']}"
    )
    sent.append(answer["id"])
    if template:
        body = {"template": {"name": template, "variables": {"1": "Maria", "2": "1234"}}}
        async with http.post(f"{base}/messages", headers=agent.auth, json=body) as r:
            answer = await r.json()
        print(f"  {agent.name} sends template {template}: {r.status} {answer['status']}")
        sent.append(answer["id"])
    return sent


async def close(http: aiohttp.ClientSession, url: str, agent: DemoAgent, cid: str) -> int:
    async with http.post(f"{url}/api/conversations/{cid}/close", headers=agent.auth) as r:
        return r.status


async def offer_for(
    http: aiohttp.ClientSession, url: str, agents: Sequence[DemoAgent], conversation_id: str
) -> tuple[DemoAgent, dict[str, Any]]:
    """Wait for the conversation's pending offer to reach one of ``agents``: that agent and
    the offer, as ``GET /api/me/offers`` shows it."""
    async with asyncio.timeout(WORK_SECONDS):
        while True:
            for agent in agents:
                offers = await _json(await http.get(f"{url}/api/me/offers", headers=agent.auth))
                for offer in offers:
                    if offer["conversation_id"] == conversation_id:
                        return agent, offer
            await asyncio.sleep(0.1)


async def decide(
    http: aiohttp.ClientSession,
    url: str,
    agent: DemoAgent,
    offer: dict[str, Any],
    decision: Literal["accept", "decline"],
) -> int:
    async with http.post(f"{url}/api/offers/{offer['id']}/{decision}", headers=agent.auth) as r:
        return r.status


async def transfer(
    http: aiohttp.ClientSession, url: str, agent: DemoAgent, cid: str, queue: str
) -> int:
    """The agent moves its conversation to another queue (``POST …/transfer``)."""
    async with http.post(
        f"{url}/api/conversations/{cid}/transfer", headers=agent.auth, json={"queue": queue}
    ) as r:
        return r.status


async def remove_as_supervisor(store: Store, agent: DemoAgent, actor: str) -> bool:
    """A supervisor removes the agent, as the composition root may: its offers end and its
    conversations go back to their queues ahead of others (``supervisor.remove_agent``),
    audited as ``supervisor.acted``. False when there was no such agent (nothing written)."""
    async with store.transaction() as conn:
        return await supervisor.remove_agent(conn, agent.id, actor, utcnow()) is not None
