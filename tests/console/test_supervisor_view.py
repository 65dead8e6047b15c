"""The supervisor's page (``/console/supervisor``) in a real headless chromium against the
whole stack: signed in with the admin token, the queue table shows the waiting count rise as
customers write with nobody available and fall as an agent takes them, and a supervisor
action taken on the page (closing a waiting conversation) reaches the system.

The table is found by its column headers' accessible names (Queue, Waiting, Longest wait,
Available agents) and each cell by the column it sits under, as a screen reader reads it.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.async_api import Locator, Page, expect

from tests.console.conftest import STEP_TIMEOUT_MS, Shots, Stack
from tests.console.steps import reaches, sign_in_supervisor
from tests.support import new_customer, tap, wait_for

COLUMNS = ("Queue", "Waiting", "Longest wait", "Available agents")

pytestmark = pytest.mark.timeout(150)


def queue_table(page: Page) -> Locator:
    table = page.get_by_role("table")
    for column in COLUMNS:
        table = table.filter(has=page.get_by_role("columnheader", name=column, exact=True))
    return table.first


async def cell(page: Page, queue: str, column: str) -> Locator:
    """The cell of ``queue``'s row under ``column``."""
    table = queue_table(page)
    headers = [
        (await header.inner_text()).strip()
        for header in await table.get_by_role("columnheader").all()
    ]
    assert column in headers, f"no column {column!r} in {headers}"
    row = table.get_by_role("row").filter(
        has=page.get_by_role("rowheader", name=queue, exact=True).or_(
            page.get_by_role("cell", name=queue, exact=True)
        )
    )
    cells = row.get_by_role("rowheader").or_(row.get_by_role("cell"))
    return cells.nth(headers.index(column))


async def waiting_shows(page: Page, queue: str, count: int) -> None:
    await expect(await cell(page, queue, "Waiting")).to_have_text(
        re.compile(rf"^\s*{count}\s*$"), timeout=STEP_TIMEOUT_MS
    )


async def agent_takes_all(stack: Stack, token: str, count: int) -> None:
    """An agent (through the API, as another person's console would) goes available and
    accepts each offer until it holds ``count`` conversations."""
    auth = {"Authorization": f"Bearer {token}"}
    async with stack.http.put(
        f"{stack.direct_url}/api/me/presence", json={"presence": "available"}, headers=auth
    ) as response:
        assert response.status == 200, await response.text()
    accepted: set[str] = set()

    async def all_taken() -> bool:
        async with stack.http.get(f"{stack.direct_url}/api/me/offers", headers=auth) as r:
            offers: list[dict[str, Any]] = await r.json()
        for offer in offers:
            if offer["id"] in accepted:
                continue
            async with stack.http.post(
                f"{stack.direct_url}/api/offers/{offer['id']}/accept", headers=auth
            ) as r:
                if r.status == 200:
                    accepted.add(offer["id"])
        return len(accepted) >= count

    await wait_for(all_taken, timeout=20, interval=0.2)


async def test_the_queue_count_rises_and_falls_live(page: Page, stack: Stack, shots: Shots) -> None:
    await page.goto(f"{stack.url}/console/supervisor")
    await expect(page.get_by_label("Admin token")).to_be_visible()
    await shots(page, "sign-in form")
    await sign_in_supervisor(page, stack)
    table = queue_table(page)
    await expect(table).to_be_visible()
    for column in COLUMNS:
        await expect(table.get_by_role("columnheader", name=column, exact=True)).to_be_visible()
    await waiting_shows(page, stack.main_queue, 0)
    await shots(page, "signed in, nobody waiting")

    # Three customers write and nobody is available: the count rises.
    customers = [new_customer() for _ in range(3)]
    for number, customer in enumerate(customers):
        await stack.customer_writes(customer, f"Preciso de ajuda ({number})", profile="Cliente")
    await waiting_shows(page, stack.main_queue, 3)
    await expect(await cell(page, stack.main_queue, "Available agents")).to_have_text(
        re.compile(r"^\s*0\s*$")
    )
    await expect(await cell(page, stack.main_queue, "Longest wait")).to_have_text(re.compile(r"\d"))
    await shots(page, "three waiting")

    # An agent with room for two takes two of them: the count falls to one.
    _, token = await stack.new_agent("Ana Lima", capacity=2)
    await agent_takes_all(stack, token, 2)
    await waiting_shows(page, stack.main_queue, 1)
    await shots(page, "one waiting")

    # The supervisor closes the one still waiting, from the page.
    waiting = [
        row["id"]
        for row in await stack.db.fetch(
            "SELECT id FROM conversations WHERE customer = ANY($1::text[])"
            " AND state IN ('queued', 'offered')",
            customers,
        )
    ]
    assert len(waiting) == 1, waiting
    left = await stack.db.fetchval("SELECT customer FROM conversations WHERE id = $1", waiting[0])
    entry = (
        page.get_by_role("row")
        .filter(has_text=left)
        .or_(page.get_by_role("listitem").filter(has_text=left))
    )
    await expect(entry.first).to_be_visible()
    page.once("dialog", lambda dialog: dialog.accept())  # a confirm(), if the page asks
    async with tap(stack.amqp_url, "supervisor.acted") as audit:
        await entry.first.get_by_role("button", name="Close").click()
        confirm = page.get_by_role("dialog").get_by_role("button", name=re.compile("^Close"))
        if await confirm.count():
            await confirm.first.click()
        acted = await audit.next(
            timeout=STEP_TIMEOUT_MS / 1000,
            where=lambda event: event.get("conversation_id") == str(waiting[0]),
        )
    assert acted["data"]["action"] == "close"
    assert acted["data"]["actor"] == "Sandra Supervisor"  # the session's name
    await reaches(stack, str(waiting[0]), "closed")
    await waiting_shows(page, stack.main_queue, 0)
    await shots(page, "closed by the supervisor")
