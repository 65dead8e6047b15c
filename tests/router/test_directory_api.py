"""The agent directory: the configuration's queues (pick or push, the caller's or not) and
the other agents a conversation can be transferred to, never their tokens."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from omniroute.infra.config_loader import LiveConfig, parse_config
from router.directory_api import pick_queues
from tests.support import ACCOUNT_SID, ENVIRON, new_agent

Client = TestClient[Any, Any]

# ``picking`` is pick-mode: its routing reaches triage and vip, and triage overflows into
# spill; ``pushing`` only reaches general, and nothing moves work into general or into
# after-hours (which only receives out-of-hours transfers from general).
DIRECTORY_YAML = f"""
accounts:
  - name: contoso
    account_sid: {ACCOUNT_SID}
    auth_token_env: TEST_TWILIO_TOKEN_CONTOSO
    numbers:
      - {{name: Picks, number: "+5511999990000", workstream: picking}}
      - {{name: Pushes, number: "+5511999990001", workstream: pushing}}
workstreams:
  - name: picking
    fallback_queue: triage
    distribution: {{mode: pick}}
    routing:
      - {{name: vip, when: {{field: body, op: contains, value: vip}}, queue: vip}}
  - name: pushing
    fallback_queue: general
queues:
  - name: general
    hours:
      timezone: UTC
      weekly: {{mon: ["09:00-18:00"]}}
      out_of_hours: {{action: transfer, queue: after-hours}}
  - name: triage
    overflow: {{max_waiting: 10, action: transfer, queue: spill}}
  - {{name: vip, priority: 5}}
  - {{name: spill}}
  - {{name: after-hours}}
"""


@pytest.fixture
def config() -> LiveConfig:
    return LiveConfig(parse_config(DIRECTORY_YAML, "directory.yaml", ENVIRON))


def test_pick_queues_follow_routing_and_moves(config: LiveConfig) -> None:
    assert pick_queues(config.current) == {"triage", "vip", "spill"}


async def test_queues_say_mode_and_membership(router: Client, db: asyncpg.Pool) -> None:
    _, auth = await new_agent(db, queues=["triage", "general"])
    response = await router.get("/api/queues", headers=auth)
    assert response.status == 200
    assert await response.json() == [
        {"name": "general", "mode": "push", "priority": 0, "member": True},
        {"name": "triage", "mode": "pick", "priority": 0, "member": True},
        {"name": "vip", "mode": "pick", "priority": 5, "member": False},
        {"name": "spill", "mode": "pick", "priority": 0, "member": False},
        {"name": "after-hours", "mode": "push", "priority": 0, "member": False},
    ]


async def test_agents_lists_the_others_without_secrets(router: Client, db: asyncpg.Pool) -> None:
    me, auth = await new_agent(db, queues=["general"], name="Me")
    other, _ = await new_agent(db, queues=["general", "vip"], name="Bruna", presence="available")
    removed, _ = await new_agent(db, queues=["general"], name="Gone")
    await db.execute("UPDATE agents SET deleted_at = now() WHERE id = $1", removed)
    response = await router.get("/api/agents", headers=auth)
    assert response.status == 200
    listed = {agent["id"]: agent for agent in await response.json()}
    assert listed[other] == {
        "id": other,
        "name": "Bruna",
        "presence": "available",
        "queues": ["general", "vip"],
    }
    assert me not in listed and removed not in listed
    assert all(set(agent) == {"id", "name", "presence", "queues"} for agent in listed.values())


@pytest.mark.parametrize("path", ["/api/queues", "/api/agents"])
async def test_the_directory_is_for_agents_only(router: Client, path: str) -> None:
    assert (await router.get(path)).status == 401
    response = await router.get(path, headers={"Authorization": "Bearer omr_not-a-token"})
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_token"
