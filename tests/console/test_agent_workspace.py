"""An agent's shift in the console (``/console``), in a real headless chromium against the
whole stack: sign in, go available, take an offer, read the customer's text and image, reply
and watch the status reach read, be refused free text once the window closed and send a
template, transfer, end a conversation and wrap up. Every named control is found by its role
and accessible name, as assistive technology finds it; each step leaves a screenshot.

Measured and printed (never asserted): the time from a customer's webhook being answered to
the offer being visible, and from a dropped event stream coming back to the event it missed
being shown.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.console.conftest import (
    STEP_TIMEOUT_MS,
    TEMPLATE,
    Shots,
    Stack,
    Stopwatch,
    Watched,
    tiny_png,
)
from tests.console.steps import (
    accept_offer,
    go_available,
    message_box,
    offer_of,
    open_conversation,
    reaches,
    sign_in,
    template_variable,
    thread_item,
)
from tests.support import new_customer, wait_for

pytestmark = pytest.mark.timeout(180)


# --- the shift ----------------------------------------------------------------------------


async def test_an_agent_shift(page: Page, stack: Stack, shots: Shots, watched: Watched) -> None:
    agent_id, token = await stack.new_agent("Ana Lima")
    other_agent_id, _ = await stack.new_agent("Bruno Reis", queues=[stack.other_queue])
    customer, profile = new_customer(), "Maria Souza"

    await page.goto(f"{stack.url}/console")
    await expect(page.get_by_label("Agent token")).to_be_visible()
    await shots(page, "sign-in form")
    await sign_in(page, stack, token)
    await shots(page, "signed in")
    await go_available(page, stack, agent_id)
    await shots(page, "available")

    # A customer writes: the offer appears live, with a countdown to its expiry.
    clock = Stopwatch()
    await stack.customer_writes(customer, "Olá, meu pedido não chegou", profile=profile)
    answered = clock.seconds()
    offer = offer_of(page, customer)
    await expect(offer).to_be_visible()
    shown = clock.seconds()
    print(
        f"\n[measure] webhook answered after {answered * 1000:.0f} ms; offer visible"
        f" {(shown - answered) * 1000:.0f} ms after the webhook was answered"
    )
    await expect(offer).to_contain_text(stack.main_queue)
    await shots(page, "offer")
    countdown = offer.get_by_role("timer")
    await expect(countdown).to_contain_text(re.compile(r"\d"))
    before = await countdown.inner_text()
    await expect(countdown).not_to_have_text(before, timeout=3_000)  # it ticks
    await stack.customer_writes(
        customer, "foto da etiqueta", profile=profile, media=[("image/png", tiny_png())]
    )
    await accept_offer(page, customer)
    conversation = await stack.conversation_of(customer)
    conversation_id = str(conversation["id"])
    await reaches(stack, conversation_id, "active")

    # The thread: the customer's text and image (through the authorized media endpoint).
    await expect(thread_item(page, "Olá, meu pedido não chegou")).to_be_visible()
    await page.wait_for_function(
        r"""() => [...document.images].some(
            (img) => /\/api\/conversations\/[^/]+\/messages\/[^/]+\/media\/\d+$/.test(img.src)
                && img.complete && img.naturalWidth > 0)""",
        timeout=STEP_TIMEOUT_MS,
    )
    await shots(page, "conversation with text and image")

    # A reply sent with Enter; its status, as text, reaches read.
    reply = "Olá Maria, já vou verificar."
    await message_box(page).fill(reply)
    await message_box(page).press("Enter")
    sent = thread_item(page, reply)
    await expect(sent).to_be_visible()
    await expect(message_box(page)).to_have_value("")
    # The status is text in a live region (role=status) of the message, for assistive tech.
    await expect(sent.get_by_role("status")).to_have_text(re.compile(r"\bread\b", re.I))
    status = await stack.db.fetchval(
        "SELECT status FROM messages WHERE conversation_id = $1 AND body = $2",
        conversation_id,
        reply,
    )
    assert status == "read"
    await shots(page, "reply read")

    # The window closes: free text is refused with the reason; a template goes out.
    await stack.close_window(conversation_id)
    await page.reload()
    await expect(page.get_by_role("combobox", name="Presence")).to_be_visible()
    await open_conversation(page, customer)
    await expect(message_box(page)).to_be_disabled()
    reason = page.get_by_text(re.compile(r"window closed", re.IGNORECASE))
    await expect(reason.first).to_be_visible()
    template = page.get_by_role("combobox", name="Template")
    labels = [
        (await option.inner_text()).strip() for option in await template.locator("option").all()
    ]
    picked = [label for label in labels if re.match(rf"{TEMPLATE}\b", label)]
    assert picked, f"{TEMPLATE} is not among the templates offered: {labels}"
    await template.select_option(label=picked[0])
    for number, value in (("1", "Maria"), ("2", "A-17")):  # the template's {{1}} and {{2}}
        await template_variable(page, number).fill(value)
    await shots(page, "window closed, template picked")
    await page.get_by_role("button", name="Send template").click()
    await expect(thread_item(page, "Olá Maria, seu pedido A-17 saiu.")).to_be_visible()
    kind = await stack.db.fetchval(
        "SELECT kind FROM messages WHERE conversation_id = $1 AND body = $2",
        conversation_id,
        "Olá Maria, seu pedido A-17 saiu.",
    )
    assert kind == "template"
    await shots(page, "template sent")

    # Transfer to another queue: the conversation leaves the agent and waits there.
    await page.get_by_role("button", name="Transfer").click()
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_be_visible()
    await dialog.get_by_role("radio", name="Queue").check()
    await dialog.get_by_role("combobox", name="Queue").select_option(stack.other_queue)
    await shots(page, "transfer dialog")
    await dialog.get_by_role("button", name="Confirm transfer").click()
    await reaches(stack, conversation_id, "queued", "offered")
    moved = await stack.conversation_of(customer)
    assert moved["queue"] == stack.other_queue
    assert str(moved["agent_id"] or "") in ("", other_agent_id)
    await expect(page.get_by_text(re.compile(r"transferred", re.I)).first).to_be_visible()
    await expect(page.get_by_role("button", name="Transfer")).to_be_disabled()
    listed = page.get_by_role("button", name=re.compile(re.escape(customer)))
    await expect(listed).to_have_count(0)  # no longer among the agent's conversations
    await shots(page, "transferred")

    # A new conversation, ended: wrap-up with its timer.
    second, second_profile = new_customer(), "João Pereira"
    await stack.customer_writes(second, "Quero cancelar a assinatura", profile=second_profile)
    await accept_offer(page, second)
    second_id = str((await stack.conversation_of(second))["id"])
    await reaches(stack, second_id, "active")
    await expect(thread_item(page, "Quero cancelar a assinatura")).to_be_visible()
    await page.get_by_role("button", name="End conversation").click()
    await reaches(stack, second_id, "wrap-up", "wrap_up")
    await expect(page.get_by_text(re.compile(r"wrap.?up", re.IGNORECASE)).first).to_be_visible()
    wrap_up_timer = page.get_by_role("region", name="Conversation").get_by_role("timer")
    await expect(wrap_up_timer).to_contain_text(re.compile(r"\d"))
    await shots(page, "wrap-up")
    assert not watched.errors, watched.errors


# --- the session, the keyboard, a phone's width, a dropped stream -------------------------


async def test_the_token_never_reaches_a_url_and_sign_out_ends_the_session(
    page: Page, stack: Stack, shots: Shots, watched: Watched
) -> None:
    _, token = await stack.new_agent("Carla Dias")
    await sign_in(page, stack, token)
    await shots(page, "signed in")
    assert token not in page.url
    assert all(token not in request.url for request in watched.requests)
    stored: str = await page.evaluate(
        "() => JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})"
        " + document.cookie"
    )
    assert token not in stored
    assert "omniroute_session" not in stored  # HttpOnly: the page's script cannot read it

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("Agent token")).to_be_visible()
    await expect(page.get_by_label("Agent token")).to_have_value("")
    await shots(page, "signed out")
    status: int = await page.evaluate(
        "async () => (await fetch('/api/session', {credentials: 'same-origin'})).status"
    )
    assert status == 401
    await page.reload()
    await expect(page.get_by_label("Agent token")).to_be_visible()
    await expect(page.get_by_role("combobox", name="Presence")).to_have_count(0)
    assert all(token not in request.url for request in watched.requests)


async def _active_conversation(page: Page, stack: Stack, profile: str) -> str:
    agent_id, token = await stack.new_agent(f"agent {profile}")
    await sign_in(page, stack, token)
    await go_available(page, stack, agent_id)
    customer = new_customer()
    await stack.customer_writes(customer, "Oi, tudo bem?", profile=profile)
    await accept_offer(page, customer)
    conversation_id = str((await stack.conversation_of(customer))["id"])
    await reaches(stack, conversation_id, "active")
    await expect(message_box(page)).to_be_editable()
    return conversation_id


async def test_shift_enter_adds_a_line_and_the_page_fits_a_phone(
    page: Page, stack: Stack, shots: Shots
) -> None:
    await page.set_viewport_size({"width": 360, "height": 740})
    conversation_id = await _active_conversation(page, stack, "Paula Nunes")

    box = message_box(page)
    await box.fill("primeira linha")
    await box.press("Shift+Enter")
    await box.press_sequentially("segunda linha")
    await expect(box).to_have_value("primeira linha\nsegunda linha")
    outbound = await stack.db.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1 AND direction = 'outbound'",
        conversation_id,
    )
    assert outbound == 0  # Shift+Enter did not send
    await shots(page, "two lines at 360 px")
    await page.get_by_role("button", name="Send").click()
    await expect(thread_item(page, "segunda linha")).to_be_visible()
    body = await stack.db.fetchval(
        "SELECT body FROM messages WHERE conversation_id = $1 AND direction = 'outbound'",
        conversation_id,
    )
    assert body == "primeira linha\nsegunda linha"
    overflow: int = await page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px at 360 px"
    for control in (
        message_box(page),
        page.get_by_role("button", name="Send"),
        page.get_by_role("button", name="Transfer"),
        page.get_by_role("button", name="End conversation"),
    ):
        await expect(control).to_be_visible()
        box_of = await control.bounding_box()
        assert box_of is not None and box_of["x"] >= 0 and box_of["x"] + box_of["width"] <= 360
    await shots(page, "sent at 360 px")


async def test_an_event_missed_while_the_stream_was_down_is_shown_after_it_resumes(
    page: Page, stack: Stack, shots: Shots, watched: Watched
) -> None:
    conversation_id = await _active_conversation(page, stack, "Rita Alves")  # events carried
    rita = str(
        await stack.db.fetchval("SELECT customer FROM conversations WHERE id = $1", conversation_id)
    )
    streams = [r for r in watched.requests if r.url.endswith("/api/me/events")]
    assert streams, "the page never opened its event stream"
    before = len(streams)

    await stack.proxy.cut()  # the connection drops; nothing reaches the router meanwhile
    missed = new_customer()
    await stack.customer_writes_directly(missed, "Vocês estão aí?", profile="Sofia Ramos")

    async def offered() -> Any:
        return await stack.db.fetchval(
            "SELECT o.id FROM offers o JOIN conversations c ON c.id = o.conversation_id"
            " WHERE c.customer = $1",
            missed,
        )

    await wait_for(offered, timeout=STEP_TIMEOUT_MS / 1000)  # it happened while we were away
    # The open conversation's customer writes too: message.received is published by the
    # webhook path, not through the outbox, so the page must reload the thread on return.
    await stack.customer_writes_directly(rita, "Ainda esperando", profile="Rita Alves")
    await shots(page, "stream down")
    clock = Stopwatch()
    await stack.proxy.start()
    await expect(offer_of(page, missed)).to_be_visible(timeout=20_000)
    seconds = clock.seconds()
    print(f"\n[measure] missed offer shown {seconds * 1000:.0f} ms after the link came back")
    await expect(
        page.get_by_role("log", name="Messages").get_by_text("Ainda esperando")
    ).to_be_visible(timeout=STEP_TIMEOUT_MS)
    await shots(page, "missed offer shown after reconnect")

    reconnects = [r for r in watched.requests if r.url.endswith("/api/me/events")][before:]
    assert reconnects, "the page did not reconnect its event stream"
    headers = [await r.all_headers() for r in reconnects]
    assert any(h.get("last-event-id") for h in headers), (
        f"the reconnect did not resume with Last-Event-ID: {headers}"
    )
