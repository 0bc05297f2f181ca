"""The API keys page in Chromium against the running app: a key is made with a name, its
secret is shown once, the table shows only its prefix, and revoking it (after a
confirmation) stops it working. Crafted websocket events get nothing from its handlers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from playwright.sync_api import Browser, Page, expect

from aicredits.adapters.db import Database
from aicredits.adapters.tables import api_keys as api_keys_table
from aicredits.services import api_keys, auth, users
from aicredits.services.api_keys import ApiKeyView
from aicredits.settings import get_settings
from aicredits.state.keys import KeysState
from tests.e2e import raw_events
from tests.e2e.conftest import RunningApp, sign_in
from tests.e2e.raw_events import changed, redirects

SECRET_SHAPE = re.compile(r"^aic_[A-Za-z0-9_-]{43}$")


@pytest.fixture
def db(app: RunningApp) -> Iterator[Database]:
    database = app.db()
    yield database
    database.dispose()


def user_id(db: Database, email: str) -> int:
    return users.find_user_by_email(db, email=email).id


def keys_named(db: Database, uid: int, name: str) -> list[ApiKeyView]:
    return [k for k in api_keys.list_api_keys(db, user_id=uid) if k.name == name]


def resolves_to(db: Database, secret: str) -> str | None:
    user = api_keys.resolve_api_key(db, get_settings(), secret)
    return None if user is None else user.email


def create_key(page: Page, name: str) -> str:
    page.locator("#key-name-input").fill(name)
    page.locator("#create-key").click()
    secret = page.locator("#new-key-secret")
    expect(secret).to_have_text(SECRET_SHAPE)
    return secret.inner_text()


def test_a_signed_out_visit_is_bounced_to_sign_in(app: RunningApp, page: Page) -> None:
    page.goto(app.frontend + "/keys")
    page.wait_for_url("**/login?next=/keys")
    expect(page.locator("#key-name-input")).to_have_count(0)
    expect(page.locator("#keys-table")).to_have_count(0)


def test_a_key_is_shown_once_then_only_its_prefix_and_revoking_stops_it(
    app: RunningApp, page: Page, db: Database
) -> None:
    email = "alice@example.test"
    sign_in(page, app, email, start="/keys")
    expect(page.locator("#nav-keys")).to_be_visible()
    expect(page.locator("#usage-curl")).to_contain_text(f"curl {app.backend}/v1/chat/completions")
    expect(page.locator("#usage-python")).to_contain_text('base_url=f"{api_url}/v1"')
    expect(page.locator("#usage-python")).to_contain_text(f'api_url = "{app.backend}"')

    name = f"e2e script {uuid.uuid4().hex[:6]}"
    secret = create_key(page, name)
    expect(page.locator("#key-name-input")).to_have_value("")  # the form was reset
    expect(page.locator("#copy-new-key")).to_be_visible()

    # The key exists for this user, works, and the database holds only its prefix.
    (made,) = keys_named(db, user_id(db, email), name)
    assert made.prefix == secret[:12] and made.revoked_at is None
    assert resolves_to(db, secret) == email
    row = page.locator(f"#key-{made.id}")
    expect(row).to_contain_text(name)
    expect(row).to_contain_text(secret[:12] + "…")
    expect(row).to_contain_text("active")

    # After a reload the secret is gone for good; the table shows the prefix only.
    page.reload()
    expect(row).to_contain_text(secret[:12] + "…")
    expect(row).to_contain_text("active")
    expect(page.locator("#new-key-secret")).to_have_count(0)
    assert secret not in page.content()
    assert secret[12:] not in page.content()

    # Revoking asks first; cancelling changes nothing.
    page.locator(f"#revoke-{made.id}").click()
    dialog = page.get_by_role("alertdialog")
    expect(dialog).to_contain_text("Revoke this key?")
    expect(dialog).to_contain_text(name)
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_have_count(0)
    expect(row).to_contain_text("active")
    assert resolves_to(db, secret) == email

    page.locator(f"#revoke-{made.id}").click()
    page.locator(f"#confirm-revoke-{made.id}").click()
    expect(row).to_contain_text("revoked")
    expect(page.locator(f"#revoke-{made.id}")).to_have_count(0)
    assert resolves_to(db, secret) is None
    (after,) = keys_named(db, user_id(db, email), name)
    assert after.revoked_at is not None

    page.reload()
    expect(row).to_contain_text("revoked")
    expect(page.locator(f"#revoke-{made.id}")).to_have_count(0)


def test_a_blank_name_is_refused_with_a_clear_error(
    app: RunningApp, page: Page, db: Database
) -> None:
    email = "bob@example.test"
    sign_in(page, app, email, start="/keys")
    uid = user_id(db, email)
    before = len(api_keys.list_api_keys(db, user_id=uid))
    for blank in ("", "   "):
        page.locator("#key-name-input").fill(blank)
        page.locator("#create-key").click()
        expect(page.locator("#keys-error")).to_contain_text("Give the key a name")
        expect(page.locator("#new-key-secret")).to_have_count(0)
    assert len(api_keys.list_api_keys(db, user_id=uid)) == before

    # A good name then works, clears the error, and "Done" hides the secret.
    name = f"bob key {uuid.uuid4().hex[:6]}"
    secret = create_key(page, name)
    expect(page.locator("#keys-error")).to_have_count(0)
    assert resolves_to(db, secret) == email
    page.locator("#dismiss-new-key").click()
    expect(page.locator("#new-key-secret")).to_have_count(0)
    expect(page.locator("#keys-table")).to_contain_text(name)
    assert secret not in page.content()


def test_the_page_fits_a_phone(app: RunningApp, browser: Browser, db: Database) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    context.set_default_timeout(60_000)
    try:
        page = context.new_page()
        sign_in(page, app, "admin@example.test", start="/keys")
        # The worst case is a secret with no "-" (a place the browser may break a line
        # anyway); about half of them have none.
        for _ in range(10):
            if "-" not in create_key(page, f"phone {uuid.uuid4().hex[:6]}"):
                break
            page.locator("#dismiss-new-key").click()
            expect(page.locator("#new-key-secret")).to_have_count(0)
        else:
            pytest.fail("no secret without a '-' in 10 tries")
        expect(page.locator("#keys-table")).to_be_visible()
        for selector in ("#key-name-input", "#create-key", "#dismiss-new-key", "#menu-button"):
            box = page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        # The page itself never scrolls sideways (the table may, inside itself).
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
    finally:
        context.close()


# --- crafted websocket events -----------------------------------------------------------------


def send_event(
    app: RunningApp, handler: str, payload: dict[str, Any], cookie: str = ""
) -> list[dict[str, Any]]:
    """Send one crafted event to a KeysState handler, from /keys."""
    return raw_events.send_event(
        app,
        f"{KeysState.get_full_name()}.{handler}",
        path="/keys",
        cookie=cookie,
        payload=payload,
    )


def key_count(db: Database) -> int:
    with db.read() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(api_keys_table)).scalar_one()
        )


def session_cookie(db: Database, email: str) -> tuple[int, str]:
    try:
        uid = user_id(db, email)
    except Exception:
        uid = users.create_user(db, email=email, name=email, email_verified=True).id
    return uid, f"aicredits_session={auth.create_session(db, user_id=uid, days=1)}"


def test_crafted_events_without_a_session_do_nothing(app: RunningApp, db: Database) -> None:
    victim, _ = session_cookie(db, "keys-victim@example.test")
    key = api_keys.create_api_key(db, user_id=victim, name="victim key")
    before = key_count(db)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("load", {}),
        ("create", {"form_data": {"name": "sneaky"}}),
        ("revoke", {"key_id": str(key.key.id)}),
        ("dismiss_new_key", {}),
    ]
    for handler, payload in cases:
        for cookie in ("", "aicredits_session=forged"):
            updates = send_event(app, handler, payload, cookie)
            assert redirects(updates) == ["/login?next=/keys"], handler
            assert not [v for v in changed(updates, "keys") if v], handler
            assert not [v for v in changed(updates, "new_key_secret") if v], handler
    assert key_count(db) == before  # nothing was created for anyone
    assert resolves_to(db, key.secret) == "keys-victim@example.test"


def test_a_crafted_revoke_of_another_users_key_is_refused(app: RunningApp, db: Database) -> None:
    victim, _ = session_cookie(db, "keys-victim@example.test")
    key = api_keys.create_api_key(db, user_id=victim, name="victim key 2")
    intruder, cookie = session_cookie(db, "keys-intruder@example.test")

    for key_id in (str(key.key.id), "not-a-number", "99999999999999999999"):
        updates = send_event(app, "revoke", {"key_id": key_id}, cookie)
        assert redirects(updates) == []
        assert changed(updates, "error") == ["There is no such API key."], key_id
    assert resolves_to(db, key.secret) == "keys-victim@example.test"

    # The control: the same crafted event format does act for the key's own user.
    own = api_keys.create_api_key(db, user_id=intruder, name="own key")
    updates = send_event(app, "revoke", {"key_id": str(own.key.id)}, cookie)
    assert redirects(updates) == []
    assert resolves_to(db, own.secret) is None
