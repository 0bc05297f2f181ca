"""Auto top-up in Chromium against the running app, which has no Stripe key: save the
simulated card, turn auto top-up on, chat below the threshold, and see the job buy the pack:
the balance goes up and the purchase is listed."""

from __future__ import annotations

import re
import time
import uuid

import httpx
from playwright.sync_api import Page, expect

from aicredits.services import ledger, users
from aicredits.services.purchases import list_purchases
from aicredits.services.verify import verify_ledger
from tests.e2e.conftest import TRIAL_CREDITS, RunningApp, sign_in

STARTER_CREDITS = 5_000
# How long the job (every AUTO_TOPUP_INTERVAL_SECONDS, 5 s) may take to notice and buy.
TOP_UP_WAIT_SECONDS = 30


def new_user(app: RunningApp) -> str:
    email = f"topup-{uuid.uuid4().hex[:8]}@example.test"
    response = httpx.put(
        f"{app.idp}/users/{email}",
        json={"email": email, "email_verified": True, "name": "Otto Topup"},
    )
    assert response.status_code == 204
    return email


def turn_on_with_the_simulated_card(page: Page) -> None:
    """Save the simulated card; below the whole trial, buy the starter pack."""
    expect(page.locator("#auto-topup")).to_be_visible()
    page.locator("#add-card").click()
    expect(page.locator("#saved-card")).to_contain_text("4242")
    page.locator("#topup-threshold").fill(str(TRIAL_CREDITS))  # any spend goes below
    page.locator("#topup-enabled").click()
    page.locator("#topup-save").click()
    expect(page.locator("#topup-saved")).to_have_text("Auto top-up settings saved.")
    expect(page.locator("#topup-error")).to_have_count(0)


def chat_once(page: Page, app: RunningApp) -> int:
    """One chat turn; returns what it cost."""
    page.goto(app.frontend + "/chat")
    page.locator("#chat-input").fill("Spend a little")
    page.locator("#chat-input").press("Enter")
    cost = page.locator(".reply-cost").last
    expect(cost).to_contain_text("credit")
    match = re.search(r"· ([\d,]+) credits?$", cost.inner_text())
    assert match, cost.inner_text()
    return int(match.group(1).replace(",", ""))


def test_auto_top_up_buys_the_pack_when_a_chat_takes_credits_below_the_threshold(
    app: RunningApp, page: Page
) -> None:
    httpx.post(f"{app.upstream}/_fake/reset").raise_for_status()
    email = new_user(app)
    sign_in(page, app, email, start="/credits")
    turn_on_with_the_simulated_card(page)
    spent = chat_once(page, app)
    assert spent > 0

    page.goto(app.frontend + "/credits")
    expected = TRIAL_CREDITS - spent + STARTER_CREDITS
    deadline = time.monotonic() + TOP_UP_WAIT_SECONDS
    while page.locator("#credits-available").inner_text() != f"{expected:,}":
        assert time.monotonic() < deadline, "the auto top-up did not arrive"
        time.sleep(1)
        page.reload()
    expect(page.locator("#header-balance")).to_have_text(f"{expected:,} credits")
    purchase = page.locator("#purchase-history tbody tr")
    expect(purchase).to_have_count(1)
    for text in ("Starter (auto top-up)", "5.00 USD", "5,000", "Paid"):
        expect(purchase.first).to_contain_text(text)
    expect(page.locator("#topup-history tbody tr").first).to_contain_text("Paid")

    db = app.db()
    try:
        uid = users.find_user_by_email(db, email=email).id
        bought = list_purchases(db, user_id=uid)
        assert [(p.status, p.credits_granted, p.simulated) for p in bought] == [
            ("paid", STARTER_CREDITS, True)
        ]
        assert verify_ledger(db) == []
    finally:
        db.dispose()


def test_a_top_up_that_needs_authentication_is_explained_on_every_page(
    app: RunningApp, page: Page
) -> None:
    httpx.post(f"{app.upstream}/_fake/reset").raise_for_status()
    sign_in(page, app, new_user(app), start="/credits")
    turn_on_with_the_simulated_card(page)
    # The development-only switch: the simulated card's next charge needs authentication.
    page.locator("#simulate-next").click()
    page.get_by_role("option", name="needs authentication").click()
    expect(page.locator("#simulate-next")).to_contain_text("needs authentication")
    chat_once(page, app)

    notice = page.locator("#topup-notice")
    deadline = time.monotonic() + TOP_UP_WAIT_SECONDS
    while not notice.is_visible():
        assert time.monotonic() < deadline, "no banner about the failed top-up"
        time.sleep(1)
        page.reload()
        # Reflex renders after its on_load: only then is a missing banner really missing.
        expect(page.locator("#page-ready")).to_be_attached(timeout=30_000)
    expect(notice).to_contain_text("confirm it")
    expect(page.locator("#topup-finish-paying")).to_be_visible()
    page.goto(app.frontend + "/credits")
    expect(page.locator("#topup-history tbody tr").first).to_contain_text("Needs authentication")
    expect(page.locator("#purchase-history tbody tr").first).to_contain_text("Failed")
    # Stripe's page (here the simulated checkout) sells the pack on-session.
    page.locator("#topup-finish-paying").click()
    page.wait_for_url(re.compile(r"/checkout/simulated/cs_test_sim_\w+$"))
    page.go_back()
    page.locator("#topup-notice-dismiss").click()
    expect(notice).to_have_count(0)


def test_auto_top_up_turned_off_and_saved_stays_off(app: RunningApp, page: Page) -> None:
    """The form suggests a threshold a new user can save as it is; a blank one is refused
    by name; the switch is submitted by its name: on is saved as on, and off as off."""
    email = new_user(app)
    sign_in(page, app, email, start="/credits")
    expect(page.locator("#topup-threshold")).to_have_value("1000")  # a fifth of Starter
    turn_on_with_the_simulated_card(page)
    page.locator("#topup-threshold").fill("")
    page.locator("#topup-save").click()
    expect(page.locator("#topup-error")).to_have_text(
        "The threshold must be a whole number of credits, such as 1000."
    )
    expect(page.locator("#topup-saved")).to_have_count(0)
    page.reload()
    switch = page.locator("#topup-enabled")
    expect(switch).to_have_attribute("aria-checked", "true")
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "false")
    # The balance changes behind the page (an operator's adjustment). Saving refreshes the
    # header; the dashboard's three figures come from one read, so they still add up.
    db = app.db()
    try:
        uid = users.find_user_by_email(db, email=email).id
        ledger.adjust(db, user_id=uid, credits=250, key=f"e2e:{uid}", actor="e2e", reason="t")
    finally:
        db.dispose()
    page.locator("#topup-save").click()
    expect(page.locator("#topup-saved")).to_have_text("Auto top-up settings saved.")
    expect(page.locator("#header-balance")).to_have_text(f"{TRIAL_CREDITS + 250:,} credits")
    available, held, total = (
        int(page.locator(f"#credits-{k}").inner_text().replace(",", ""))
        for k in ("available", "held", "total")
    )
    assert available + held == total, (available, held, total)
    page.reload()
    expect(page.locator("#topup-enabled")).to_have_attribute("aria-checked", "false")
    expect(page.locator("#credits-available")).to_have_text(f"{TRIAL_CREDITS + 250:,}")
    expect(page.locator("#credits-total")).to_have_text(f"{TRIAL_CREDITS + 250:,}")
