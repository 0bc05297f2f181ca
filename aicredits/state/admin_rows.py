"""The admin console's display rows: what each table row shows, as strings, from what the
services return. Dates are UTC to the minute; credits have thousands separators."""

from __future__ import annotations

from datetime import datetime

from aicredits.domain import spikes
from aicredits.domain.money import format_money, grouped
from aicredits.services.admin_payments import UnmatchedView
from aicredits.services.admin_views import (
    AuditRow,
    FlagRow,
    HoldRow,
    LedgerLineView,
    LimitedAddress,
    ModelUsage,
    Overview,
    Spender,
    SpikeAlert,
    UsageLine,
    UserSummary,
)
from aicredits.services.auto_topup import AutoTopUpView, TopUpLine
from aicredits.services.pricing import ModelPrices, PriceVersionView
from aicredits.services.purchases import PurchaseView
from aicredits.services.reconciliation import Discrepancy, KeptRun


def _when(moment: datetime | None, default: str = "") -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else default


def _n(value: int) -> str:
    return f"{value:,}"


def _signed(value: int) -> str:
    return f"{value:+,}"


def _who(email: str | None, name: str) -> str:
    return email or name or "(no email)"


def user_row(u: UserSummary) -> dict[str, str]:
    flags = (["suspended"] if u.is_suspended else []) + list(u.open_flags)
    return {
        "id": str(u.id),
        "email": u.email or "",
        "name": u.name,
        "balance": _n(u.balance),
        "held": _n(u.held),
        "available": _n(u.available),
        "purchased": _n(u.total_purchased),
        "flags": ", ".join(f.replace("_", " ") for f in flags),
        "last_activity": _when(u.last_activity, "never"),
        "created": _when(u.created_at),
        "suspended": "yes" if u.is_suspended else "",
        "href": f"/admin/user?id={u.id}",
    }


def ledger_row(e: LedgerLineView) -> dict[str, str]:
    return {
        "id": str(e.id),
        "date": _when(e.created_at),
        "kind": e.kind,
        "amount": _signed(e.amount),
        "balance_after": _n(e.balance_after),
        "actor": e.actor,
        "reason": e.reason,
    }


def hold_row(h: HoldRow) -> dict[str, str]:
    return {
        "id": str(h.id),
        "request_id": h.request_id,
        "amount": _n(h.amount),
        "status": h.status,
        "charged": "" if h.charged is None else _n(h.charged),
        "created": _when(h.created_at),
        "expires": _when(h.expires_at),
    }


def purchase_row(p: PurchaseView) -> dict[str, str]:
    return {
        "id": str(p.id),
        "date": _when(p.created_at),
        "pack": p.pack_id,
        "amount": format_money(p.amount, p.currency),
        "credits": _n(p.credits),
        "status": p.status_label,
        "clawed_back": _n(p.credits_clawed_back),
        "shortfall": _n(p.credits_shortfall),
        "session": p.checkout_session_id,
    }


def usage_row(u: UsageLine) -> dict[str, str]:
    return {
        "id": str(u.id),
        "date": _when(u.created_at),
        "model": u.model,
        "price_version": str(u.price_version_id),
        "tokens": f"{u.input_tokens:,} in / {u.output_tokens:,} out"
        + (" (estimated)" if u.estimated else ""),
        "cost": _n(u.cost),
        "charged": _n(u.charged),
        "unbilled": _n(u.unbilled),
        "outcome": u.outcome,
    }


def flag_row(f: FlagRow) -> dict[str, str]:
    return {
        "id": str(f.id),
        "kind": f.kind.replace("_", " "),
        "amount": _n(f.amount),
        "detail": f.detail,
        "created": _when(f.created_at),
        "open": "" if f.cleared_at else "yes",
        "cleared": (
            f"cleared {_when(f.cleared_at)} by {f.cleared_by}: {f.clear_note}"
            if f.cleared_at
            else ""
        ),
    }


def audit_row(a: AuditRow) -> dict[str, str]:
    target = ""
    if a.target_user_id is not None:
        target = a.target_email or f"user {a.target_user_id}"
    return {
        "id": str(a.id),
        "date": _when(a.created_at),
        "actor": a.actor_email,
        "action": a.action.replace("_", " "),
        "target": target,
        "target_href": f"/admin/user?id={a.target_user_id}" if a.target_user_id else "",
        "detail": a.detail,
        "reason": a.reason,
    }


def model_usage_row(m: ModelUsage) -> dict[str, str]:
    return {
        "model": m.model,
        "calls": _n(m.calls),
        "tokens": f"{m.input_tokens:,} in / {m.output_tokens:,} out",
        "cost": _n(m.cost),
        "charged": _n(m.charged),
        "unbilled": _n(m.unbilled),
    }


def spender_row(s: Spender) -> dict[str, str]:
    return {
        "user": _who(s.email, s.name),
        "href": f"/admin/user?id={s.user_id}",
        "spent": _n(s.spent),
    }


