"""``omniroute contract``: the event contract as an AsyncAPI document, generated from
``schemas/events.py`` (never written by hand), with each stage's queue and bindings."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from omniroute.infra.topology import STAGES
from schemas.events import DEAD_LETTER_EXCHANGE, EXCHANGE, PAYLOADS, Envelope

REF = "#/components/schemas/{model}"


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 2.6 document of every routing key on ``omniroute.events``."""
    models: list[type[BaseModel]] = [Envelope, *dict.fromkeys(PAYLOADS.values())]
    keyed, schema = models_json_schema(
        [(model, "validation") for model in models], ref_template=REF
    )
    components: dict[str, Any] = schema.get("$defs", {})
    channels: dict[str, Any] = {}
    for routing_key, model in sorted(PAYLOADS.items()):
        consumers = sorted(s.stage for s in STAGES.values() if routing_key in s.bindings)
        envelope = {
            "allOf": [
                keyed[(Envelope, "validation")],
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": str(routing_key)},
                        "data": keyed[(model, "validation")],
                    },
                },
            ]
        }
        channels[str(routing_key)] = {
            "description": f"routing key {routing_key} on the {EXCHANGE} topic exchange",
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {"name": EXCHANGE, "type": "topic", "durable": True},
                }
            },
            "subscribe": {
                "summary": (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "",
                "x-omniroute-stages": consumers,
                "message": {
                    "name": str(routing_key),
                    "contentType": "application/json",
                    "payload": envelope,
                },
            },
        }
    return {
        "asyncapi": "2.6.0",
        "info": {
            "title": "omniroute events",
            "version": "1",
            "description": (
                f"Every event is an envelope on the durable topic exchange {EXCHANGE}; `type` "
                "is the routing key. Persistent, published with confirms, at least once: dedup "
                "on `id`. Stage queues are quorum queues omniroute.<stage>; poison and spent "
                f"messages go through {DEAD_LETTER_EXCHANGE} to omniroute.<stage>.dead."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "components": {"schemas": components},
    }
