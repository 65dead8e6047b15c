"""The agent and admin APIs fuzzed from their own OpenAPI document with schemathesis: the
document is loaded from the live router (``/api/openapi.json``), cases are generated both
valid and invalid, sent with real tokens over a loopback socket, and every answer must be
documented, well-typed and never a 5xx."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.common import TIMEOUT, CrashWatch, fuzz_settings
from tests.fuzz.conftest import ADMIN_TOKEN, Served, World

schemathesis = pytest.importorskip(
    "schemathesis",
    reason="schemathesis is not installed (pip install 'schemathesis>=4.0'): the OpenAPI fuzz"
    " tests need it",
)

pytestmark = [pytest.mark.fuzz, pytest.mark.integration, TIMEOUT]

OPENAPI = "/api/openapi.json"
# The Server-Sent Events stream never ends: it has its own tests.
EXCLUDED = ("/api/me/events",)


def _checks() -> list[Any]:
    from schemathesis import checks

    # Not ``not_a_server_error``: a 502 is the documented answer of the media endpoint
    # when the attachment is not on Twilio's host; 5xx are asserted on in ``_fuzz``.
    return [
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_headers_conformance,
        checks.response_schema_conformance,
    ]


async def _schema(served: Served, tag: str) -> Any:
    url = served.base_url + OPENAPI
    schema = await asyncio.to_thread(schemathesis.openapi.from_url, url)
    return schema.include(tag=tag).exclude(path=list(EXCLUDED))


def _known_ids(world: World) -> dict[str, str]:
    return {
        "conversation_id": world.conversation_id,
        "message_id": world.message_id,
        "offer_id": world.offer_id,
        "item_id": world.queued_conversation_id,
        "agent_id": world.intruder.id,
        "queue": "general",
        "n": "0",
    }


def _cases(schema: Any, known: dict[str, str]) -> st.SearchStrategy[Any]:
    """Valid and invalid cases of every operation; half of the valid ones aimed at ids that
    exist (so that handlers run past their 404)."""
    from schemathesis import GenerationMode

    strategies: list[st.SearchStrategy[Any]] = [
        schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    ]
    for result in schema.get_all_operations():
        operation = result.ok()
        names = re.findall(r"\{(\w+)\}", operation.path)
        fixed = {name: known[name] for name in names if name in known}
        if fixed:
            strategies.append(operation.as_strategy(path_parameters=fixed))
    return st.one_of(strategies)


async def _send(served: Served, case: Any, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else None

    def call() -> Any:
        response = case.call(base_url=served.base_url, headers=headers, timeout=30)
        try:
            case.validate_response(response, checks=_checks(), headers=headers)
        except Exception as exc:  # a check failed: the failure, with the reproduction
            return response, exc
        return response, None

    return await asyncio.to_thread(call)


async def _fuzz(served: Served, world: World, tag: str, token: str, data: st.DataObject) -> None:
    crashes = CrashWatch()
    key = (tag, world.conversation_id)
    if key not in _STRATEGIES:  # once per test: the document and strategies are costly
        _STRATEGIES[key] = _cases(await _schema(served, tag), _known_ids(world))
    case = data.draw(_STRATEGIES[key], label="case")
    # Mostly with the right token; now and then with none, to check the 401s are documented.
    with_token = data.draw(st.integers(0, 9), label="token") > 0
    response, failure = await _send(served, case, token if with_token else None)
    # The media endpoint answers 502 when Twilio cannot provide the file; nothing else may
    # answer 5xx (broker and database are up).
    allowed = {502} if case.operation.path.endswith("/media/{n}") else set()
    assert response.status_code < 500 or response.status_code in allowed, (
        case.method,
        case.formatted_path,
        response.status_code,
        response.text[:500],
    )
    assert not crashes.new()
    if failure is not None:
        raise failure


_STRATEGIES: dict[tuple[str, str], st.SearchStrategy[Any]] = {}


@fuzz_settings()
@given(data=st.data())
async def test_agent_api_from_openapi(served: Served, world: World, data: st.DataObject) -> None:
    await _fuzz(served, world, "agent", world.owner.token, data)


@fuzz_settings()
@given(data=st.data())
async def test_admin_api_from_openapi(served: Served, world: World, data: st.DataObject) -> None:
    await _fuzz(served, world, "admin", ADMIN_TOKEN, data)


async def test_nul_characters_in_api_input_are_refused_not_500(
    served: Served, world: World
) -> None:
    """PostgreSQL cannot store U+0000 in text or jsonb: input carrying one must be refused
    (4xx), not crash the handler (what schemathesis finds with enough examples)."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    cid = world.conversation_id
    calls: list[tuple[str, str, dict[str, str], Any]] = [
        ("PATCH", f"/api/admin/conversations/{cid}/variables", admin, {"variables": {"k": "\x00"}}),
        (
            "PATCH",
            f"/api/conversations/{cid}/variables",
            world.owner.auth,
            {"variables": {"\x00": 1}},
        ),
        ("POST", "/api/admin/agents", admin, {"name": "a\x00b", "capacity": 0}),
        ("GET", "/api/admin/agents?queue=%00", admin, None),
        ("GET", "/api/admin/conversations?queue=%00", admin, None),
        ("GET", "/api/admin/surveys?workstream=%00", admin, None),
        ("POST", f"/api/conversations/{cid}/messages", world.owner.auth, {"text": "\x00"}),
    ]
    answers = []
    for method, path, headers, body in calls:
        response = await served.client.request(method, path, headers=headers, json=body)
        answers.append((method, path, response.status))
    crashed = [answer for answer in answers if answer[2] >= 500]
    assert not crashed, crashed
