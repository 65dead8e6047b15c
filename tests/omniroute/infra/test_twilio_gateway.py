"""The per-account Twilio clients follow a rotated auth token: after a reload changes it,
sends go out with the new one (Twilio refuses the old one once the new one is promoted)."""

from __future__ import annotations

import asyncio

import pytest
from twilio.base.exceptions import TwilioRestException

from omniroute.infra.twilio_gateway import TwilioClients
from omniroute.twilio_emulator import EmulatorState, start_emulator

SID = "AC00000000000000000000000000000042"
CUSTOMER, BUSINESS = "whatsapp:+5511988887777", "whatsapp:+5511999990000"
OLD, NEW = "token-before-rotation-0123456789", "token-after-rotation-9876543210"


async def test_a_rotated_token_gets_a_new_client_and_the_old_one_stays_usable() -> None:
    state = EmulatorState(accounts={SID: OLD}, callback_delay=0.01)
    emulator = await start_emulator(state)
    clients = TwilioClients(emulator.url, timeout=5)
    try:
        before = clients.get(SID, OLD)
        assert clients.get(SID, OLD) is before
        sent = await before.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="a")
        assert sent.sid.startswith("SM")

        state.accounts[SID] = NEW  # the operator promoted the new token in Twilio's console
        with pytest.raises(TwilioRestException) as refused:
            await before.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="b")
        assert refused.value.status == 401
        after = clients.get(SID, NEW)  # what the outbound stage asks for after the reload
        assert after is not before
        sent = await after.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="c")
        assert sent.status == "queued"
        assert clients.get(SID, NEW) is after
    finally:
        await clients.close()
        await emulator.close()


def _session_closed(client: object) -> bool:
    session = client.http_client.session  # type: ignore[attr-defined]
    return bool(session.closed)


async def test_rotations_keep_two_clients_per_account_and_close_older_ones_after_a_grace() -> None:
    clients = TwilioClients("http://127.0.0.1:9", timeout=5, grace=0.05)
    other = "AC00000000000000000000000000000043"
    try:
        first = clients.get(SID, "token-1")
        second = clients.get(SID, "token-2")
        elsewhere = clients.get(other, "token-1")  # same token, another account: its own
        assert elsewhere is not first
        assert clients.get(SID, "token-1") is first  # a reload back finds the previous one
        third = clients.get(SID, "token-3")  # pushes out token-2's, the least recent
        assert clients.open_clients(SID) == [first, third]
        assert not _session_closed(second)  # a send may still be in flight on it
        await asyncio.sleep(0.2)
        assert _session_closed(second)
        assert not _session_closed(first) and not _session_closed(third)

        pushed_out = [clients.get(SID, f"rotation-{n}") for n in range(10)]
        assert clients.open_clients(SID) == pushed_out[-2:]
        await asyncio.sleep(0.2)
        assert all(_session_closed(c) for c in [first, third, *pushed_out[:-2]])
        assert not any(_session_closed(c) for c in pushed_out[-2:])
        assert clients.open_clients(other) == [elsewhere]
    finally:
        await clients.close()
    assert all(_session_closed(c) for c in [*pushed_out, elsewhere])


async def test_close_does_not_wait_for_the_grace_of_a_replaced_client() -> None:
    clients = TwilioClients("http://127.0.0.1:9", timeout=5, grace=3600)
    made = [clients.get(SID, f"token-{n}") for n in range(3)]
    async with asyncio.timeout(2):
        await clients.close()
    assert all(_session_closed(c) for c in made)
