"""The guard on State event handlers: what a refused caller gets, what Reflex sees of a guarded
handler, and that every handler of every admin state has it."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest
import reflex as rx
from reflex.state import BaseState
from reflex_base.event import EventSpec

from aicredits.services.auth import CurrentUser
from aicredits.state.admin import AdminPageState, AdminUserAccountState
from aicredits.state.guards import Role, admin_only, guard_of, signed_in, unguarded_handlers
from aicredits.state.session import SessionState

ADA = CurrentUser(id=7, email="ada@example.test", name="Ada", avatar_url=None, is_admin=False)
BOSS = CurrentUser(id=1, email="boss@example.test", name="Boss", avatar_url=None, is_admin=True)


class FakeState:
    """What the guard asks of a state: who is signed in, and where sign-in is."""

    def __init__(self, user: CurrentUser | None) -> None:
        self.user = user
        self.ran: list[tuple[int, dict[str, Any]]] = []

    async def _authenticate(self) -> CurrentUser | None:
        return self.user

    def _to_login(self) -> EventSpec:
        return rx.redirect("/login?next=/admin")


@admin_only
async def grant(self: Any, user: CurrentUser, form_data: dict[str, Any]) -> str:
    self.ran.append((user.id, form_data))
    return "granted"


@signed_in
async def read(self: Any, user: CurrentUser) -> str:
    self.ran.append((user.id, {}))
    return "read"


def redirect_path(result: object) -> str:
    assert isinstance(result, EventSpec)
    ((_, path), *_) = result.args
    return str(json.loads(path._js_expr))


def test_an_admin_only_handler_refuses_before_its_body_runs() -> None:
    for user, where in ((None, "/login?next=/admin"), (ADA, "/forbidden")):
        state = FakeState(user)
        result = asyncio.run(grant(state, form_data={"credits": "1000000"}))
        assert redirect_path(result) == where
        assert state.ran == []


def test_an_admin_only_handler_runs_for_an_admin_with_the_admin_it_resolved() -> None:
    state = FakeState(BOSS)
    assert asyncio.run(grant(state, form_data={"credits": "5"})) == "granted"
    assert state.ran == [(BOSS.id, {"credits": "5"})]


def test_a_signed_in_handler_refuses_only_the_signed_out() -> None:
    signed_out = FakeState(None)
    assert redirect_path(asyncio.run(read(signed_out))) == "/login?next=/admin"
    assert signed_out.ran == []
    state = FakeState(ADA)
    assert asyncio.run(read(state)) == "read"
    assert state.ran == [(ADA.id, {})]


def test_the_browser_cannot_send_the_user() -> None:
    # Reflex reads what an event carries from the signature and the annotations.
    assert list(inspect.signature(grant).parameters) == ["self", "form_data"]
    assert "user" not in grant.__annotations__
    assert inspect.iscoroutinefunction(grant)
    assert (guard_of(grant), guard_of(read)) == (Role.ADMIN, Role.SIGNED_IN)
    handler = AdminUserAccountState.event_handlers["grant_credits"]
    assert list(handler.get_parameters()) == ["self", "form_data"]
    assert set(handler._get_type_hints()) == {"form_data", "return"}


def admin_states() -> list[type[BaseState]]:
    """The admin states: the base every admin page's state derives from, and all of those."""
    found: list[type[BaseState]] = []
    todo: list[type[BaseState]] = [AdminPageState]
    while todo:
        state = todo.pop()
        found.append(state)
        todo.extend(state.get_substates())
    return found


def test_every_handler_of_every_admin_state_is_admin_only() -> None:
    states = admin_states()
    assert {s.__name__ for s in states} >= {
        "AdminPageState",
        "AdminOverviewState",
        "AdminUserSearchState",
        "AdminUserAccountState",
        "AdminAuditLogState",
        "AdminPricesState",
    }
    handlers = [name for state in states for name in state.event_handlers if name != "setvar"]
    assert len(handlers) >= 16
    assert {s.__name__: unguarded_handlers(s, Role.ADMIN) for s in states} == {
        s.__name__: [] for s in states
    }


def test_the_check_finds_handlers_that_check_the_user_by_hand() -> None:
    # The control for the test above: SessionState's handlers check in their bodies.
    assert unguarded_handlers(SessionState, Role.ADMIN) == [
        "dismiss_banner",
        "dismiss_topup_notice",
        "load_visitor",
        "require_login",
    ]


def test_an_admin_state_with_an_unguarded_handler_is_refused_when_defined() -> None:
    with pytest.raises(TypeError, match=r"@admin_only, not \['leak'\]"):

        class LeakyAdminState(AdminPageState):
            @rx.event
            async def leak(self) -> None:
                pass

    with pytest.raises(TypeError, match=r"@admin_only, not \['leak'\]"):

        class SignedInOnlyAdminState(AdminPageState):
            @rx.event
            @signed_in
            async def leak(self, user: CurrentUser) -> None:
                pass
