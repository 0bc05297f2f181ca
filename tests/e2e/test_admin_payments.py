"""The admin console's Payments page in Chromium: a correctly signed event for a Checkout
Session the app never created credits nothing and shows up as an unmatched payment; the admin
runs reconciliation now and sees its report, then clears the payment with a note, which the
audit log keeps."""

from __future__ import annotations

import json
import time
import uuid

import httpx
from playwright.sync_api import Page, expect

from aicredits.adapters import stripe_api
from aicredits.services.stripe_config import DEV_WEBHOOK_SECRET_PATH, WEBHOOK_PATH
from tests.e2e.conftest import ROOT, RunningApp, sign_in

ADMIN = "admin@example.test"


def deliver_foreign_payment(app: RunningApp, session_id: str) -> dict[str, object]:
    """A signed `checkout.session.completed` as Stripe would send it for a session made on
    the account some other way, with metadata asking for a million credits."""
    session = {
        "id": session_id,
        "object": "checkout.session",
        "amount_total": 500,
        "currency": "usd",
        "client_reference_id": "1",
        "metadata": {"user_id": "1", "pack_id": "starter", "credits": "1000000"},
        "mode": "payment",
        "payment_intent": f"pi_{session_id}",
        "payment_status": "paid",
        "status": "complete",
    }
    body = json.dumps(
        {
            "id": f"evt_e2e_{uuid.uuid4().hex}",
            "object": "event",
            "type": "checkout.session.completed",
            "data": {"object": session},
        }
    )
    # The app signs its simulated checkout's events with the dev secret it made in .data/.
    secret = stripe_api.load_or_create_dev_secret(ROOT / DEV_WEBHOOK_SECRET_PATH)
    header = stripe_api.signature_header(body, secret, int(time.time()))
    response = httpx.post(
        app.backend + WEBHOOK_PATH,
        content=body.encode(),
        headers={"Content-Type": "application/json", "Stripe-Signature": header},
        timeout=30,
    )
    response.raise_for_status()
    return dict(response.json())


def test_an_admin_sees_an_unmatched_payment_runs_reconciliation_and_clears_it(
    app: RunningApp, page: Page
) -> None:
    session_id = f"cs_test_e2e_link_{uuid.uuid4().hex[:10]}"
    assert deliver_foreign_payment(app, session_id)["outcome"] == "unmatched"

    sign_in(page, app, ADMIN, start="/admin/payments")
    row = page.locator("#admin-unmatched tbody tr", has_text=session_id)
    expect(row).to_have_count(1)
    expect(row).to_contain_text("5.00 USD")
    expect(row).to_contain_text("unknown session")

    page.locator("#reconcile-now").click()
    expect(page.locator("#admin-notice")).to_contain_text("reconciled payments since")
    summary = page.locator("#reconciliation-summary")
    expect(summary).to_contain_text("by an admin")
    expect(summary).to_contain_text("Stripe was not walked")
    expect(page.locator("#admin-reconciliation")).to_contain_text(session_id)

    # The note is required: the browser does not send the form without one.
    row.get_by_role("button", name="Clear").click()
    expect(row.get_by_role("button", name="Clear")).to_be_visible()
    row.get_by_role("textbox", name="Note").fill("Refunded at Stripe: a payment link test")
    row.get_by_role("button", name="Clear").click()
    expect(page.locator("#admin-notice")).to_contain_text("cleared unmatched payment")
    expect(row).to_contain_text("Refunded at Stripe: a payment link test")
    expect(row.get_by_role("button", name="Clear")).to_have_count(0)

    page.locator("#admin-nav-audit").click()
    first = page.locator("#admin-audit tbody tr").first
    expect(first).to_contain_text("cleared unmatched payment")
    expect(first).to_contain_text("Refunded at Stripe: a payment link test")
