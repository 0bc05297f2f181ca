"""The chat page in Chromium, against the real app, the OpenID provider and the fake upstream."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from playwright.sync_api import Page, expect

from aicredits.adapters.tables import chat_messages
from aicredits.services import ledger, users
from tests.e2e.conftest import ROOT, RunningApp, sign_in

# Screenshots for people to look at (not compared by any test); not committed.
ARTIFACTS = ROOT / "test-artifacts"


def queue(app: RunningApp, **knobs: Any) -> None:
    httpx.post(f"{app.upstream}/_fake/next", json=knobs).raise_for_status()


def chat_requests(app: RunningApp) -> int:
    return int(httpx.get(f"{app.upstream}/_fake/stats").json()["chat_requests"])


def header_balance(page: Page) -> int:
    text = page.locator("#header-balance").inner_text()
    match = re.match(r"([\d,]+) credits?", text)
    assert match, text
    return int(match.group(1).replace(",", ""))


def charged(cost_line: str) -> int:
    match = re.search(r"· ([\d,]+) credits?$", cost_line)
    assert match, cost_line
    return int(match.group(1).replace(",", ""))


def save_screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))  # the viewport: what one sees


def wait_until(condition: Callable[[], bool], message: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def send(page: Page, text: str) -> None:
    page.locator("#chat-input").fill(text)
    page.locator("#chat-input").press("Enter")


@pytest.fixture(autouse=True)
def reset_upstream(app: RunningApp) -> None:
    httpx.post(f"{app.upstream}/_fake/reset").raise_for_status()


def test_a_reply_streams_in_pieces_costs_what_it_says_and_survives_a_reload(
    app: RunningApp, page: Page
) -> None:
    page.set_viewport_size({"width": 1280, "height": 800})
    sign_in(page, app, "streamer@example.test")
    before = header_balance(page)
    queue(app, reply_tokens=40, tokens_per_second=20)
    send(page, "Tell me a story")
    reply = page.locator(".message-assistant").last
    expect(reply).to_contain_text("lorem")
    early = len(reply.inner_text())
    expect(page.locator("#stop-button")).to_be_visible()
    expect(page.locator("#send-button")).to_be_disabled()
    wait_until(lambda: len(reply.inner_text()) > early, "the reply did not grow while streaming")
    cost = page.locator(".reply-cost").last
    expect(cost).to_contain_text("40 out")
    spent = charged(cost.inner_text())
    assert spent > 0
    expect(page.locator("#header-balance")).to_have_text(f"{before - spent:,} credits")
    expect(page.locator("#chat-input")).to_have_value("")
    expect(page.locator("#conversation-list")).to_contain_text("Tell me a story")
    save_screenshot(page, "chat-desktop-1280x800")

    page.reload()
    expect(page.locator(".message-user")).to_have_text("Tell me a story")
    expect(page.locator(".reply-cost")).to_have_text(cost.inner_text())


def test_replies_arriving_one_after_another_raise_no_errors_in_the_page(
    app: RunningApp, page: Page
) -> None:
    # React checks that a component calls the same hooks on every render; a list whose items
    # call a hook (the Markdown renderer reads the color mode) breaks that as it grows.
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    sign_in(page, app, "several@example.test")
    for n in range(1, 4):
        send(page, f"question {n}")
        expect(page.locator(".reply-cost")).to_have_count(n)
    assert errors == []


def test_a_reload_in_the_middle_of_a_reply_shows_the_message_and_the_reply_so_far(
    app: RunningApp, page: Page
) -> None:
    sign_in(page, app, "reloader@example.test")
    before = header_balance(page)
    queue(app, reply_tokens=60, tokens_per_second=15)
    send(page, "A long one, please")
    expect(page.locator(".message-assistant").last).to_contain_text("dolor")

    db = app.db()
    try:
        # Reload once the reply has been saved part way (it is, every 2 s).
        def saved_so_far() -> str:
            with db.read() as conn:
                row = conn.execute(
                    sa.select(chat_messages.c.content, chat_messages.c.outcome)
                    .where(chat_messages.c.role == "assistant")
                    .order_by(chat_messages.c.id.desc())
                    .limit(1)
                ).one()
            return str(row.content) if row.outcome == "streaming" else ""

        deadline = time.monotonic() + 30
        while not saved_so_far():
            assert time.monotonic() < deadline, "the reply was never saved while streaming"
            time.sleep(0.1)
    finally:
        db.dispose()
    page.reload()
    expect(page.locator(".message-user").last).to_have_text("A long one, please")
    expect(page.locator(".message-assistant").last).to_contain_text("lorem ipsum")
    # The reply goes on into the reloaded page, and ends with its cost.
    cost = page.locator(".reply-cost").last
    expect(cost).to_contain_text("60 out")
    spent = charged(cost.inner_text())
    expect(page.locator("#header-balance")).to_have_text(f"{before - spent:,} credits")
    assert page.locator(".message-assistant").count() == 1


def test_the_estimate_under_the_box_follows_the_draft(app: RunningApp, page: Page) -> None:
    sign_in(page, app, "estimator@example.test")
    estimate = page.locator("#cost-estimate")
    expect(estimate).to_have_text("")  # nothing to estimate in an empty box
    page.locator("#chat-input").fill("word " * 2000)
    expect(estimate).to_contain_text("at most")
    long_estimate = estimate.inner_text()
    page.locator("#chat-input").fill("hi")
    expect(estimate).not_to_have_text(long_estimate)
    assert re.fullmatch(r"≈ [\d,]+ credits?, at most [\d,]+", estimate.inner_text())
    page.locator("#chat-input").fill("")
    expect(estimate).to_have_text("")


def test_stop_ends_a_slow_reply_and_charges_only_what_was_shown(
    app: RunningApp, page: Page
) -> None:
    sign_in(page, app, "stopper@example.test")
    before = header_balance(page)
    queue(app, reply_tokens=400, tokens_per_second=20)
    send(page, "Go on and on")
    reply = page.locator(".message-assistant").last
    expect(reply).to_contain_text("ipsum")
    # Stop part way: once some ten tokens (words) are shown, far from the 400 to come.
    wait_until(lambda: len(reply.inner_text().split()) >= 10, "the reply stopped streaming")
    page.locator("#stop-button").click()
    note = page.locator(".reply-note").last
    expect(note).to_contain_text("Stopped")
    cost = page.locator(".reply-cost").last.inner_text()
    out_tokens = int(re.search(r"· (\d+) out", cost).group(1))  # type: ignore[union-attr]
    assert 0 < out_tokens < 400
    spent = charged(cost)
    assert spent > 0
    expect(page.locator("#header-balance")).to_have_text(f"{before - spent:,} credits")
    page.reload()
    expect(page.locator(".reply-note")).to_contain_text("Stopped")


def test_not_enough_credits_is_explained_and_nothing_is_sent_upstream(
    app: RunningApp, page: Page
) -> None:
    sign_in(page, app, "broke@example.test")
    db = app.db()
    user = users.find_user_by_email(db, email="broke@example.test").id
    balance = ledger.get_balance(db, user_id=user).available
    ledger.adjust(
        db, user_id=user, credits=-(balance - 2), key=f"e2e-broke-{user}", actor="e2e", reason="e2e"
    )
    db.dispose()
    page.reload()
    expect(page.locator("#header-balance")).to_have_text("2 credits")
    calls = chat_requests(app)
    send(page, "Please answer")
    error = page.locator("#chat-error")
    expect(error).to_contain_text("Not enough credits")
    expect(error).to_contain_text("2 available")
    expect(page.locator("#buy-credits-link")).to_have_attribute("href", "/credits")
    expect(page.locator("#chat-input")).to_have_value("Please answer")
    assert chat_requests(app) == calls
    expect(page.locator("#header-balance")).to_have_text("2 credits")


def test_an_upstream_failure_is_shown_and_nothing_is_charged(app: RunningApp, page: Page) -> None:
    sign_in(page, app, "unlucky@example.test")
    before = header_balance(page)
    queue(app, fault="500", count=5)
    send(page, "Will this work?")
    expect(page.locator("#chat-error")).to_contain_text("Nothing was charged")
    expect(page.locator("#chat-input")).to_have_value("Will this work?")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#header-balance")).to_have_text(f"{before:,} credits")


def test_conversations_can_be_renamed_and_deleted(app: RunningApp, page: Page) -> None:
    sign_in(page, app, "organiser@example.test")
    send(page, "First topic")
    expect(page.locator(".reply-cost")).to_have_count(1)
    page.get_by_role("button", name="Rename").first.click()
    page.locator(".rename-input input").fill("My renamed chat")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#conversation-list")).to_contain_text("My renamed chat")
    page.get_by_role("button", name="Delete").first.click()
    page.get_by_role("alertdialog").get_by_role("button", name="Delete").click()
    expect(page.locator("#conversation-list")).to_have_count(0)
    expect(page.locator(".message")).to_have_count(0)


def test_the_chat_fits_a_phone_screen(app: RunningApp, page: Page) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    sign_in(page, app, "phone@example.test")
    send(page, "Hello from a phone")
    expect(page.locator(".reply-cost")).to_have_count(1)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width}px wide on a 390px screen"
    expect(page.locator("#send-button")).to_be_in_viewport()
    save_screenshot(page, "chat-phone-390x844")