def spike_row(s: SpikeAlert) -> dict[str, str]:
    return {
        "id": str(s.user_id),
        "user": _who(s.email, s.name),
        "href": f"/admin/user?id={s.user_id}",
        "last_hour": _n(s.last_hour),
        "usual": spikes.usual_hourly_text(s.previous_week),
    }


def limited_address_row(a: LimitedAddress) -> dict[str, str]:
    return {
        "id": f"{a.address}-{a.day.isoformat()}",
        "address": a.address,
        "day": a.day.isoformat(),
        "granted": _n(a.granted),
        "refused": _n(a.refused),
    }


def totals_rows(o: Overview) -> list[dict[str, str]]:
    return [
        {"id": "sold", "label": "Credits sold", "value": _n(o.credits_sold)},
        {"id": "spent", "label": "Credits spent", "value": _n(o.credits_spent)},
        {"id": "granted", "label": "Credits granted", "value": _n(o.credits_granted)},
        {"id": "clawed-back", "label": "Clawed back (refunds)", "value": _n(o.credits_clawed_back)},
        {"id": "expired", "label": "Expired", "value": _n(o.credits_expired)},
        {"id": "adjusted", "label": "Adjustments (net)", "value": _signed(o.adjustments_net)},
    ]


def price_version_row(v: PriceVersionView) -> dict[str, str]:
    return {
        "id": str(v.version_id),
        "model": v.model,
        "input": _n(v.input_per_mtok),
        "output": _n(v.output_per_mtok),
        "from": _when(v.effective_from),
        "status": v.status,
        "by": v.created_by,
        "created": _when(v.created_at),
    }


def current_price_row(m: ModelPrices) -> dict[str, str]:
    current = m.current
    return {
        "model": m.model,
        "input": _n(current.input_per_mtok) if current else "—",
        "output": _n(current.output_per_mtok) if current else "—",
        "since": _when(current.effective_from) if current else "no price yet",
        "scheduled": str(sum(1 for v in m.versions if v.status == "scheduled")),
        "configured": "yes" if m.configured else "no (not served)",
    }


def window_text(since: datetime, until: datetime) -> str:
    return f"{_when(since)} to {_when(until)}"


def expiring_row(at: datetime, credits: int) -> dict[str, str]:
    return {"date": _when(at), "credits": _n(credits)}


def reconciliation_summary(run: KeptRun | None) -> dict[str, str]:
    """The last reconciliation's header: when, who, the window, what it checked and fixed."""
    if run is None:
        return {}
    if run.stripe_checked:
        checked = f"{_n(run.sessions_checked)} sessions and {_n(run.refunds_checked)} refunds"
    else:
        checked = "unmatched payments only (no STRIPE_SECRET_KEY: Stripe was not walked)"
    return {
        "started": _when(run.started_at),
        "finished": _when(run.finished_at, "did not finish"),
        "trigger": {"job": "the daily job", "cli": "the command line", "admin": "an admin"}.get(
            run.trigger, run.trigger
        ),
        "since": _when(run.since),
        "checked": checked,
        "found": _n(len(run.discrepancies)),
        "fixed": _n(run.fixed),
        "error": run.error,
    }


def discrepancy_row(d: Discrepancy) -> dict[str, str]:
    return {
        "kind": d.kind.replace("_", " "),
        "session": d.session_id,
        "detail": d.detail,
        "fixed": "fixed" if d.fixed else "",
    }


def unmatched_row(u: UnmatchedView) -> dict[str, str]:
    return {
        "id": str(u.id),
        "created": _when(u.created_at),
        "session": u.checkout_session_id,
        "event": u.event_id or "",
        "paid": u.paid,
        "reason": u.reason.replace("_", " "),
        "detail": u.detail,
        "source": u.source.replace("_", " "),
        "open": "" if u.cleared_at else "yes",
        "cleared": (
            f"cleared {_when(u.cleared_at)} by {u.cleared_by}: {u.clear_note}"
            if u.cleared_at
            else ""
        ),
    }


def auto_topup_rows(view: AutoTopUpView) -> list[dict[str, str]]:
    """A user's auto top-up settings as setting / value rows."""
    card = (
        f"{view.card_brand} •••• {view.card_last4}"
        + (f" (expires {view.card_exp})" if view.card_exp else "")
        + (" simulated" if view.card_simulated else "")
        if view.has_card
        else "none"
    )
    pairs = [
        ("On", "yes" if view.enabled else "no"),
        ("Threshold", f"{view.threshold:,} credits"),
        ("Pack", view.pack_id),
        ("Monthly limit", f"{view.monthly_cap} ({view.this_month} this month)"),
        ("Card", card),
        ("Failures in a row", str(view.consecutive_failures)),
        ("Banner", view.notice or "none"),
    ]
    return [{"id": str(i), "setting": k, "value": v} for i, (k, v) in enumerate(pairs)]


def topup_row(line: TopUpLine) -> dict[str, str]:
    return {
        "id": str(line.id),
        "date": line.created_at.strftime("%Y-%m-%d %H:%M"),
        "pack": line.pack_id,
        "amount": line.amount,
        "credits": grouped(line.credits),
        "status": line.status,
        "failure": line.failure,
        "payment_intent": line.payment_intent_id or "",
    }
