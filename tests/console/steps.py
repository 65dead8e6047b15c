"""The agent's and the supervisor's steps in the console, shared by the browser tests: each
named control found by role and accessible name."""

from __future__ import annotations

import re

from playwright.async_api import Locator, Page, expect

from tests.console.conftest import STEP_TIMEOUT_MS, Stack
from tests.support import wait_for


async def sign_in(page: Page, stack: Stack, token: str) -> None:
    await page.goto(f"{stack.url}/console")
    await page.get_by_label("Agent token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("combobox", name="Presence")).to_be_visible()


async def go_available(page: Page, stack: Stack, agent_id: str) -> None:
    await page.get_by_role("combobox", name="Presence").select_option("available")

    async def available() -> bool:
        presence = await stack.db.fetchval("SELECT presence FROM agents WHERE id = $1", agent_id)
        return bool(presence == "available")

    await wait_for(available, timeout=STEP_TIMEOUT_MS / 1000)


def offer_of(page: Page, who: str) -> Locator:
    """The offer naming ``who`` (the customer's name or number): a list item with Accept."""
    accept = page.get_by_role("button", name="Accept")
    return page.get_by_role("listitem").filter(has_text=who).filter(has=accept)


async def accept_offer(page: Page, who: str) -> None:
    offer = offer_of(page, who)
    await expect(offer).to_be_visible()
    await offer.get_by_role("button", name="Accept").click()


async def state_of(stack: Stack, conversation_id: str) -> str:
    state: str = await stack.db.fetchval(
        "SELECT state FROM conversations WHERE id = $1", conversation_id
    )
    return state


async def reaches(stack: Stack, conversation_id: str, *states: str) -> None:
    async def there() -> bool:
        return await state_of(stack, conversation_id) in states

    await wait_for(there, timeout=STEP_TIMEOUT_MS / 1000)


def message_box(page: Page) -> Locator:
    return page.get_by_role("textbox", name="Message")


def thread(page: Page) -> Locator:
    """The conversation's messages (a log region named Messages)."""
    return page.get_by_role("log", name="Messages")


def thread_item(page: Page, text: str) -> Locator:
    """The thread's entry that holds one message's text (and its status)."""
    return thread(page).get_by_role("listitem").filter(has_text=text).last


def template_variable(page: Page, number: str) -> Locator:
    """The input of the template's variable ``{{number}}``, by its label."""
    return page.get_by_role("textbox", name=re.compile(rf"^\W*{number}\W*$|\{{\{{{number}\}}\}}"))


async def open_conversation(page: Page, who: str) -> None:
    """Select the conversation with ``who`` in the agent's list."""
    entry = page.get_by_role("button", name=re.compile(re.escape(who))).or_(
        page.get_by_role("link", name=re.compile(re.escape(who)))
    )
    await entry.first.click()


async def sign_in_supervisor(page: Page, stack: Stack, name: str = "Sandra Supervisor") -> None:
    """Sign in on the supervisor's page with the admin token (and a name for the audit)."""
    await page.goto(f"{stack.url}/console/supervisor")
    await page.get_by_label("Admin token").fill(stack.admin_token)
    name_box = page.get_by_label("Your name")
    if await name_box.count():
        await name_box.fill(name)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("columnheader", name="Queue").first).to_be_visible()
