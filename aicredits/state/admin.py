"""The admin console's state. Every handler checks the admin role itself, on the server."""

from __future__ import annotations

import asyncio

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.adapters.db import get_database
from aicredits.services import users
from aicredits.state.session import SessionState


class AdminState(SessionState):
    user_count: int = 0
    refused: str = ""

    @rx.event
    async def load(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        if not user.is_admin:
            self.refused = "admin only"
            return rx.redirect("/forbidden")
        self.user_count = await asyncio.to_thread(users.count_users, get_database())
        return None
