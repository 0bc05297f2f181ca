"""The credits page's plan section: the user's plan this period, the plans for sale, and
the subscription invoices (display strings only). Subscribing and "Manage billing" are real
form posts to the backend (api/plan_routes.py), like "Buy".

Its one handler checks the session itself, on the server."""

from __future__ import annotations

from datetime import datetime

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.domain.money import format_money, grouped
from aicredits.services import subscriptions
from aicredits.services.plans import PlanOffer
from aicredits.services.runtime import get_database, run_blocking
from aicredits.services.subscriptions import InvoiceView, PlanUsage
from aicredits.settings import get_settings
from aicredits.state.session import SessionState

STATUS_LABELS = {
    "active": "Active",
    "trialing": "Trial",
    "past_due": "Payment failed",
    "canceled": "Cancelled",
}


def _date(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d") if moment else ""


def offer_row(offer: PlanOffer) -> dict[str, str]:
    price = offer.price or "Price set at checkout"
    return {
        "id": offer.id,
        "label": offer.label,
        "offer": f"{price} — {offer.included_credits:,} credits a month",
    }


def invoice_row(invoice: InvoiceView) -> dict[str, str]:
    status = {"paid": "Paid", "payment_failed": "Payment failed"}.get(
        invoice.status, invoice.status
    )
    return {
        "id": invoice.invoice_id,
        "date": invoice.created_at.strftime("%Y-%m-%d %H:%M UTC"),
        "plan": invoice.plan + (" (simulated)" if invoice.simulated else ""),
        "amount": format_money(invoice.amount, invoice.currency) if invoice.currency else "",
        "credits": grouped(invoice.credits),
        "status": status,
        "hosted_url": invoice.hosted_invoice_url or "",
        "pdf_url": invoice.invoice_pdf or "",
    }


class PlanState(SessionState):
    has_plan: bool = False
    plan_name: str = ""
    plan_status: str = ""
    past_due: bool = False
    past_due_usable: bool = True
    cancel_at_period_end: bool = False
    period_text: str = ""
    reset_date: str = ""
    included_text: str = "0"
    used_text: str = "0"
    remaining_text: str = "0"
    used_percent: int = 0
    has_overage: bool = False
    overage_text: str = ""
    plan_offers: list[dict[str, str]] = []
    invoices: list[dict[str, str]] = []

    def _show_usage(self, usage: PlanUsage | None) -> None:
        self.has_plan = usage is not None
        if usage is None:
            return
        self.plan_name = usage.plan
        self.plan_status = STATUS_LABELS.get(usage.status, usage.status)
        self.past_due = usage.status == "past_due"
        self.cancel_at_period_end = usage.cancel_at_period_end
        self.period_text = f"{_date(usage.period_start)} to {_date(usage.period_end)}"
        self.reset_date = _date(usage.period_end)
        self.included_text = grouped(usage.included)
        self.used_text = grouped(usage.used)
        self.remaining_text = grouped(usage.remaining)
        self.used_percent = min(100, usage.used * 100 // usage.included) if usage.included else 0
        self.has_overage = usage.overage_ceiling > 0
        self.overage_text = (
            f"Overage: {grouped(usage.overage_used)} of {grouped(usage.overage_ceiling)} "
            "credits this period, billed at its end"
        )

    @rx.event
    async def load(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        page = await run_blocking(
            subscriptions.billing_page, get_database(), get_settings(), user_id=user.id
        )
        self._show_usage(page.usage)
        self.past_due_usable = page.usable_when_past_due
        self.plan_offers = [offer_row(o) for o in page.offers]
        self.invoices = [invoice_row(i) for i in page.invoices]
        return None
