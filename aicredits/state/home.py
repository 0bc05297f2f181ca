"""The home page's state: read once on load, through one service call."""

from __future__ import annotations

import reflex as rx

from aicredits.services.catalog import describe_database, list_model_offers
from aicredits.services.runtime import get_database, run_blocking
from aicredits.settings import get_settings
from aicredits.state.session import SessionState, provider_buttons


class HomeState(SessionState):
    models: list[dict[str, str]] = []
    database: str = ""
    providers: list[dict[str, str]] = []

    @rx.event
    async def load(self) -> None:
        await self._load_visitor()
        settings = get_settings()
        self.providers = provider_buttons()
        self.database = describe_database(settings)
        self.models = [
            {
                "id": offer.id,
                "label": offer.label,
                "input": offer.input_per_1k,
                "output": offer.output_per_1k,
            }
            for offer in await run_blocking(list_model_offers, get_database(), settings)
        ]
