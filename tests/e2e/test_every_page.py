"""Every page, signed out, as a user, as a user out of credits and as an admin, on a phone
(390x844, light) and a desktop (1280x800, dark): nothing wider than the screen, no console
errors, no failed request to this site, no serious or critical accessibility violation
(axe-core, from the local npm package), and a screenshot in test-artifacts/pages/ for people
to look at.

Bounded: one browser context per role, signed in once, each page loaded once per size in it
(the viewport and the color scheme are changed between the two sizes).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    Response,
    expect,
)

from aicredits.adapters.tables import users
from aicredits.services import ledger
from tests.e2e.conftest import ROOT, RunningApp, sign_in

ARTIFACTS = ROOT / "test-artifacts" / "pages"
SIZES = {"phone": {"width": 390, "height": 844}, "desktop": {"width": 1280, "height": 800}}
# Each size in one of the two themes, so both are checked without doubling the sweep.
SCHEMES = {"phone": "light", "desktop": "dark"}
USER = "sweeper@example.test"
SPENT = "spent@example.test"  # out of credits: the chat is paused
ADMIN = "admin@example.test"
PUBLIC_PAGES = ["/", "/login", "/forbidden"]
USER_PAGES = [
    "/chat",
    "/credits",
    "/credits/cancel",
    "/credits/success?session_id=cs_none",
    "/keys",
]
ADMIN_PAGES = [
    "/admin",
    "/admin/users",
    "/admin/user?id={user_id}",
    "/admin/audit",
    "/admin/prices",
    "/admin/payments",
]
# What must be on screen before a page counts as shown (Reflex renders after hydrating).
READY = "#page-ready"


@pytest.fixture(scope="module")
def axe_script() -> str:
    path = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "axe_core.py")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.strip()  # fmt: skip
    return Path(path).read_text()


@dataclass
class Watch:
    """What a page did that it should not have: console errors and failed requests to us."""

    origins: set[str]
    errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("response", self._response)
        page.on("requestfailed", self._failed)

    def _failed(self, request: Request) -> None:
        # An aborted request is a navigation leaving the page, not a failure.
        if self._ours(request.url) and "ERR_ABORTED" not in (request.failure or ""):
            self.errors.append(f"request failed: {request.url} {request.failure}")

    def _ours(self, url: str) -> bool:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}" in self.origins

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} at {message.location.get('url', '')}")

    def _response(self, response: Response) -> None:
        if response.status >= 400 and self._ours(response.url):
            self.errors.append(f"{response.status} from {response.url}")

    def take(self) -> list[str]:
        found, self.errors = self.errors, []
        return found


def serious_violations(page: Page, axe: str) -> list[str]:
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(content=axe)
    result: dict[str, Any] = page.evaluate(
        "async () => await window.axe.run(document, {resultTypes: ['violations']})"
    )
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v.get("impact") in ("serious", "critical")
    ]


def visit(page: Page, app: RunningApp, path: str) -> None:
    page.goto(app.frontend + path)
    expect(page.locator(READY)).to_be_attached(timeout=30_000)
    page.wait_for_timeout(300)  # late layout: fonts, the websocket's first update


def overflow(page: Page) -> int:
    """How much wider than the screen the page is, in CSS pixels."""
    width: int = page.evaluate(
        "() => Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
    )
    return width - int(page.viewport_size["width"] if page.viewport_size else 0)


def shot_name(role: str, path: str, size: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "home"
    return f"{role}-{slug}-{size}.png"


def sweep(browser: Browser, app: RunningApp, axe: str, role: str, paths: list[str]) -> list[str]:
    context: BrowserContext = browser.new_context()
    context.set_default_timeout(60_000)
    problems: list[str] = []
    try:
        page = context.new_page()
        watch = Watch({urlsplit(app.frontend)._replace(path="").geturl(), app.backend})
        watch.attach(page)
        if role != "visitor":
            email = {"admin": ADMIN, "spent": SPENT}.get(role, USER)
            sign_in(page, app, email)
            if role == "spent":
                spend_everything(app, email)
            watch.take()  # the provider's own page is checked in test_dev_sign_in
        for size in SIZES:
            page.set_viewport_size(SIZES[size])  # type: ignore[arg-type]
            page.emulate_media(color_scheme=SCHEMES[size])  # type: ignore[arg-type]
            for template in paths:
                # The admin's page of a user: the admin's own account (it exists by now).
                path = template.format(user_id=user_id(app, ADMIN)) if "{" in template else template
                visit(page, app, path)
                found = watch.take()
                wide = overflow(page)
                if wide > 0:
                    found.append(f"{wide}px wider than the {size} screen")
                found += serious_violations(page, axe)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / shot_name(role, path, size)), full_page=True)
                problems += [f"{path} ({size}): {problem}" for problem in found]
    finally:
        context.close()
    return problems


def spend_everything(app: RunningApp, email: str) -> None:
    db = app.db()
    try:
        who = user_id(app, email)
        left = ledger.get_balance(db, user_id=who).available
        if left:
            ledger.adjust(
                db, user_id=who, credits=-left, key=f"sweep:{who}:{left}", actor="test",
                reason="spent everything",
            )  # fmt: skip
    finally:
        db.dispose()


def user_id(app: RunningApp, email: str) -> int:
    db = app.db()
    try:
        with db.read() as conn:
            return int(
                conn.execute(sa.select(users.c.id).where(users.c.email == email)).scalar_one()
            )
    finally:
        db.dispose()


ROLES = {
    "visitor": PUBLIC_PAGES,
    "user": [*PUBLIC_PAGES, *USER_PAGES],
    "spent": ["/chat", "/credits"],
    "admin": ["/chat", *ADMIN_PAGES],
}


@pytest.mark.parametrize("role", list(ROLES))
def test_every_page_fits_has_no_errors_and_no_serious_accessibility_violation(
    app: RunningApp, browser: Browser, axe_script: str, role: str
) -> None:
    problems = sweep(browser, app, axe_script, role, ROLES[role])
    assert not problems, json.dumps(problems, indent=1)


def test_the_site_has_its_icon(app: RunningApp) -> None:
    # Browsers ask every site for /favicon.ico; a 404 there is a console error on each page.
    response = httpx.get(app.frontend + "/favicon.ico", timeout=30)
    assert response.status_code == 200
    assert response.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
