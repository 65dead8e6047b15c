"""The AsyncAPI document is generated from schemas/ and the checked-in copy matches it."""

from __future__ import annotations

import json
from pathlib import Path

from omniroute.commands.contract import asyncapi
from schemas.events import PAYLOADS, EventType

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def test_every_event_type_has_a_payload_model_and_a_channel() -> None:
    document = asyncapi()
    assert document["asyncapi"].startswith("2.")
    assert {str(t) for t in EventType} == set(PAYLOADS) == set(document["channels"])


def test_checked_in_document_is_the_generated_one() -> None:
    generated = json.loads(json.dumps(asyncapi(), sort_keys=True))
    assert json.loads(CHECKED_IN.read_text()) == generated, (
        "run: omniroute contract > docs/asyncapi.json"
    )


def test_every_ref_resolves() -> None:
    document = asyncapi()
    schemas = document["components"]["schemas"]

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref


def test_stage_bindings_are_documented() -> None:
    channels = asyncapi()["channels"]
    assert channels["message.received"]["subscribe"]["x-omniroute-stages"] == [
        "conversations",
        "lifecycle",
    ]
    assert "distribute" in channels["conversation.queued"]["subscribe"]["x-omniroute-stages"]
