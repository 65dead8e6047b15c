"""``omniroute contract``: the event contract as an AsyncAPI document, generated from
``schemas/events.py`` (never written by hand), with each stage's queue and bindings.

Every event type is one named message (``components.messages``) whose payload is its own
envelope schema (``<Type>Event``) with ``data`` pointing at the type's payload model, so
code generators get one class per event instead of one generic envelope.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from omniroute.infra.topology import STAGES
from schemas.events import DEAD_LETTER_EXCHANGE, EXCHANGE, PAYLOADS, Envelope

ASYNCAPI = "2.6.0"
AMQP_BINDING = "0.2.0"
SCHEMAS = "#/components/schemas/"
MESSAGES = "#/components/messages/"
PERSISTENT = 2  # AMQP delivery mode of every publish


def pascal(name: str) -> str:
    """``message.send-requested`` → ``MessageSendRequested`` (ids and schema names)."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[.\-_]", name) if part)


def summary(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""


def event_schema(
    envelope: dict[str, Any], routing_key: str, data: type[BaseModel], data_ref: dict[str, Any]
) -> dict[str, Any]:
    """The envelope of one event type: ``type`` fixed to its routing key, ``data`` its model."""
    properties = dict(envelope["properties"])
    properties["type"] = {**properties["type"], "const": routing_key}
    properties["data"] = data_ref
    return {
        **envelope,
        "title": f"{pascal(routing_key)}Event",
        "description": f"The {routing_key} event: the envelope, with `data` a {data.__name__}.",
        "properties": properties,
    }


def message(routing_key: str, model: type[BaseModel]) -> dict[str, Any]:
    name = pascal(routing_key)
    return {
        "messageId": name,
        "name": routing_key,
        "title": routing_key.replace(".", " ").replace("-", " ").capitalize(),
        "summary": summary(model),
        "contentType": "application/json",
        "payload": {"$ref": f"{SCHEMAS}{name}Event"},
        "bindings": {"amqp": {"messageType": routing_key, "bindingVersion": AMQP_BINDING}},
    }


def routing_key_channel(routing_key: str, model: type[BaseModel]) -> dict[str, Any]:
    """Where omniroute publishes the event; its ``subscribe`` is the send operation."""
    return {
        "description": f"routing key {routing_key} on the {EXCHANGE} topic exchange",
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {"name": EXCHANGE, "type": "topic", "durable": True},
                "bindingVersion": AMQP_BINDING,
            }
        },
        "subscribe": {
            "operationId": f"send{pascal(routing_key)}",
            "summary": summary(model),
            "x-omniroute-stages": sorted(
                name for name, stage in STAGES.items() if routing_key in stage.bindings
            ),
            "bindings": {"amqp": {"deliveryMode": PERSISTENT, "bindingVersion": AMQP_BINDING}},
            "message": {"$ref": MESSAGES + pascal(routing_key)},
        },
    }


def queue_channel(name: str, queue: str, bindings: list[str]) -> dict[str, Any]:
    """A stage's queue; its ``publish`` is the stage receiving what its bindings route.

    AsyncAPI 2.x gives a channel one operation per direction, so a queue bound to several
    routing keys is one receive operation whose message is one of the bound events.
    """
    return {
        "description": (
            f"the {name} stage's durable quorum queue on the {EXCHANGE} exchange, bound by "
            f"routing keys {', '.join(bindings)}; rejected and spent messages dead-letter "
            f"through {DEAD_LETTER_EXCHANGE}"
        ),
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {"name": queue, "durable": True, "exclusive": False, "autoDelete": False},
                "bindingVersion": AMQP_BINDING,
            }
        },
        "x-omniroute-routing-keys": bindings,
        "publish": {
            "operationId": f"receiveOn{pascal(name)}Queue",
            "summary": f"the {name} stage consumes {queue}, acking once its effects commit",
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
            "message": {"oneOf": [{"$ref": MESSAGES + pascal(key)} for key in bindings]},
        },
    }


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 2.6 document of every routing key on ``omniroute.events``."""
    models: list[type[BaseModel]] = [Envelope, *dict.fromkeys(PAYLOADS.values())]
    refs, schema = models_json_schema(
        [(model, "validation") for model in models], ref_template=SCHEMAS + "{model}"
    )
    schemas: dict[str, Any] = schema.get("$defs", {})
    envelope = schemas[Envelope.__name__]
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    for routing_key, model in sorted(PAYLOADS.items()):
        key = str(routing_key)
        schemas[f"{pascal(key)}Event"] = event_schema(
            envelope, key, model, refs[(model, "validation")]
        )
        messages[pascal(key)] = message(key, model)
        channels[key] = routing_key_channel(key, model)
    for name, stage in sorted(STAGES.items()):
        channels[stage.queue] = queue_channel(name, stage.queue, sorted(map(str, stage.bindings)))
    return {
        "asyncapi": ASYNCAPI,
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
        "components": {"schemas": schemas, "messages": messages},
    }
