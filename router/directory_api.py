"""What an agent may see of the contact centre to find and hand on work: the queues
(``GET /api/queues``: which are pick-mode, which the agent serves) and the other agents
(``GET /api/agents``: who a conversation can be transferred to).

Both answer what an agent's UI needs and no more: no tokens, skills or workload of others.
"""

from __future__ import annotations

from aiohttp import web

from router.auth import current_agent
from router.routes import Many, Route
from router.state import CONFIG, STORE
from schemas.config import Config
from schemas.directory import DirectoryAgent, DirectoryQueue

TAGS = ("agent",)

# The agents table is small (one row per person, removed ones kept soft-deleted).
OTHER_AGENTS = """
SELECT id, name, presence, queues FROM agents
WHERE deleted_at IS NULL AND id <> $1
ORDER BY lower(name), id
"""


def pick_queues(config: Config) -> set[str]:
    """The queues where conversations of a pick-mode workstream can wait to be picked.

    Distribution leaves a pick-mode workstream's conversations queued, whatever queue they
    are in; they reach a queue by the workstream's routing (its rules, its fallback) and
    from there by a queue's out-of-hours transfer or overflow transfer, so the set is the
    routing targets closed under those moves.
    """
    reached: set[str] = set()
    for workstream in config.workstreams:
        if workstream.distribution.mode == "pick":
            reached.add(workstream.fallback_queue)
            reached.update(rule.queue for rule in workstream.routing)
    moves: dict[str, set[str]] = {}
    for queue in config.queues:
        targets = moves.setdefault(queue.name, set())
        if queue.hours is not None and queue.hours.out_of_hours.queue is not None:
            targets.add(queue.hours.out_of_hours.queue)
        if queue.overflow is not None and queue.overflow.queue is not None:
            targets.add(queue.overflow.queue)
    pending = list(reached)
    while pending:
        for target in moves.get(pending.pop(), set()) - reached:
            reached.add(target)
            pending.append(target)
    return reached


async def list_queues(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    config = request.app[CONFIG].current
    pick = pick_queues(config)
    mine = set(agent["queues"])
    queues = [
        DirectoryQueue(
            name=q.name,
            mode="pick" if q.name in pick else "push",
            priority=q.priority,
            member=q.name in mine,
        )
        for q in config.queues
    ]
    return web.json_response([q.model_dump(mode="json") for q in queues])


async def list_agents(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    pool = await request.app[STORE].pool()
    rows = await pool.fetch(OTHER_AGENTS, agent["id"])
    agents = [DirectoryAgent.model_validate(dict(r)) for r in rows]
    return web.json_response([a.model_dump(mode="json") for a in agents])


ROUTES = [
    Route(
        "GET",
        "/api/queues",
        list_queues,
        "listAgentQueues",
        "The configuration's queues: pick or push mode, and whether the caller serves each",
        TAGS,
        "agentToken",
        {200: Many(DirectoryQueue)},
    ),
    Route(
        "GET",
        "/api/agents",
        list_agents,
        "listTransferAgents",
        "The other agents a conversation can be transferred to (no removed agents)",
        TAGS,
        "agentToken",
        {200: Many(DirectoryAgent)},
    ),
]
