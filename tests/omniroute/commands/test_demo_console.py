"""What ``omniroute demo --keep-running`` prints works: the agent token signs in, the admin
token is the configured one or a fresh one, and the customer line posts to the emulator."""

from __future__ import annotations

import shlex

import orjson

from omniroute.commands.demo_console import (
    admin_token,
    console_agent,
    customer_command,
    rule_skills,
)
from omniroute.domain.agents import agent_by_token
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.store import Store


def test_the_admin_token_is_the_configured_one_or_a_fresh_one() -> None:
    assert admin_token("configured") == "configured"
    fresh = {admin_token(None) for _ in range(3)}
    assert len(fresh) == 3 and all(len(t) >= 32 for t in fresh)


async def test_the_console_agent_token_authenticates_an_agent_of_every_queue(
    store: Store, config: LiveConfig
) -> None:
    token = await console_agent(store, config.current)
    async with store.transaction() as conn:
        agent = await agent_by_token(conn, token)
    assert agent is not None
    assert sorted(agent["queues"]) == sorted(q.name for q in config.current.queues)
    assert agent["presence"] == "offline"
    assert set(agent["skills"]) == rule_skills(config.current) != set()


def test_the_customer_line_posts_a_whatsapp_message_to_the_emulator(config: LiveConfig) -> None:
    account = config.current.accounts[0]
    words = shlex.split(customer_command("http://127.0.0.1:9", "http://127.0.0.1:8", account))
    assert words[:4] == ["curl", "-s", "-X", "POST"]
    assert words[4] == "http://127.0.0.1:9/_emulator/customers/send"
    body = orjson.loads(words[words.index("-d") + 1])
    assert body["url"] == f"http://127.0.0.1:8/twilio/{account.name}/inbound"
    assert body["to"] == f"whatsapp:{account.numbers[0].number}"
    assert body["from"].startswith("whatsapp:+")
