"""The credits pages' state: the packs, the purchase history, and the checkout's return.

Every handler checks the session itself, on the server: any handler can be called by a
crafted websocket message, whatever the page shows."""

from __future__ import annotations

import asyncio

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.adapters.db import get_database
from aicredits.services import payments
from aicredits.services.payments import FulfilmentStatus, PackOffer, PaymentError, PurchaseView
from aicredits.settings import get_settings
from aicredits.state.session import SessionState, login_path


def pack_row(pack: PackOffer) -> dict[str, str]:
    price = pack.price or "Price set at checkout"
    return {
        "id": pack.id,
        "label": pack.label,
        "offer": f"{price} — {pack.credits:,} credits",
    }


def purchase_row(purchase: PurchaseView, labels: dict[str, str]) -> dict[str, str]:
    """A purchase as the history table shows it (display strings only)."""
    return {
        "id": str(purchase.id),
        "date": purchase.created_at.strftime("%Y-%m-%d %H:%M UTC"),
        "pack": labels.get(purchase.pack_id, purchase.pack_id),
        "amount": payments.format_money(purchase.amount, purchase.currency),
        "credits": f"{purchase.credits:,}",
        "status": purchase.status_label,
        "receipt_url": purchase.receipt_url or "",
    }


class CreditsState(SessionState):
    simulated: bool = False
    packs: list[dict[str, str]] = []
    purchases: list[dict[str, str]] = []
    # The success page: credited | processing | failed | cancelled | unknown ("" = checking)
    outcome: str = ""
    outcome_credits: str = ""
    outcome_message: str = ""

    @rx.event
    async def load(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        settings = get_settings()
        offers = payments.list_packs(settings)
        self.simulated = settings.simulated_checkout
        self.packs = [pack_row(p) for p in offers]
        history = await asyncio.to_thread(payments.list_purchases, get_database(), user_id=user.id)
        labels = {p.id: p.label for p in offers}
        self.purchases = [purchase_row(p, labels) for p in history]
        await self._refresh_balance(user)
        return None

    @rx.event
    async def confirm(self) -> EventSpec | None:
        """on_load of the success page: fulfil the session (the same function as the webhook)."""
        session_id = self.router.url.query_parameters.get("session_id") or ""
        user = await self._authenticate()
        if user is None:
            return rx.redirect(login_path(f"/credits/success?session_id={session_id}"))
        self.outcome = ""
        try:
            result = await asyncio.to_thread(
                payments.confirm_checkout,
                get_database(),
                get_settings(),
                user_id=user.id,
                session_id=str(session_id),
            )
        except PaymentError as exc:
            self.outcome = "unknown"
            self.outcome_credits = ""
            self.outcome_message = exc.message
        else:
            self.outcome = str(result.status)
            self.outcome_credits = f"{result.credits:,}"
            self.outcome_message = _MESSAGES[result.status].format(credits=f"{result.credits:,}")
        await self._refresh_balance(user)
        return None


_MESSAGES = {
    FulfilmentStatus.CREDITED: "Payment received, {credits} credits added.",
    FulfilmentStatus.PROCESSING: (
        "Your payment is still processing. The {credits} credits are added as soon as it "
        "clears; you can leave this page."
    ),
    FulfilmentStatus.FAILED: "The payment failed. Nothing was charged and no credits were added.",
    FulfilmentStatus.CANCELLED: "This checkout was cancelled. Nothing was charged.",
}
