"""The home page's state: read once on load, through one service call."""

from __future__ import annotations

import reflex as rx

from aicredits.adapters.db import get_database
from aicredits.services.catalog import describe_database, list_model_offers
from aicredits.settings import get_settings


class HomeState(rx.State):
    models: list[dict[str, str]] = []
    database: str = ""

    @rx.event
    def load(self) -> None:
        settings = get_settings()
        self.database = describe_database(settings)
        self.models = [
            {
                "id": offer.id,
                "label": offer.label,
                "input": offer.input_per_1k,
                "output": offer.output_per_1k,
            }
            for offer in list_model_offers(get_database(), settings)
        ]
