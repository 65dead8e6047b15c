"""A stage is declared once: the event types its handlers (or its wake-ups) take are the
keys the topology binds its queue to, and the AsyncAPI contract lists exactly those as the
stage's receive operation. A handler added without a binding, or a binding nobody
handles, fails here instead of dead-lettering or silently acking in production."""

from __future__ import annotations

from typing import Any

from consumers.registry import STAGES
from omniroute.commands.contract import asyncapi
from omniroute.infra.topology import STAGES as TOPOLOGY
from schemas.events import PAYLOADS


def test_every_stage_of_the_registry_has_a_queue_in_the_topology_and_back() -> None:
    assert set(STAGES) == set(TOPOLOGY)


def test_each_stage_takes_exactly_what_its_queue_is_bound_to() -> None:
    for name, stage in STAGES.items():
        assert stage.takes == frozenset(TOPOLOGY[name].bindings), name
        assert not (set(stage.handlers) & stage.wakes), f"{name}: handled and only woken"


def test_every_event_a_stage_takes_has_a_payload_model_in_the_contract() -> None:
    for name, stage in STAGES.items():
        assert stage.takes <= set(PAYLOADS), name


def test_optional_bindings_are_the_ones_the_stage_decides_on() -> None:
    """Keys bound only when the configuration needs them exist only where ``needs`` says."""
    for name, stage in STAGES.items():
        optional = set(TOPOLOGY[name].optional)
        assert optional <= stage.takes, name
        assert (stage.needs is not None) == bool(optional), name


def _received_by(document: dict[str, Any], queue: str) -> set[str]:
    channel = document["channels"][queue]
    message = channel["publish"]["message"]
    refs = [m["$ref"] for m in message.get("oneOf", [message])]
    names = {ref.rsplit("/", 1)[-1] for ref in refs}
    by_id = {m["messageId"]: m["name"] for m in document["components"]["messages"].values()}
    return {by_id.get(n, n) for n in names}


def test_the_contract_lists_what_each_stage_queue_receives() -> None:
    document = asyncapi()
    for name, stage in STAGES.items():
        assert _received_by(document, TOPOLOGY[name].queue) == set(stage.takes), name
