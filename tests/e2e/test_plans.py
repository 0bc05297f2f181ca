"""A monthly plan in Chromium against the running app, which has no Stripe key: the
simulated subscription checkout and portal post signed events to the real webhook. Subscribe,
chat, see the plan's usage, "Simulate next month", see the allowance reset."""

from __future__ import annotations

import re
import uuid

import httpx
from playwright.sync_api import Page, expect

from aicredits.services import ledger, users
from aicredits.services.verify import verify_ledger
from tests.e2e.conftest import TRIAL_CREDITS, RunningApp, sign_in

TEAM = 25_000


def new_subscriber(app: RunningApp) -> str:
    email = f"plan-{uuid.uuid4().hex[:8]}@example.test"
    response = httpx.put(
        f"{app.idp}/users/{email}",
        json={"email": email, "email_verified": True, "name": "Pat Plan"},
    )
    assert response.status_code == 204
    return email


def used_credits(page: Page) -> int:
    text = page.locator("#plan-usage").inner_text()
    match = re.match(r"([\d,]+) of 25,000 included credits used", text)
    assert match, text
    return int(match.group(1).replace(",", ""))


def test_subscribe_chat_see_the_usage_and_the_reset_next_month(app: RunningApp, page: Page) -> None:
    httpx.post(f"{app.upstream}/_fake/reset").raise_for_status()
    email = new_subscriber(app)
    sign_in(page, app, email, start="/credits")
    expect(page.locator("#simulated-billing-notice")).to_be_visible()
    expect(page.locator("#plan-offer-team")).to_have_text(
        "20.00 USD a month — 25,000 credits a month"
    )
    expect(page.locator("#invoice-list-empty")).to_be_visible()

    page.locator("#subscribe-team").click()
    page.wait_for_url(re.compile(r"/billing/simulated/subscribe/team$"))
    expect(page.locator("#simulated-banner")).to_contain_text("SIMULATED BILLING")
    page.locator("#simulated-subscribe").click()
    page.wait_for_url(app.frontend + "/credits")
    expect(page.locator("#plan-name")).to_have_text("Team plan")
    expect(page.locator("#plan-status")).to_have_text("Active")
    expect(page.locator("#plan-usage")).to_have_text(
        "0 of 25,000 included credits used, 25,000 left"
    )
    first_reset = page.locator("#plan-reset-date").inner_text()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", first_reset)
    expect(page.locator("#invoice-list tbody tr")).to_have_count(1)

    # The trial grant ends a few seconds before the plan's month, so it would be spent first
    # (soonest-expiring first): an operator's adjustment uses it up, so the chat spends the plan.
    db = app.db()
    try:
        uid = users.find_user_by_email(db, email=email).id
        ledger.adjust(
            db,
            user_id=uid,
            credits=-TRIAL_CREDITS,
            key=f"e2e:{uid}",
            actor="e2e",
            reason="trial used",
        )
    finally:
        db.dispose()
    page.goto(app.frontend + "/chat")
    page.locator("#chat-input").fill("How many credits does this cost?")
    page.locator("#chat-input").press("Enter")
    expect(page.locator(".reply-cost")).to_have_count(1)

    page.goto(app.frontend + "/credits")
    expect(page.locator("#plan-usage")).not_to_have_text(re.compile(r"^0 of"))
    assert used_credits(page) > 0

    page.locator("#manage-billing").click()
    page.wait_for_url(re.compile(r"/billing/simulated/portal$"))
    expect(page.locator("#simulated-banner")).to_contain_text("SIMULATED BILLING")
    expect(page.locator("#simulated-plan")).to_have_text("Team")
    page.locator("#simulate-next-month").click()
    page.wait_for_url(app.frontend + "/credits")
    expect(page.locator("#plan-usage")).to_have_text(
        "0 of 25,000 included credits used, 25,000 left"
    )
    expect(page.locator("#invoice-list tbody tr")).to_have_count(2)

    db = app.db()
    try:
        assert verify_ledger(db) == []
    finally:
        db.dispose()
