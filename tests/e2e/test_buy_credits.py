"""Buying credits in Chromium against the running app, which has no Stripe key: the
simulated checkout posts a signed event to the real webhook, and the whole fulfilment path
runs. Each test signs in a new user, so the balances seen are theirs alone."""

from __future__ import annotations

import re
import uuid

import httpx
from playwright.sync_api import Page, expect

from aicredits.services import auth, users
from aicredits.services.purchases import list_purchases
from aicredits.services.verify import verify_ledger
from aicredits.state.credits import CreditsState
from tests.e2e.conftest import TRIAL_CREDITS, RunningApp, sign_in
from tests.e2e.raw_events import changed, redirects, send_event

STARTER_CREDITS = 5_000


def new_buyer(app: RunningApp) -> str:
    """A user the Dev sign-in provider knows, with a verified email."""
    email = f"buyer-{uuid.uuid4().hex[:8]}@example.test"
    response = httpx.put(
        f"{app.idp}/users/{email}",
        json={"email": email, "email_verified": True, "name": "Bea Buyer"},
    )
    assert response.status_code == 204
    return email


def test_buying_a_pack_adds_exactly_its_credits_and_shows_it_in_the_history(
    app: RunningApp, page: Page
) -> None:
    email = new_buyer(app)
    sign_in(page, app, email, start="/credits")
    expect(page.locator("#simulated-checkout-notice")).to_be_visible()
    expect(page.locator("#purchase-history-empty")).to_be_visible()
    expect(page.locator("#pack-offer-starter")).to_have_text("5.00 USD — 5,000 credits")
    balance = page.locator("#header-balance")
    expect(balance).to_have_text(f"{TRIAL_CREDITS:,} credits")

    page.locator("#buy-starter").click()
    page.wait_for_url(re.compile(r"/checkout/simulated/cs_test_sim_\w+$"))
    expect(page.locator("#simulated-banner")).to_have_text("SIMULATED CHECKOUT — no real payment")
    expect(page.locator("#simulated-price")).to_have_text("5.00 USD")
    page.locator("#simulated-pay").click()

    page.wait_for_url(re.compile(r"/credits/success\?session_id=cs_test_sim_\w+$"))
    expect(page.locator("#checkout-credited")).to_have_text(
        "Payment received, 5,000 credits added."
    )
    expect(balance).to_have_text(f"{TRIAL_CREDITS + STARTER_CREDITS:,} credits")
    page.reload()  # the success page again: nothing more is added
    expect(page.locator("#checkout-credited")).to_be_visible()
    expect(balance).to_have_text(f"{TRIAL_CREDITS + STARTER_CREDITS:,} credits")

    page.locator("#back-to-credits").click()
    page.wait_for_url(app.frontend + "/credits")
    history = page.locator("#purchase-history")
    expect(history.locator("tbody tr")).to_have_count(1)
    row = history.locator("tbody tr").first
    for text in ("Starter", "5.00 USD", "5,000", "Paid"):
        expect(row).to_contain_text(text)
    expect(page.locator("#credits-available")).to_have_text(f"{TRIAL_CREDITS + STARTER_CREDITS:,}")

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


def test_cancelling_the_checkout_charges_nothing(app: RunningApp, page: Page) -> None:
    email = new_buyer(app)
    sign_in(page, app, email, start="/credits")
    page.locator("#buy-starter").click()
    page.wait_for_url(re.compile(r"/checkout/simulated/cs_test_sim_\w+$"))
    page.locator("#simulated-cancel").click()

    page.wait_for_url(app.frontend + "/credits/cancel")
    expect(page.locator("#checkout-cancelled")).to_have_text(
        "Checkout cancelled, nothing was charged."
    )
    expect(page.locator("#header-balance")).to_have_text(f"{TRIAL_CREDITS:,} credits")
    page.locator("#back-to-credits").click()
    page.wait_for_url(app.frontend + "/credits")
    expect(page.locator("#purchase-history-empty")).to_be_visible()
    expect(page.locator("#header-balance")).to_have_text(f"{TRIAL_CREDITS:,} credits")


def test_crafted_credits_events_give_nothing_without_a_session(app: RunningApp) -> None:
    for handler in ("load", "confirm"):
        updates = send_event(app, f"{CreditsState.get_full_name()}.{handler}", path="/credits")
        assert [r.split("?")[0] for r in redirects(updates)] == ["/login"], handler
        assert changed(updates, "packs") == []
        assert changed(updates, "outcome") == []


def test_the_credits_handler_does_answer_a_signed_in_user(app: RunningApp) -> None:
    # The control for the test above.
    db = app.db()
    try:
        uid = users.create_user(db, email=f"c-{uuid.uuid4().hex[:8]}@example.test").id
        token = auth.create_session(db, user_id=uid, days=1)
    finally:
        db.dispose()
    updates = send_event(
        app,
        f"{CreditsState.get_full_name()}.load",
        path="/credits",
        cookie=f"aicredits_session={token}",
    )
    assert redirects(updates) == []
    assert [p["id"] for p in changed(updates, "packs")[0]] == ["starter", "plus"]
