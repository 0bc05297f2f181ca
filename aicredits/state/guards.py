"""Who may call a State event handler, declared once on the handler.

Any handler can be called by a crafted websocket message, whatever the page shows or hides,
so each protected one checks the caller on the server before its body runs:

    @rx.event
    @admin_only
    async def grant_credits(self, admin: CurrentUser, form_data: dict[str, Any]) -> ...:

resolves the session cookie, sends a signed-out caller to sign-in and a signed-in non-admin
to /forbidden (the body never runs, so a refused call changes none of the state's vars),
and hands the body the user it resolved. `@signed_in` does the same for any signed-in user.
`unguarded_handlers` lists the handlers a state class defines without a guard, for the
classes (and the test) that require one on every handler.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from enum import StrEnum
from typing import Any, Concatenate, ParamSpec, TypeVar

import reflex as rx
from reflex.state import BaseState, EventHandlerSetVar
from reflex_base.event import EventHandler, EventSpec

from aicredits.services.auth import CurrentUser
from aicredits.state.session import SessionState

State = TypeVar("State", bound=SessionState)
Params = ParamSpec("Params")
Result = TypeVar("Result")

_GUARD = "__aicredits_guard__"


class Role(StrEnum):
    SIGNED_IN = "signed_in"
    ADMIN = "admin"


def _guard(
    role: Role,
) -> Callable[
    [Callable[Concatenate[State, CurrentUser, Params], Awaitable[Result]]],
    Callable[Concatenate[State, Params], Coroutine[Any, Any, Result | EventSpec]],
]:
    def decorate(
        handler: Callable[Concatenate[State, CurrentUser, Params], Awaitable[Result]],
    ) -> Callable[Concatenate[State, Params], Coroutine[Any, Any, Result | EventSpec]]:
        signature = inspect.signature(handler)
        state_param, user_param, *event_params = signature.parameters.values()

        @functools.wraps(handler)
        async def guarded(
            self: State, *args: Params.args, **kwargs: Params.kwargs
        ) -> Result | EventSpec:
            user = await self._authenticate()
            if user is None:
                return self._to_login()
            if role is Role.ADMIN and not user.is_admin:
                return rx.redirect("/forbidden")
            return await handler(self, user, *args, **kwargs)

        # Reflex reads what an event carries from the handler's signature and annotations:
        # the user comes from the guard, never from the browser, so it is not among them.
        vars(guarded)["__signature__"] = signature.replace(parameters=[state_param, *event_params])
        guarded.__annotations__ = {
            name: hint for name, hint in handler.__annotations__.items() if name != user_param.name
        }
        vars(guarded)[_GUARD] = role
        return guarded

    return decorate


signed_in = _guard(Role.SIGNED_IN)
admin_only = _guard(Role.ADMIN)


def guard_of(handler: Callable[..., Any]) -> Role | None:
    """The role a handler function was guarded for, or None."""
    role = vars(handler).get(_GUARD) if hasattr(handler, "__dict__") else None
    return role if isinstance(role, Role) else None


def unguarded_handlers(state: type[BaseState], role: Role) -> list[str]:
    """The event handlers `state` itself defines without the guard for `role`. Read from the
    class body, so it answers while the class is being made as well as after Reflex has
    registered it. Reflex's own `setvar` is left aside: it only calls the `set_...` setters a
    state defines, and those would be handlers here."""
    unguarded = []
    for name, value in vars(state).items():
        if isinstance(value, EventHandlerSetVar):
            continue
        if isinstance(value, EventHandler):
            function = value.fn
        elif not name.startswith("_") and inspect.isfunction(value):
            function = value  # not yet registered by Reflex: every public function is a handler
        else:
            continue
        if function is None or guard_of(function) is not role:
            unguarded.append(name)
    return sorted(unguarded)
