"""Usage warnings and the credits dashboard, in Chromium against the running app."""

from __future__ import annotations

import csv
import io
import re
import uuid

import httpx
from playwright.sync_api import Page, expect

from aicredits.services import ledger, users
from tests.e2e.conftest import TRIAL_CREDITS, RunningApp, sign_in

# The demo model's worst case with a short prompt is 9 credits; a 1,024-token reply costs
# exactly that, so 45 credits buy exactly five replies.
ALLOWANCE = 45
REPLY_TOKENS = 1024


def fresh_user(app: RunningApp) -> str:
    email = f"spender-{uuid.uuid4().hex[:8]}@example.test"
    httpx.put(
        f"{app.idp}/users/{email}",
        json={"email": email, "email_verified": True, "name": "Sam Spender"},
    ).raise_for_status()
    return email


def new_allowance(app: RunningApp, email: str, credits: int) -> None:
    """Empty the trial, then grant `credits`: a new allowance of exactly that size."""
    db = app.db()
    try:
        user = users.find_user_by_email(db, email=email).id
        key = uuid.uuid4().hex
        ledger.adjust(
            db, user_id=user, credits=-TRIAL_CREDITS, key=f"e2e-{key}", actor="e2e", reason="e2e"
        )
        ledger.grant(db, user_id=user, credits=credits, key=f"e2e-grant-{key}", reason="e2e")
    finally:
        db.dispose()


def reply(page: Page, app: RunningApp, text: str) -> None:
    """One chat reply in a new conversation (so the prompt, and the cost, stay the same)."""
    httpx.post(f"{app.upstream}/_fake/next", json={"reply_tokens": REPLY_TOKENS}).raise_for_status()
    page.locator("#new-chat").click()
    expect(page.locator(".message")).to_have_count(0)
    page.locator("#chat-input").fill(text)
    page.locator("#chat-input").press("Enter")
    expect(page.locator(".reply-cost")).to_contain_text("· 9 credits", timeout=30_000)


def test_banners_appear_live_can_be_dismissed_block_at_100_and_clear_on_top_up(
    app: RunningApp, page: Page
) -> None:
    email = fresh_user(app)
    sign_in(page, app, email)
    new_allowance(app, email, ALLOWANCE)
    page.reload()
    banner = page.locator("#usage-banner")
    expect(page.locator("#header-balance")).to_have_text(f"{ALLOWANCE:,} credits")
    expect(banner).to_have_count(0)

    for n in range(2):
        reply(page, app, f"Question {n}")
    expect(banner).to_have_count(0)  # 18 of 45 used: 40%
    reply(page, app, "Question 2")  # 27 of 45: 60%, live, without a reload
    expect(banner).to_contain_text("used 60%")
    expect(banner).to_have_class(re.compile("banner-info"))

    page.locator("#banner-dismiss").click()
    expect(banner).to_have_count(0)
    page.reload()
    expect(banner).to_have_count(0)  # dismissed until the next top-up

    reply(page, app, "Question 3")  # 36 of 45: 80%
    expect(banner).to_have_class(re.compile("banner-warning"))
    expect(banner).to_contain_text("used 80%")

    reply(page, app, "Question 4")  # all 45 used
    expect(banner).to_have_class(re.compile("banner-blocking"))
    expect(page.locator("#banner-dismiss")).to_have_count(0)
    expect(page.locator("#chat-blocked")).to_be_visible()
    expect(page.locator("#send-button")).to_be_disabled()
    expect(page.locator("#header-balance")).to_have_text("0 credits")

    # Buy a pack through the simulated checkout: a new allowance, and the banner is gone.
    page.goto(app.frontend + "/credits")
    expect(banner).to_be_visible()
    page.locator("#buy-starter").click()
    page.wait_for_url(re.compile(r"/checkout/simulated/"))
    page.locator("#simulated-pay").click()
    page.wait_for_url(re.compile(r"/credits/success"))
    expect(page.locator("#checkout-credited")).to_be_visible()
    expect(banner).to_have_count(0)
    page.goto(app.frontend + "/chat")
    expect(page.locator("#send-button")).to_be_enabled()
    expect(banner).to_have_count(0)


def test_the_dashboard_shows_usage_history_and_exports_a_csv(app: RunningApp, page: Page) -> None:
    email = fresh_user(app)
    sign_in(page, app, email)
    reply(page, app, "Something to measure")
    page.goto(app.frontend + "/credits")
    expect(page.locator("#credits-available")).to_have_text(f"{TRIAL_CREDITS - 9:,}")
    expect(page.locator("#credits-total")).to_have_text(f"{TRIAL_CREDITS - 9:,}")
    expect(page.locator("#expiring-credits")).to_contain_text(
        f"{TRIAL_CREDITS - 9:,} credits expire"
    )
    expect(page.locator("#allowance-percent")).to_have_text("0%")  # 9 of 1,000
    expect(page.locator("#usage-chart")).to_be_visible()
    expect(page.locator("#usage-by-model")).to_contain_text("demo-model")
    history = page.locator("#ledger-history tbody tr")
    expect(history).to_have_count(2)
    expect(history.first).to_contain_text("spend")
    expect(history.first).to_contain_text("-9")

    page.locator("#history-kind").click()
    page.get_by_role("option", name="grant", exact=True).click()
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text("free trial")

    with page.expect_download() as download:
        page.locator("#export-csv").click()
    text = download.value.path().read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["record"] for r in rows] == ["ledger", "ledger", "usage"]
    assert rows[1]["credits"] == "-9" and rows[2]["output_tokens"] == str(REPLY_TOKENS)


def test_a_new_user_sees_sensible_empty_states(app: RunningApp, page: Page) -> None:
    sign_in(page, app, fresh_user(app), start="/credits")
    expect(page.locator("#usage-empty")).to_be_visible()
    expect(page.locator("#purchase-history-empty")).to_be_visible()
    expect(page.locator("#ledger-history tbody tr")).to_have_count(1)  # the trial
    expect(page.locator("#usage-banner")).to_have_count(0)
