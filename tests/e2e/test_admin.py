"""The admin console in Chromium: an admin finds a user, adjusts their balance with a reason,
and the user sees the new balance and the history line. A refused adjustment changes nothing."""

from __future__ import annotations

import uuid

import httpx
from playwright.sync_api import Browser, Page, expect

from tests.e2e.conftest import TRIAL_CREDITS, RunningApp, sign_in

ADMIN = "admin@example.test"


def fresh_user(app: RunningApp, name: str) -> str:
    email = f"customer-{uuid.uuid4().hex[:8]}@example.test"
    httpx.put(
        f"{app.idp}/users/{email}",
        json={"email": email, "email_verified": True, "name": name},
    ).raise_for_status()
    return email


def test_an_admin_adjusts_a_balance_with_a_reason_and_the_user_sees_it(
    app: RunningApp, page: Page, browser: Browser
) -> None:
    customer = fresh_user(app, "Casey Customer")
    sign_in(page, app, customer, start="/credits")
    expect(page.locator("#header-balance")).to_have_text(f"{TRIAL_CREDITS:,} credits")

    admin_context = browser.new_context()
    admin_context.set_default_timeout(60_000)
    try:
        console = admin_context.new_page()
        sign_in(console, app, ADMIN, start="/admin/users")
        console.locator("#admin-user-search").fill(customer)
        console.locator("#admin-user-search-submit").click()
        expect(console.locator("#admin-users tbody tr")).to_have_count(1)
        console.get_by_role("link", name=customer).click()
        console.wait_for_url("**/admin/user?id=*")
        expect(console.locator("#admin-target-email")).to_have_text(customer)
        expect(console.locator("#admin-target-balance")).to_have_text(f"{TRIAL_CREDITS:,}")

        # Taking more than the balance is refused, with a clear message, and changes nothing.
        console.locator("#adjust-credits").fill(f"-{TRIAL_CREDITS + 1}")
        console.locator("#adjust-reason").fill("Testing the floor")
        console.locator("#adjust-submit").click()
        expect(console.locator("#admin-error")).to_contain_text("below zero")
        expect(console.locator("#admin-target-balance")).to_have_text(f"{TRIAL_CREDITS:,}")

        # The reason is required: the browser does not send the form without one.
        console.locator("#adjust-credits").fill("250")
        console.locator("#adjust-reason").fill("")
        console.locator("#adjust-submit").click()
        expect(console.locator("#admin-target-balance")).to_have_text(f"{TRIAL_CREDITS:,}")

        console.locator("#adjust-reason").fill("Goodwill for the outage")
        console.locator("#adjust-submit").click()
        expect(console.locator("#admin-notice")).to_contain_text("Done")
        expect(console.locator("#admin-target-balance")).to_have_text(f"{TRIAL_CREDITS + 250:,}")
        expect(console.locator("#admin-ledger")).to_contain_text("Goodwill for the outage")
        expect(console.locator("#admin-user-audit")).to_contain_text("Goodwill for the outage")

        # The audit log has it, with who did it.
        console.locator("#admin-nav-audit").click()
        first = console.locator("#admin-audit tbody tr").first
        expect(first).to_contain_text(ADMIN)
        expect(first).to_contain_text(customer)
        expect(first).to_contain_text("Goodwill for the outage")
    finally:
        admin_context.close()

    # The user sees the new balance and the history line.
    page.goto(app.frontend + "/credits")
    expect(page.locator("#header-balance")).to_have_text(f"{TRIAL_CREDITS + 250:,} credits")
    expect(page.locator("#ledger-history")).to_contain_text("Goodwill for the outage")
    expect(page.locator("#ledger-history")).to_contain_text("+250")


def test_a_suspended_user_is_signed_out_and_the_console_is_closed_to_non_admins(
    app: RunningApp, page: Page, browser: Browser
) -> None:
    customer = fresh_user(app, "Sid Suspended")
    sign_in(page, app, customer, start="/chat")

    # Not an admin: the console is closed, whatever the address.
    page.goto(app.frontend + "/admin/users")
    page.wait_for_url("**/forbidden")

    admin_context = browser.new_context()
    admin_context.set_default_timeout(60_000)
    try:
        console = admin_context.new_page()
        sign_in(console, app, ADMIN, start="/admin/users")
        console.locator("#admin-user-search").fill(customer)
        console.locator("#admin-user-search-submit").click()
        console.get_by_role("link", name=customer).click()
        console.wait_for_url("**/admin/user?id=*")
        console.locator("#suspension-reason").fill("Card testing")
        console.locator("#suspend-submit").click()
        expect(console.locator("#admin-notice")).to_contain_text("Done")
        expect(console.locator("#admin-target-flags")).to_contain_text("suspended")
        expect(console.locator("#unsuspend-submit")).to_be_visible()
    finally:
        admin_context.close()

    # The user's session was revoked: the next page sends them to sign in.
    page.goto(app.frontend + "/credits")
    page.wait_for_url("**/login?next=/credits")
