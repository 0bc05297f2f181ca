"""The sign-in page: which providers to offer and where to land afterwards."""

from __future__ import annotations

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.domain.identity import safe_next_path
from aicredits.services import auth
from aicredits.settings import get_settings
from aicredits.state.session import SessionState, provider_buttons


class LoginState(SessionState):
    providers: list[dict[str, str]] = []
    next_path: str = "/chat"
    dev_sign_in: bool = False

    @rx.event
    async def load(self) -> EventSpec | None:
        settings = get_settings()
        self.next_path = safe_next_path(self.router.url.query_parameters.get("next"))
        self.providers = provider_buttons()
        self.dev_sign_in = auth.dev_sign_in(settings)
        if await self._authenticate() is not None:
            return rx.redirect(self.next_path)  # already signed in
        return None
