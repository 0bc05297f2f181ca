"""The credits pages' state: the packs, the purchase history, and the checkout's return.

Every handler checks the session itself, on the server: any handler can be called by a
crafted websocket message, whatever the page shows."""

from __future__ import annotations

from typing import Any

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.domain.money import credits_text, format_money, grouped
from aicredits.services import checkout, dashboard
from aicredits.services.fulfilment import FulfilmentStatus
from aicredits.services.packs import PackOffer
from aicredits.services.payment_errors import PaymentError
from aicredits.services.purchases import PurchaseView
from aicredits.services.runtime import get_database, run_blocking
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
        "pack": labels.get(purchase.pack_id, purchase.pack_id)
        + (" (auto top-up)" if purchase.checkout_session_id.startswith("topup_") else ""),
        "amount": format_money(purchase.amount, purchase.currency),
        "credits": grouped(purchase.credits),
        "status": purchase.status_label,
        "receipt_url": purchase.receipt_url or "",
    }


def history_row(line: dashboard.HistoryLine) -> dict[str, str]:
    return {
        "id": str(line.id),
        "date": line.created_at.strftime("%Y-%m-%d %H:%M"),
        "kind": line.kind,
        "amount": f"{line.amount:+,}",
        "balance_after": grouped(line.balance_after),
        "reason": line.reason,
        "receipt_url": line.receipt_url or "",
    }


def chart_rows(days: list[dashboard.DayUsage], models: list[str]) -> list[dict[str, Any]]:
    return [
        {"day": d.day.strftime("%m-%d"), **{m: d.credits_by_model.get(m, 0) for m in models}}
        for d in days
    ]


class CreditsState(SessionState):
    simulated: bool = False
    packs: list[dict[str, str]] = []
    purchases: list[dict[str, str]] = []
    # The dashboard; counts as shown ("1,234"). All three from one read, so they always add up
    # (the header's balance is refreshed on its own, after each charge).
    available_credits_text: str = "0"
    held_credits: str = "0"
    total_credits: str = "0"
    available_money: str = ""
    total_money: str = ""
    expiring: list[dict[str, str]] = []
    allowance_size: int = 0
    allowance_size_text: str = ""
    allowance_used_text: str = ""
    allowance_percent: int = 0
    allowance_since: str = ""
    usage_chart: list[dict[str, Any]] = []
    has_usage: bool = False
    model_rows: list[dict[str, str]] = []
    history_rows: list[dict[str, str]] = []
    history_kind: str = "all"
    history_page: int = 1
    history_pages: int = 1

    def _history_kind(self) -> str | None:
        return None if self.history_kind == "all" else self.history_kind

    async def _load_history(self, user_id: int) -> None:
        lines, pages = await run_blocking(
            dashboard.history,
            get_database(),
            user_id=user_id,
            kind=self._history_kind(),
            page=self.history_page,
        )
        self._show_history(lines, pages)

    def _show_dashboard(self, page: dashboard.CreditsPage, models: list[str]) -> None:
        summary = page.summary
        self.available_credits_text = grouped(summary.available)
        self.held_credits, self.total_credits = grouped(summary.held), grouped(summary.total)
        self.available_money, self.total_money = summary.available_money, summary.total_money
        self.expiring = [
            {"date": when.strftime("%Y-%m-%d"), "credits": credits_text(amount)}
            for when, amount in summary.expiring
        ]
        self.allowance_size = summary.allowance.size
        self.allowance_size_text = grouped(summary.allowance.size)
        self.allowance_used_text = grouped(summary.allowance.used)
        self.allowance_percent = summary.allowance_percent
        self.allowance_since = (
            summary.allowance_since.strftime("%Y-%m-%d") if summary.allowance_since else ""
        )
        self.usage_chart = chart_rows(page.daily_usage, models)
        self.has_usage = bool(page.usage_by_model)
        self.model_rows = [
            {
                "model": m.model,
                "calls": grouped(m.calls),
                "input": grouped(m.input_tokens),
                "output": grouped(m.output_tokens),
                "credits": grouped(m.credits),
            }
            for m in page.usage_by_model
        ]
        self._show_history(page.history, page.history_pages)

    def _show_history(self, lines: list[dashboard.HistoryLine], pages: int) -> None:
        self.history_rows = [history_row(line) for line in lines]
        self.history_pages = pages
        self.history_page = min(self.history_page, pages)

    @rx.event
    async def show_history(self, kind: str) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        self.history_kind, self.history_page = kind, 1
        await self._load_history(user.id)
        return None

    @rx.event
    async def turn_history_page(self, step: int) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        self.history_page = max(1, self.history_page + int(step))
        await self._load_history(user.id)
        return None

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
        page = await run_blocking(
            dashboard.credits_page,
            get_database(),
            settings,
            user_id=user.id,
            history_kind=self._history_kind(),
            history_page=self.history_page,
        )
        self.simulated = settings.simulated_checkout
        self.packs = [pack_row(p) for p in page.packs]
        labels = {p.id: p.label for p in page.packs}
        self.purchases = [purchase_row(p, labels) for p in page.purchases]
        self._show_balance(page.available, page.usage)
        self.trial_notice = page.trial_notice
        self._show_dashboard(page, [m.id for m in settings.models])
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
            result = await run_blocking(
                checkout.confirm_checkout,
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
            self.outcome_credits = grouped(result.credits)
            self.outcome_message = _MESSAGES[result.status].format(credits=grouped(result.credits))
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
