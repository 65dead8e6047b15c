"""``omniroute.domain.idempotency`` on a real database: a key answers its first request again,
refuses another request, waits for (then refuses) one in progress, is scoped per caller, and
keeps sealed fields out of the table."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from omniroute import errors
from omniroute.domain import idempotency
from omniroute.domain.idempotency import Answer, IdempotentRequest
from omniroute.infra.store import Store

PATH = "/api/conversations/c/messages"


def _request(key: str, body: object = None, scope: str = "admin") -> IdempotentRequest:
    fingerprint = idempotency.fingerprint("POST", PATH, body or {"text": "oi"})
    return IdempotentRequest(scope, key, fingerprint)


def _key() -> str:
    return f"key-{uuid.uuid4()}"


def test_a_key_has_one_to_the_maximum_characters() -> None:
    assert idempotency.checked_key(None) is None
    assert idempotency.checked_key("k") == "k"
    assert idempotency.checked_key("k" * idempotency.MAX_KEY_LENGTH)
    for bad in ("", "k" * (idempotency.MAX_KEY_LENGTH + 1)):
        with pytest.raises(errors.InvalidKey) as raised:
            idempotency.checked_key(bad)
        assert (raised.value.status, raised.value.code) == (400, "invalid_idempotency_key")


def test_the_fingerprint_is_the_request_not_its_spelling() -> None:
    one = idempotency.fingerprint("post", PATH, {"a": 1, "b": [1, 2]})
    assert one == idempotency.fingerprint("POST", PATH, {"b": [1, 2], "a": 1})
    assert one != idempotency.fingerprint("POST", PATH, {"a": 2, "b": [1, 2]})
    assert one != idempotency.fingerprint("POST", PATH + "x", {"a": 1, "b": [1, 2]})


async def test_the_same_request_gets_the_first_answer(store: Store) -> None:
    request = _request(_key())
    async with store.transaction() as conn:
        assert await idempotency.claim(conn, request) is None
        await idempotency.remember(conn, request, Answer(202, {"id": "m1", "n": [1]}))
    async with store.transaction() as conn:
        assert await idempotency.claim(conn, request) == Answer(202, {"id": "m1", "n": [1]})


async def test_another_request_with_the_key_is_refused(store: Store) -> None:
    key = _key()
    async with store.transaction() as conn:
        assert await idempotency.claim(conn, _request(key)) is None
        await idempotency.remember(conn, _request(key), Answer(201, {"id": "a1"}))
    with pytest.raises(errors.KeyReused) as raised:
        async with store.transaction() as conn:
            await idempotency.claim(conn, _request(key, {"text": "other"}))
    assert (raised.value.status, raised.value.code) == (422, "idempotency_key_reused")


async def test_keys_are_scoped_per_caller(store: Store) -> None:
    key = _key()
    first, second = (idempotency.agent_scope(uuid.uuid4()) for _ in range(2))
    async with store.transaction() as conn:
        assert await idempotency.claim(conn, _request(key, scope=first)) is None
        await idempotency.remember(conn, _request(key, scope=first), Answer(202, {"id": 1}))
    async with store.transaction() as conn:
        assert await idempotency.claim(conn, _request(key, scope=second)) is None
        assert await idempotency.claim(conn, _request(key, scope=idempotency.ADMIN_SCOPE)) is None


async def test_a_rolled_back_request_leaves_its_key_free(store: Store) -> None:
    request = _request(_key())
    with pytest.raises(RuntimeError):
        async with store.transaction() as conn:
            assert await idempotency.claim(conn, request) is None
            raise RuntimeError("the request failed")
    async with store.transaction() as conn:
        assert await idempotency.claim(conn, request) is None


async def test_a_retry_waits_for_the_first_request_then_gets_its_answer(store: Store) -> None:
    request = _request(_key())
    claimed, release = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with store.transaction() as conn:
            assert await idempotency.claim(conn, request) is None
            claimed.set()
            await release.wait()
            await idempotency.remember(conn, request, Answer(202, {"id": "first"}))

    async def retry() -> Answer | None:
        await claimed.wait()
        async with store.transaction() as conn:
            return await idempotency.claim(conn, request, wait=5)

    running = asyncio.gather(first(), retry())
    await claimed.wait()
    await asyncio.sleep(0.2)  # the retry is now waiting on the first request's claim
    release.set()
    _, answer = await running
    assert answer == Answer(202, {"id": "first"})


async def test_a_request_still_in_progress_past_the_wait_is_a_conflict(store: Store) -> None:
    request = _request(_key())
    async with store.transaction() as holder:
        assert await idempotency.claim(holder, request) is None
        with pytest.raises(errors.KeyInUse) as raised:
            async with store.transaction() as conn:
                await idempotency.claim(conn, request, wait=0.1)
        assert (raised.value.status, raised.value.code) == (409, "idempotency_key_in_use")
        await idempotency.remember(holder, request, Answer(202, {"id": "done"}))
    # The lock wait was the claim's own: later statements wait as the session says.
    async with store.transaction() as conn:
        assert await idempotency.claim(conn, request, wait=0.1) == Answer(202, {"id": "done"})
        assert await conn.fetchval("SELECT current_setting('lock_timeout')") == "0"


async def test_sealed_fields_are_stored_sealed_and_given_back(store: Store) -> None:
    key = _key()
    request = _request(key)
    answer = Answer(201, {"id": "a1", "token": "omr_secret-token"})
    async with store.transaction() as conn:
        assert await idempotency.claim(conn, request) is None
        await idempotency.remember(conn, request, answer, sealed=("token",))
    async with store.transaction() as conn:
        stored = await conn.fetchrow(
            "SELECT key, body::text AS body, sealed::text AS sealed FROM idempotency_keys"
            " WHERE scope = $1 AND key = $2",
            request.scope,
            request.digest,
        )
        assert stored is not None
        assert key not in stored["key"]
        assert "omr_secret-token" not in stored["body"] + stored["sealed"]
        assert await idempotency.claim(conn, request) == answer
