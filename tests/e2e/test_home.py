"""A newcomer opens the app and sees the home page with the configured model's price."""

from __future__ import annotations

import json
import urllib.request

from playwright.sync_api import Page, expect

from tests.e2e.conftest import RunningApp


def test_home_page_shows_the_models_and_their_prices(app: RunningApp, page: Page) -> None:
    page.goto(app.frontend + "/")
    expect(page.get_by_role("heading", name="A paid AI chat that sustains itself")).to_be_visible()
    row = page.locator("#price-table").get_by_role("row", name="Demo model")
    expect(row).to_contain_text("Demo model (local fake upstream)")
    expect(row.get_by_role("cell").nth(1)).to_have_text("2")
    expect(row.get_by_role("cell").nth(2)).to_have_text("8")
    expect(page.get_by_text("SQLite (local file")).to_be_visible()


def test_health_route_answers(app: RunningApp) -> None:
    with urllib.request.urlopen(app.backend + "/healthz", timeout=10) as response:  # noqa: S310
        assert json.load(response) == {"status": "ok"}
