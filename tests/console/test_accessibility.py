"""The console passes axe-core with no serious or critical violation: the signed-in agent
workspace, the conversation view and the supervisor's page, each as a user would have it.

axe-core is vendored (tests/console/vendor/axe.min.js, 4.14.1, MPL-2.0: its LICENSE sits
next to it), never fetched. The pages' Content-Security-Policy forbids inline scripts, so the
context bypasses it (``bypass_csp``, https://playwright.dev/python/docs/api/
class-browser#browser-new-context) to inject axe; ``axe.run`` resolves with the violations,
each with its impact (https://github.com/dequelabs/axe-core/blob/develop/doc/API.md#results-object).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from tests.console.conftest import STEP_TIMEOUT_MS, Shots, Stack
from tests.console.steps import (
    accept_offer,
    go_available,
    message_box,
    offer_of,
    reaches,
    sign_in,
    sign_in_supervisor,
)
from tests.support import new_customer

AXE = Path(__file__).parent / "vendor" / "axe.min.js"
BLOCKING = {"serious", "critical"}

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A page whose CSP does not stop the injected axe script."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860}, bypass_csp=True)
    context.set_default_timeout(STEP_TIMEOUT_MS)
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def blocking_violations(page: Page) -> list[dict[str, Any]]:
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.add_script_tag(path=str(AXE))
    results: dict[str, Any] = await page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations']})"
    )
    return [v for v in results["violations"] if v.get("impact") in BLOCKING]


def describe(violations: list[dict[str, Any]]) -> str:
    lines = []
    for violation in violations:
        lines.append(f"{violation['impact']}: {violation['id']}: {violation['help']}")
        for node in violation["nodes"][:5]:
            lines.append(f"    {json.dumps(node['target'])}: {node['html'][:160]}")
    return "\n".join(lines)


async def assert_accessible(page: Page, what: str) -> None:
    violations = await blocking_violations(page)
    if violations:
        print(f"\naxe on {what}:\n{describe(violations)}")
    assert not violations, f"axe on {what}:\n{describe(violations)}"


async def test_the_agent_workspace_and_the_conversation_view(
    page: Page, stack: Stack, shots: Shots
) -> None:
    await page.goto(f"{stack.url}/console")
    await expect(page.get_by_label("Agent token")).to_be_visible()
    await assert_accessible(page, "the sign-in form")

    agent_id, token = await stack.new_agent("Ana Lima")
    await sign_in(page, stack, token)
    await go_available(page, stack, agent_id)
    customer = new_customer()
    await stack.customer_writes(customer, "Olá, preciso de ajuda", profile="Maria Souza")
    # This customer's offer (an event another module left may offer the agent more work).
    await expect(offer_of(page, customer)).to_be_visible()
    await shots(page, "workspace with an offer")
    await assert_accessible(page, "the signed-in workspace with an offer")

    await accept_offer(page, customer)
    await reaches(stack, str((await stack.conversation_of(customer))["id"]), "active")
    await expect(page.get_by_text("Olá, preciso de ajuda")).to_be_visible()
    await expect(message_box(page)).to_be_editable()
    await shots(page, "conversation view")
    await assert_accessible(page, "the conversation view")


async def test_the_supervisor_view(page: Page, stack: Stack, shots: Shots) -> None:
    await page.goto(f"{stack.url}/console/supervisor")
    await expect(page.get_by_label("Admin token")).to_be_visible()
    await assert_accessible(page, "the supervisor's sign-in form")
    await stack.customer_writes(new_customer(), "Alguém aí?", profile="Bia Costa")
    await sign_in_supervisor(page, stack)
    await expect(page.get_by_role("row").filter(has_text=stack.main_queue).first).to_be_visible()
    await shots(page, "supervisor view")
    await assert_accessible(page, "the supervisor view")
