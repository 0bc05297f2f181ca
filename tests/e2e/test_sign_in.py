"""Signing in through the real OpenID provider, in Chromium, against the running app."""

from __future__ import annotations

from playwright.sync_api import Browser, Page, expect

from aicredits.services import ledger, users
from tests.e2e.conftest import TRIAL_CREDITS, RunningApp, sign_in


def test_sign_in_lands_on_the_chat_and_survives_a_reload(app: RunningApp, page: Page) -> None:
    sign_in(page, app, "alice@example.test")
    expect(page.locator("#chat-input")).to_be_visible()
    expect(page.locator("#header-user-name")).to_have_text("Alice Example")
    expect(page.locator("#header-balance")).to_have_text(f"{TRIAL_CREDITS:,} credits")
    page.reload()
    expect(page.locator("#header-user-name")).to_have_text("Alice Example")
    expect(page.locator("#chat-input")).to_be_visible()
    assert page.url == app.frontend + "/chat"


def test_sign_out_ends_the_session_and_chat_bounces_to_sign_in(app: RunningApp, page: Page) -> None:
    sign_in(page, app, "alice@example.test")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(app.frontend + "/")
    expect(page.get_by_role("button", name="Sign in with Dev sign-in")).to_be_visible()
    page.goto(app.frontend + "/chat")
    page.wait_for_url("**/login?next=/chat")
    expect(page.locator("#chat-input")).to_have_count(0)


def test_a_second_user_sees_only_their_own_account(app: RunningApp, browser: Browser) -> None:
    alice_ctx, bob_ctx = browser.new_context(), browser.new_context()
    try:
        alice, bob = alice_ctx.new_page(), bob_ctx.new_page()
        sign_in(alice, app, "alice@example.test")
        db = app.db()
        alice_id = users.find_user_by_email(db, email="alice@example.test").id
        ledger.grant(db, user_id=alice_id, credits=555, key=f"e2e-{alice_id}", reason="e2e")
        db.dispose()
        sign_in(bob, app, "bob@example.test", start="/credits")
        expect(bob.locator("#header-user-name")).to_have_text("Bob Example")
        expect(bob.locator("#header-balance")).to_have_text(f"{TRIAL_CREDITS:,} credits")
        expect(bob.get_by_text("alice@example.test")).to_have_count(0)
        alice.reload()
        expect(alice.locator("#header-balance")).to_have_text(f"{TRIAL_CREDITS + 555:,} credits")
    finally:
        alice_ctx.close()
        bob_ctx.close()


def test_a_non_admin_is_refused_the_admin_console(app: RunningApp, page: Page) -> None:
    sign_in(page, app, "bob@example.test")
    expect(page.locator("#nav-admin")).to_have_count(0)
    page.goto(app.frontend + "/admin")
    page.wait_for_url(app.frontend + "/forbidden")
    expect(page.locator("#forbidden")).to_be_visible()
    expect(page.locator("#admin-user-count")).to_have_count(0)


def test_an_admin_reaches_the_admin_console(app: RunningApp, page: Page) -> None:
    sign_in(page, app, "admin@example.test", start="/admin")
    expect(page.locator("#admin-user-count")).to_be_visible()
    assert int(page.locator("#admin-user-count").inner_text()) >= 1
