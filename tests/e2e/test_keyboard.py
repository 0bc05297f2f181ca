"""The chat with the keyboard alone, as someone who cannot use a mouse: sign in, type, send,
stop a reply, open a conversation, buy credits. Every step is Tab, Shift+Tab, Enter or
typing; the focused control always shows that it is focused."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import TRIAL_CREDITS, RunningApp

STARTER_CREDITS = 5_000
MAX_TABS = 60


@pytest.fixture(autouse=True)
def reset_upstream(app: RunningApp) -> None:
    httpx.post(f"{app.upstream}/_fake/reset").raise_for_status()


def focused(page: Page) -> str:
    """The focused element, as `#id` or `tag.text`, for finding it and for failure messages."""
    described: str = page.evaluate(
        """() => {
            const e = document.activeElement;
            if (!e) return '';
            return e.id ? '#' + e.id : e.tagName.toLowerCase() + '.' + (e.textContent || '').trim();
        }"""
    )
    return described


def focus_is_visible(page: Page) -> bool:
    """A focus ring: an outline or a box shadow on the focused element, or on the box that
    draws its frame (Radix's text fields ring their root, around the <input>)."""
    shown: bool = page.evaluate(
        """() => {
            let e = document.activeElement;
            for (let depth = 0; e && depth < 3; depth++, e = e.parentElement) {
                const s = getComputedStyle(e);
                if ((s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0)
                    || (s.boxShadow && s.boxShadow !== 'none')) return true;
            }
            return false;
        }"""
    )
    return shown


def tab_to(page: Page, wanted: str, *, back: bool = False) -> None:
    """Press Tab (or Shift+Tab) until the element described `wanted` (#id, or tag.text
    prefix) has the focus; it must show it."""
    seen = []
    for _ in range(MAX_TABS):
        page.keyboard.press("Shift+Tab" if back else "Tab")
        now = focused(page)
        seen.append(now)
        if now == wanted or (not wanted.startswith("#") and now.startswith(wanted)):
            assert focus_is_visible(page), f"{wanted} has the focus but does not show it"
            return
    raise AssertionError(f"Tab never reached {wanted}; it went through {seen}")


def test_sign_in_chat_stop_open_and_buy_with_the_keyboard_alone(
    app: RunningApp, page: Page
) -> None:
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(app.frontend + "/login?next=/chat")
    tab_to(page, "#sign-in-dev")
    page.keyboard.press("Enter")
    page.wait_for_url("**/oauth2/authorize**")
    assert focused(page) == "#dev-email"  # the provider's page puts the focus there
    page.keyboard.type("keys@example.test")
    page.keyboard.press("Enter")
    page.wait_for_url(app.frontend + "/chat")
    expect(page.locator("#header-balance")).to_have_text(f"{TRIAL_CREDITS:,} credits")

    # Type and send.
    tab_to(page, "#chat-input")
    page.keyboard.type("Hello from the keyboard")
    page.keyboard.press("Enter")
    expect(page.locator(".reply-cost")).to_have_count(1)

    # A slow reply, stopped from the keyboard.
    httpx.post(
        f"{app.upstream}/_fake/next", json={"reply_tokens": 400, "tokens_per_second": 10}
    ).raise_for_status()
    page.keyboard.type("Go on and on")
    page.keyboard.press("Enter")
    expect(page.locator(".message-assistant").last).to_contain_text("ipsum")
    tab_to(page, "#stop-button")
    page.keyboard.press("Enter")
    expect(page.locator(".reply-note").last).to_contain_text("Stopped")

    # A new conversation, then back to the first one from the list.
    tab_to(page, "#new-chat", back=True)
    page.keyboard.press("Enter")
    expect(page.locator("#empty-chat")).to_be_visible()
    tab_to(page, "button.Hello from the keyboard")
    page.keyboard.press("Enter")
    expect(page.locator(".message-user").first).to_have_text("Hello from the keyboard")
    expect(page).to_have_url(re.compile(r"/chat\?c=\d+$"))

    # Buy a pack: the header's link, the pack's button, the (simulated) checkout's Pay.
    tab_to(page, "#nav-credits", back=True)
    page.keyboard.press("Enter")
    page.wait_for_url(app.frontend + "/credits")
    tab_to(page, "#buy-starter")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/checkout/simulated/cs_test_sim_\w+$"))
    tab_to(page, "#simulated-pay")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/credits/success\?session_id=cs_test_sim_\w+$"))
    expect(page.locator("#checkout-credited")).to_be_visible()
    expect(page.locator("#header-balance")).not_to_have_text(f"{TRIAL_CREDITS:,} credits")
