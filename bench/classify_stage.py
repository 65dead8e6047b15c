"""Classify stage throughput with a 50-rule configuration vs the same stage with no rules,
and the rule engine alone (classifications per second), in one run."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from bench.infra import CONVERSATION_COLUMNS, BenchInfra
from consumers import classify
from consumers.rules import classify as run_rules
from consumers.runtime import StageRunner
from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store
from schemas.events import ConversationOpened, Envelope, EventType, event_id

TOKEN_ENV = {"BENCH_TOKEN": "bench-token"}
BASE = """
accounts:
  - name: bench
    account_sid: AC00000000000000000000000000000009
    auth_token_env: BENCH_TOKEN
    numbers: [{name: Main, number: "+5511999990000", workstream: main}]
queues: [{name: general}, {name: billing}, {name: sales}]
"""


def rules_yaml(count: int) -> str:
    """A workstream with ``count`` classification rules over several rulesets, plus routes."""
    if count == 0:
        return BASE + "workstreams: [{name: main, fallback_queue: general}]\n"
    rulesets = []
    per_set = 10
    for s in range(max(1, count // per_set)):
        rules = []
        for r in range(per_set):
            n = s * per_set + r
            rules.append(
                f"          - name: r{n}\n"
                f"            when: {{any: [{{field: body, op: contains, value: word{n}}},"
                f" {{field: body, op: matches, value: 'pedido\\s+{n}\\b'}},"
                f" {{all: [{{field: customer.region, op: in, value: [AR, CL, 'X{n}']}},"
                f" {{field: time, op: ge, value: '23:59'}}]}}]}}\n"
                f"            then: {{skills: {{s{n}: 3}}, priority: {n % 10}}}\n"
            )
        rulesets.append(
            f"      - name: set{s}\n        hit_policy: all\n        rules:\n" + "".join(rules)
        )
    return (
        BASE
        + "workstreams:\n  - name: main\n    fallback_queue: general\n    classification:\n"
        + "".join(rulesets)
        + "    routing:\n"
        + "      - {name: billing, when: {field: skills.s1, op: exists}, queue: billing}\n"
        + "      - {name: sales, when: {field: body, op: contains, value: comprar}, queue: sales}\n"
    )


async def _seed(store: Store, count: int) -> list[Envelope]:
    """Open conversations in the database and their conversation.opened events."""
    events = []
    now = datetime.now(UTC)
    pool = await store.pool()
    async with pool.acquire() as conn:
        contact = uuid.uuid4()
        await conn.execute(
            "INSERT INTO contacts (id, account, address) VALUES ($1, 'bench', $2)",
            contact,
            f"+55119{uuid.uuid4().int % 10**8:08d}",
        )
        rows = []
        for n in range(count):
            cid = uuid.uuid4()
            customer = f"+5511{uuid.uuid4().int % 10**9:09d}"
            rows.append(
                (cid, "bench", "+5511999990000", customer, contact, "main", "open", now, now)
            )
            opened = ConversationOpened(
                conversation_id=str(cid),
                contact_id=str(contact),
                business_number="+5511999990000",
                customer=customer,
                workstream="main",
                first_message_id=str(uuid.uuid4()),
                first_message_sid="SM" + uuid.uuid4().hex,
                first_message_body=f"olá, meu pedido {n % 97} não chegou, quero comprar",
                opened_at=now,
            )
            eid = event_id("bench", str(cid))
            events.append(
                Envelope(
                    id=eid,
                    type=EventType.CONVERSATION_OPENED,
                    occurred_at=now,
                    account="bench",
                    conversation_id=str(cid),
                    correlation_id=eid,
                    data=opened.model_dump(mode="json"),
                )
            )
        await conn.copy_records_to_table(
            "conversations",
            records=rows,
            columns=CONVERSATION_COLUMNS,
        )
    return events


async def stage_throughput(infra: BenchInfra, rules: int, count: int) -> float:
    """Conversations classified per second by one classify runner, queue pre-filled."""
    settings = Settings.model_validate(
        {
            "amqp_url": infra.amqp_url,
            "database_url": infra.database_url,
            "prefetch": 64,
            "db_pool_max": 10,
        }
    )
    config = LiveConfig(parse_config(rules_yaml(rules), "bench.yaml", TOKEN_ENV))
    store = Store(infra.database_url, max_size=10)
    bus = Bus.from_settings(settings)
    await bus.start()
    await bus.wait_ready()
    events = await _seed(store, count)
    for start in range(0, count, 500):
        await asyncio.gather(*(bus.publish(e) for e in events[start : start + 500]))
    runner = StageRunner(classify.STAGE, bus=bus, store=store, config=config, settings=settings)
    pool = await store.pool()
    started = time.perf_counter()
    await runner.start()
    ids = [e.conversation_id for e in events]
    query = "SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[]) AND state = 'open'"
    while True:
        if not await pool.fetchval(query, ids):
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    await runner.stop()
    await bus.close()
    await store.close()
    return count / elapsed


def engine_rate(rules: int, seconds: float = 1.0) -> float:
    """Classifications per second of the pure rule engine over one context."""
    config = parse_config(rules_yaml(rules), "bench.yaml", TOKEN_ENV)
    compiled = classify.compile_config(config)["main"]
    context: dict[str, Any] = {
        "body": "olá, meu pedido 42 não chegou",
        "customer.region": "BR",
        "time": "10:00",
        "account": "bench",
        "workstream": "main",
    }
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(200):
            run_rules(compiled, context)
        done += 200
    return done / (time.perf_counter() - started)


async def run(infra: BenchInfra, count: int = 3000) -> list[dict[str, Any]]:
    await stage_throughput(infra, 0, 300)  # warm-up: connections, plans, imports
    base = await stage_throughput(infra, 0, count)
    ruled = await stage_throughput(infra, 50, count)
    engine_none, engine_50 = engine_rate(0), engine_rate(50)
    return [
        {
            "figure": "classify stage, 50 rules (conversations/s)",
            "value": round(ruled, 1),
            "baseline": "same stage, no rules",
            "baseline_value": round(base, 1),
            "ratio": round(ruled / base, 3),
            "goal": ">= 0.8",
        },
        {
            "figure": "rule engine alone, 50 rules (classifications/s)",
            "value": round(engine_50, 1),
            "baseline": "rule engine, no rules",
            "baseline_value": round(engine_none, 1),
            "ratio": round(engine_50 / engine_none, 3),
            "goal": "information",
        },
    ]
