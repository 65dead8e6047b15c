"""The AsyncAPI document is generated from schemas/ and the checked-in copy matches it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omniroute.commands.contract import asyncapi
from omniroute.infra.topology import STAGES
from schemas.events import PAYLOADS, Envelope, EventType

CHECKED_IN = Path(__file__).resolve().parents[3] / "docs" / "asyncapi.json"
ENVELOPE = [
    "id",
    "type",
    "version",
    "occurred_at",
    "account",
    "conversation_id",
    "correlation_id",
    "causation_id",
    "data",
]


def _channels(document: dict[str, Any], kind: str) -> dict[str, Any]:
    """The channels that are AMQP routing keys (``routingKey``) or queues (``queue``)."""
    return {
        name: channel
        for name, channel in document["channels"].items()
        if channel["bindings"]["amqp"]["is"] == kind
    }


def _operations(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        channel[verb]
        for channel in document["channels"].values()
        for verb in ("publish", "subscribe")
        if verb in channel
    ]


def _message(document: dict[str, Any], ref: dict[str, str]) -> dict[str, Any]:
    prefix = "#/components/messages/"
    assert ref["$ref"].startswith(prefix)
    message: dict[str, Any] = document["components"]["messages"][ref["$ref"][len(prefix) :]]
    return message


def _schema(document: dict[str, Any], ref: dict[str, str]) -> dict[str, Any]:
    schema: dict[str, Any] = document["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    return schema


def test_every_event_type_has_a_payload_model_a_channel_and_a_message() -> None:
    document = asyncapi()
    assert document["asyncapi"].startswith("2.")
    types = {str(t) for t in EventType}
    assert types == set(PAYLOADS) == set(_channels(document, "routingKey"))
    assert types == {m["name"] for m in document["components"]["messages"].values()}


def test_every_message_has_an_id_and_its_own_named_payload() -> None:
    document = asyncapi()
    messages = document["components"]["messages"].values()
    ids = [m["messageId"] for m in messages]
    titles = [m["title"] for m in messages]
    payloads = [_schema(document, m["payload"]) for m in messages]
    data = [_schema(document, p["properties"]["data"]) for p in payloads]
    assert all(ids) and len(set(ids)) == len(ids)
    assert all(titles) and len(set(titles)) == len(titles)
    for names in ([p["title"] for p in payloads], [d["title"] for d in data]):
        assert "Data" not in names and len(set(names)) == len(names), names
    for message, payload, model in zip(messages, payloads, data, strict=True):
        assert payload["properties"]["type"]["const"] == message["name"]
        assert model["title"] == PAYLOADS[message["name"]].__name__


def test_every_operation_has_a_unique_operation_id() -> None:
    ids = [operation.get("operationId") for operation in _operations(asyncapi())]
    assert all(ids) and len(set(ids)) == len(ids), ids


def test_every_routing_key_is_sent_with_its_message() -> None:
    document = asyncapi()
    for routing_key, channel in _channels(document, "routingKey").items():
        assert _message(document, channel["subscribe"]["message"])["name"] == routing_key


def test_each_stage_queue_receives_what_it_binds() -> None:
    document = asyncapi()
    queues = _channels(document, "queue")
    assert set(queues) == {stage.queue for stage in STAGES.values()}
    for stage in STAGES.values():
        receive = queues[stage.queue]["publish"]
        received = {_message(document, ref)["name"] for ref in receive["message"]["oneOf"]}
        assert received == {str(key) for key in stage.bindings}, stage.queue
        assert queues[stage.queue]["bindings"]["amqp"]["queue"]["name"] == stage.queue


def test_the_envelope_documents_every_field() -> None:
    envelope = asyncapi()["components"]["schemas"]["Envelope"]
    assert list(Envelope.model_fields) == ENVELOPE
    assert set(envelope["properties"]) == set(ENVELOPE)
    for name, field in envelope["properties"].items():
        assert field.get("description"), name


def test_checked_in_document_is_the_generated_one() -> None:
    generated = json.loads(json.dumps(asyncapi(), sort_keys=True))
    assert json.loads(CHECKED_IN.read_text()) == generated, (
        "run: omniroute contract > docs/asyncapi.json"
    )


def test_every_ref_resolves() -> None:
    document = asyncapi()
    components = document["components"]

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        root, section, kind, name = ref.split("/")
        assert (root, section) == ("#", "components") and kind in ("schemas", "messages"), ref
        assert name in components[kind], ref


def test_stage_bindings_are_documented() -> None:
    channels = asyncapi()["channels"]
    assert channels["message.received"]["subscribe"]["x-omniroute-stages"] == [
        "bot",
        "conversations",
        "lifecycle",
    ]
    assert "distribute" in channels["conversation.queued"]["subscribe"]["x-omniroute-stages"]
