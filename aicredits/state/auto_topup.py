"""The auto top-up section of /credits: the saved card, "when my credits fall below X, buy
pack Y", the monthly limit, what happened lately, and the banner of a failed top-up.

Every handler checks the session itself, on the server."""

from __future__ import annotations

from typing import Any

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.domain.auto_topup import InvalidAutoTopUp
from aicredits.domain.money import grouped
from aicredits.services import auto_topup
from aicredits.services.auto_topup import AutoTopUpView, TopUpLine
from aicredits.services.packs import pack_label
from aicredits.services.payment_errors import PaymentError
from aicredits.services.runtime import get_database, run_blocking
from aicredits.services.stripe_config import simulated_checkout_enabled
from aicredits.settings import get_settings
from aicredits.state.session import SessionState

_STATUS = {
    "processing": "Processing",
    "succeeded": "Paid",
    "failed": "Failed",
    "requires_action": "Needs authentication",
}


def topup_row(line: TopUpLine, label: str) -> dict[str, str]:
    return {
        "id": str(line.id),
        "date": line.created_at.strftime("%Y-%m-%d %H:%M UTC"),
        "pack": label,
        "amount": line.amount,
        "credits": grouped(line.credits),
        "status": _STATUS.get(line.status, line.status),
        "failure": line.failure,
    }


def _int(value: Any) -> int | None:
    try:
        return int(str(value).replace(",", "").strip())
    except ValueError:
        return None


class AutoTopUpState(SessionState):
    topup_enabled: bool = False
    topup_threshold: str = ""
    topup_pack: str = ""
    topup_cap: str = ""
    topup_this_month: str = "0"
    has_card: bool = False
    card_text: str = ""  # "visa •••• 4242, expires 12/2031"
    card_simulated: bool = False
    topup_history: list[dict[str, str]] = []
    topup_error: str = ""
    topup_saved: str = ""
    # Development only: the simulated card's next charge ("" succeeds).
    simulate_available: bool = False
    simulate_next: str = ""

    def _show_topup(self, view: AutoTopUpView) -> None:
        settings = get_settings()
        self.topup_enabled = view.enabled
        threshold = auto_topup.form_threshold(settings, view)
        self.topup_threshold = str(threshold) if threshold else ""
        self.topup_pack = view.pack_id
        self.topup_cap = str(view.monthly_cap)
        self.topup_this_month = str(view.this_month)
        self.has_card = view.has_card
        self.card_text = (
            f"{view.card_brand.title()} •••• {view.card_last4}"
            + (f", expires {view.card_exp}" if view.card_exp else "")
            if view.has_card
            else ""
        )
        self.card_simulated = view.card_simulated
        self.topup_history = [
            topup_row(line, pack_label(settings, line.pack_id)) for line in view.history
        ]
        self.simulate_available = simulated_checkout_enabled(settings)
        self.simulate_next = view.simulate_next or "succeed"

    async def _reload(self, user_id: int) -> None:
        view = await run_blocking(auto_topup.view, get_database(), get_settings(), user_id=user_id)
        self._show_topup(view)

    @rx.event
    async def load(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        self.topup_error = self.topup_saved = ""
        card_session = self.router.url.query_parameters.get("card_session") or ""
        if card_session:
            try:
                saved = await run_blocking(
                    auto_topup.confirm_card_setup,
                    get_database(),
                    get_settings(),
                    user_id=user.id,
                    session_id=str(card_session)[:255],
                )
            except PaymentError as exc:
                self.topup_error = exc.message
            else:
                self.topup_saved = "Card saved." if saved else ""
        await self._reload(user.id)
        return None

    @rx.event
    async def save(self, form_data: dict[str, Any]) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        threshold, cap = _int(form_data.get("threshold")), _int(form_data.get("monthly_cap"))
        self.topup_saved = ""
        if threshold is None:
            self.topup_error = "The threshold must be a whole number of credits, such as 1000."
            return None
        if cap is None:
            self.topup_error = "The monthly limit must be a whole number of top-ups, such as 4."
            return None
        try:
            await run_blocking(
                auto_topup.save_settings,
                get_database(),
                get_settings(),
                user_id=user.id,
                enabled=form_data.get("enabled") in ("on", "true", True),
                threshold=threshold,
                pack_id=str(form_data.get("pack") or ""),
                monthly_cap=cap,
            )
        except (InvalidAutoTopUp, PaymentError) as exc:
            self.topup_error = exc.message
            return None
        self.topup_error, self.topup_saved = "", "Auto top-up settings saved."
        await self._reload(user.id)
        await self._refresh_balance(user)
        return None

    @rx.event
    async def set_enabled(self, value: bool) -> None:
        # The switch only changes the form; "Save" applies it.
        self.topup_enabled = bool(value)

    @rx.event
    async def set_pack(self, value: str) -> None:
        self.topup_pack = str(value)

    @rx.event
    async def add_card(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        try:
            url = await run_blocking(
                auto_topup.start_card_setup, get_database(), get_settings(), user_id=user.id
            )
        except PaymentError as exc:
            self.topup_error = exc.message
            return None
        if url.startswith("/"):  # a simulated card: saved already
            self.topup_error, self.topup_saved = "", "Simulated card saved."
            await self._reload(user.id)
            return None
        return rx.redirect(url, is_external=True)

    @rx.event
    async def remove_card(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        try:
            await run_blocking(
                auto_topup.remove_card, get_database(), get_settings(), user_id=user.id
            )
        except PaymentError as exc:
            self.topup_error = exc.message
            return None
        self.topup_error, self.topup_saved = "", "Card removed; auto top-up is off."
        await self._reload(user.id)
        await self._refresh_balance(user)
        return None

    @rx.event
    async def simulate(self, outcome: str) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        wanted = "" if outcome == "succeed" else str(outcome)
        try:
            await run_blocking(
                auto_topup.set_simulated_outcome,
                get_database(),
                get_settings(),
                user_id=user.id,
                outcome=wanted,
            )
        except (InvalidAutoTopUp, PaymentError) as exc:
            self.topup_error = exc.message
            return None
        self.simulate_next = outcome
        return None
