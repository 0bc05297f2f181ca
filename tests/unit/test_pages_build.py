"""Every page's component tree builds: a mistake Reflex reports only when it compiles the
app (an event handler with arguments inside rx.cond, a bad prop) fails here in a second."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import reflex as rx

from aicredits.pages import admin, auth, chat, credits, home, keys

PAGES: list[Callable[[], rx.Component]] = [
    home.home,
    auth.login,
    auth.forbidden,
    chat.chat,
    credits.credits,
    credits.success,
    credits.cancel,
    keys.keys_page,
    admin.overview,
    admin.users,
    admin.user_page,
    admin.audit,
    admin.prices,
]


@pytest.mark.parametrize("build", PAGES, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_the_page_builds_and_renders(build: Callable[[], rx.Component]) -> None:
    component = build()
    assert isinstance(component, rx.Component)
    assert component.render()  # the dict Reflex compiles to JSX


@pytest.mark.parametrize(
    ("build", "element_id"),
    [
        (chat.chat, '"trial-notice"'),
        (credits.credits, '"trial-notice"'),
        (admin.overview, '"admin-limited-addresses"'),
    ],
)
def test_the_page_has_its_element(build: Callable[[], rx.Component], element_id: str) -> None:
    """Where a new user is told why they got no free trial; where admins see the addresses
    that reached the trial limit."""
    assert element_id in str(build().render())
