"""The per-account Twilio clients follow a rotated auth token: after a reload changes it,
sends go out with the new one (Twilio refuses the old one once the new one is promoted)."""

from __future__ import annotations

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
