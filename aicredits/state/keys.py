"""The API keys page's state. Every handler checks the session itself, on the server: any
handler can be called by a crafted websocket message, whatever the page shows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.domain.errors import AICreditsError
from aicredits.services import api_keys
from aicredits.services.api_keys import ApiKeyView
from aicredits.services.runtime import get_database, run_blocking
from aicredits.state.session import SessionState

# The limits the page states; the service enforces them.
MAX_ACTIVE_KEYS = api_keys.MAX_ACTIVE_KEYS
MAX_NAME_LENGTH = api_keys.MAX_NAME_LENGTH


def _when(moment: datetime | None, default: str = "") -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else default


def key_row(key: ApiKeyView) -> dict[str, str]:
    """A key as the table shows it (display strings only: never the secret, which is not kept)."""
    return {
        "id": str(key.id),
        "name": key.name,
        "prefix": key.prefix + "…",
        "created": _when(key.created_at),
        "last_used": _when(key.last_used_at, "never"),
        "status": "revoked" if key.revoked_at else "active",
    }


class KeysState(SessionState):
    keys: list[dict[str, str]] = []
    # The full key, set only right after it is made; cleared by "Done" and on every load.
    new_key_secret: str = ""
    error: str = ""

    @rx.event
    async def load(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        await self._refresh_balance(user)
        self.new_key_secret = ""
        self.error = ""
        listed = await run_blocking(api_keys.list_api_keys, get_database(), user_id=user.id)
        self.keys = [key_row(k) for k in listed]
        return None

    @rx.event
    async def create(self, form_data: dict[str, Any]) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        name = form_data.get("name")
        self.new_key_secret = ""
        try:
            new = await run_blocking(
                api_keys.create_api_key,
                get_database(),
                user_id=user.id,
                name=name if isinstance(name, str) else "",
            )
        except AICreditsError as exc:
            self.error = str(exc)
            return None
        self.error = ""
        self.new_key_secret = new.secret
        self.keys = [key_row(new.key), *self.keys]
        return None

    @rx.event
    async def revoke(self, key_id: str) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        try:
            wanted = int(str(key_id).strip())
        except ValueError:
            self.error = "There is no such API key."
            return None
        try:
            revoked = await run_blocking(
                api_keys.revoke_api_key, get_database(), user_id=user.id, key_id=wanted
            )
        except AICreditsError as exc:
            self.error = str(exc)
            return None
        self.error = ""
        row = key_row(revoked)
        self.keys = [row if k["id"] == row["id"] else k for k in self.keys]
        return None

    @rx.event
    async def dismiss_new_key(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        self.new_key_secret = ""
        return None
