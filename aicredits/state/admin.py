"""The admin console's state. Every handler checks the admin role itself, on the server, before
anything else: any handler can be called by a crafted websocket message, whatever the page
shows. A refused call changes none of this state's vars.

Forms carry a random token in a hidden field, made when the form is rendered. The handler
reads it from the submitted form, never from this state, so a form submitted twice sends the
same token twice and the services apply it once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.adapters.blocking import run_blocking
from aicredits.adapters.db import get_database
from aicredits.domain.errors import AICreditsError
from aicredits.domain.money import format_money
from aicredits.services import admin
from aicredits.services.admin import (
    AdminActor,
    AuditRow,
    FlagRow,
    HoldRow,
    LedgerLineView,
    LimitedAddress,
    ModelPrices,
    ModelUsage,
    Overview,
    PriceVersionView,
    Spender,
    SpikeAlert,
    UsageRow,
    UserDetail,
    UserSummary,
)
from aicredits.services.auth import CurrentUser
from aicredits.services.purchases import PurchaseView
from aicredits.settings import get_settings
from aicredits.state.session import SessionState

# --- display rows (strings only) --------------------------------------------------------------


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


def usage_row(u: UsageRow) -> dict[str, str]:
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
        "usual": f"{float(s.usual_hourly):,.1f}",
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


# --- the state --------------------------------------------------------------------------------


class AdminState(SessionState):
    # Messages and the rendered forms' token.
    error: str = ""
    notice: str = ""
    form_token: str = ""

    # Overview (/admin)
    user_count: int = 0
    window: str = ""
    totals: list[dict[str, str]] = []
    usage_by_model: list[dict[str, str]] = []
    top_spenders: list[dict[str, str]] = []
    spikes: list[dict[str, str]] = []
    spike_rule: str = ""
    limited_addresses: list[dict[str, str]] = []
    trial_rule: str = ""

    # Users (/admin/users)
    user_query: str = ""
    users: list[dict[str, str]] = []
    users_total: int = 0
    users_page: int = 1
    users_pages: int = 1

    # One user (/admin/user?id=N)
    target: dict[str, str] = {}
    ledger: list[dict[str, str]] = []
    holds: list[dict[str, str]] = []
    purchases: list[dict[str, str]] = []
    usage: list[dict[str, str]] = []
    flags: list[dict[str, str]] = []
    expiring: list[dict[str, str]] = []
    user_audit: list[dict[str, str]] = []

    # Audit log (/admin/audit)
    audit: list[dict[str, str]] = []
    audit_total: int = 0
    audit_page: int = 1
    audit_pages: int = 1

    # Prices (/admin/prices)
    current_prices: list[dict[str, str]] = []
    price_versions: list[dict[str, str]] = []
    model_ids: list[str] = []

    # Set by an action that reloads its page next, so the reload keeps its message.
    _keep_messages: bool = False

    def _refuse(self, user: CurrentUser | None) -> EventSpec:
        """Where a caller who is not a signed-in admin goes. Changes nothing of this state."""
        return self._to_login() if user is None else rx.redirect("/forbidden")

    @staticmethod
    def _actor(user: CurrentUser) -> AdminActor:
        return AdminActor(user_id=user.id, email=user.email or f"user-{user.id}")

    def _start_load(self) -> None:
        if not self._keep_messages:
            self.error = ""
            self.notice = ""
        self._keep_messages = False
        self.form_token = admin.new_form_token()

    def _done(self, result: admin.ActionResult, reload: EventSpec | Any) -> list[Any]:
        already = " (this form had already been submitted: nothing changed now)"
        self.error = ""
        self.notice = "Done: " + result.detail + (already if result.replayed else "") + "."
        self._keep_messages = True
        self.form_token = admin.new_form_token()
        return [reload]

    def _fail(self, exc: AICreditsError) -> None:
        self.notice = ""
        self.error = admin.describe_error(exc)

    # --- overview -----------------------------------------------------------------------------

    @rx.event
    async def load(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        self._start_load()
        settings = get_settings()
        seen = await run_blocking(
            admin.overview,
            get_database(),
            spike_factor=settings.spike_factor,
            spike_min_credits=settings.spike_min_credits,
        )
        self.user_count = seen.user_count
        self.window = f"{_when(seen.since)} to {_when(seen.until)}"
        self.totals = totals_rows(seen)
        self.usage_by_model = [model_usage_row(m) for m in seen.usage_by_model]
        self.top_spenders = [spender_row(s) for s in seen.top_spenders]
        self.spikes = [spike_row(s) for s in seen.spikes]
        self.spike_rule = (
            f"spent at least {settings.spike_min_credits:,} credits in the last hour, and more "
            f"than {settings.spike_factor:g} times their average hourly spend over the 7 days "
            "before it"
        )
        self.limited_addresses = [limited_address_row(a) for a in seen.limited_addresses]
        self.trial_rule = admin.trial_limit_rule(settings)
        return None

    # --- users --------------------------------------------------------------------------------

    async def _show_users(self, query: str, page: int) -> None:
        found = await run_blocking(admin.search_users, get_database(), query=query, page=page)
        self.user_query = found.query
        self.users = [user_row(u) for u in found.users]
        self.users_total = found.total
        self.users_page = found.page
        self.users_pages = found.pages

    @rx.event
    async def load_users(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        self._start_load()
        await self._show_users(self.user_query, self.users_page)
        return None

    @rx.event
    async def search_users(self, form_data: dict[str, Any]) -> EventSpec | None:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        query = form_data.get("q")
        await self._show_users(query if isinstance(query, str) else "", 1)
        return None

    @rx.event
    async def users_next_page(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        await self._show_users(self.user_query, self.users_page + 1)
        return None

    @rx.event
    async def users_previous_page(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        await self._show_users(self.user_query, self.users_page - 1)
        return None

    # --- one user -----------------------------------------------------------------------------

    def _show_detail(self, detail: UserDetail) -> None:
        self.target = user_row(detail.user)
        self.ledger = [ledger_row(e) for e in detail.ledger]
        self.holds = [hold_row(h) for h in detail.holds]
        self.purchases = [purchase_row(p) for p in detail.purchases]
        self.usage = [usage_row(u) for u in detail.usage]
        self.flags = [flag_row(f) for f in detail.flags]
        self.expiring = [{"date": _when(at), "credits": _n(c)} for at, c in detail.expiring]
        self.user_audit = [audit_row(a) for a in detail.audit]

    def _clear_detail(self) -> None:
        self.target = {}
        self.ledger, self.holds, self.purchases, self.usage = [], [], [], []
        self.flags, self.expiring, self.user_audit = [], [], []

    @rx.event
    async def load_user(self) -> EventSpec | None:
        """on_load of /admin/user?id=N, and the reload after each action on that page."""
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        self._start_load()
        try:
            wanted = admin.parse_id(self.router.url.query_parameters.get("id"))
            detail = await run_blocking(admin.user_detail, get_database(), user_id=wanted)
        except AICreditsError as exc:
            self._clear_detail()
            self._fail(exc)
            return None
        self._show_detail(detail)
        return None

    async def _credit_action(
        self, user: CurrentUser, action: Any, form_data: dict[str, Any], **extra: Any
    ) -> admin.ActionResult | None:
        """Run one of the two balance actions from its form; None (with the error shown)
        when the service refuses it. Refreshes the header when admins change themselves."""
        try:
            result: admin.ActionResult = await run_blocking(
                action,
                get_database(),
                actor=self._actor(user),
                user_id=admin.parse_id(form_data.get("user_id")),
                credits=admin.parse_credits(form_data.get("credits")),
                reason=str(form_data.get("reason") or ""),
                form_token=str(form_data.get("form_token") or ""),
                **extra,
            )
        except AICreditsError as exc:
            self._fail(exc)
            return None
        if result.target_user_id == user.id:
            await self._refresh_balance(user)
        return result

    @rx.event
    async def adjust_balance(self, form_data: dict[str, Any]) -> Any:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        result = await self._credit_action(user, admin.adjust_balance, form_data)
        if result is None:
            return None
        return [
            *self._done(result, AdminState.load_user),
            rx.set_value("adjust-credits", ""),
            rx.set_value("adjust-reason", ""),
        ]

    @rx.event
    async def grant_credits(self, form_data: dict[str, Any]) -> Any:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        try:
            days = admin.parse_optional_days(form_data.get("expires_in_days"))
        except AICreditsError as exc:
            self._fail(exc)
            return None
        result = await self._credit_action(
            user, admin.grant_credits, form_data, expires_in_days=days
        )
        if result is None:
            return None
        return [
            *self._done(result, AdminState.load_user),
            rx.set_value("grant-credits", ""),
            rx.set_value("grant-reason", ""),
            rx.set_value("grant-days", ""),
        ]

    async def _set_suspension(
        self, user: CurrentUser, form_data: dict[str, Any], *, suspended: bool
    ) -> Any:
        try:
            result = await run_blocking(
                admin.set_suspension,
                get_database(),
                actor=self._actor(user),
                user_id=admin.parse_id(form_data.get("user_id")),
                suspended=suspended,
                reason=str(form_data.get("reason") or ""),
                form_token=str(form_data.get("form_token") or ""),
            )
        except AICreditsError as exc:
            self._fail(exc)
            return None
        return [*self._done(result, AdminState.load_user), rx.set_value("suspension-reason", "")]

    @rx.event
    async def suspend_user(self, form_data: dict[str, Any]) -> Any:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        return await self._set_suspension(user, form_data, suspended=True)

    @rx.event
    async def unsuspend_user(self, form_data: dict[str, Any]) -> Any:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        return await self._set_suspension(user, form_data, suspended=False)

    @rx.event
    async def clear_flag(self, form_data: dict[str, Any]) -> Any:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        try:
            result = await run_blocking(
                admin.clear_flag,
                get_database(),
                actor=self._actor(user),
                flag_id=admin.parse_id(form_data.get("flag_id"), what="flag"),
                note=str(form_data.get("note") or ""),
                form_token=str(form_data.get("form_token") or ""),
            )
        except AICreditsError as exc:
            self._fail(exc)
            return None
        return self._done(result, AdminState.load_user)

    # --- audit log ----------------------------------------------------------------------------

    async def _show_audit(self, page: int) -> None:
        found = await run_blocking(admin.list_audit, get_database(), page=page)
        self.audit = [audit_row(a) for a in found.rows]
        self.audit_total = found.total
        self.audit_page = found.page
        self.audit_pages = found.pages

    @rx.event
    async def load_audit(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        self._start_load()
        await self._show_audit(1)
        return None

    @rx.event
    async def audit_next_page(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        await self._show_audit(self.audit_page + 1)
        return None

    @rx.event
    async def audit_previous_page(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        await self._show_audit(self.audit_page - 1)
        return None

    # --- prices -------------------------------------------------------------------------------

    @rx.event
    async def load_prices(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        self._start_load()
        configured = [m.id for m in get_settings().models]
        listed = await run_blocking(admin.list_prices, get_database(), configured_models=configured)
        self.current_prices = [current_price_row(m) for m in listed]
        self.price_versions = [price_version_row(v) for m in listed for v in m.versions]
        self.model_ids = [m.model for m in listed if m.configured]
        return None

    @rx.event
    async def add_price(self, form_data: dict[str, Any]) -> Any:
        user = await self._authenticate()
        if user is None or not user.is_admin:
            return self._refuse(user)
        try:
            result = await run_blocking(
                admin.add_price,
                get_database(),
                actor=self._actor(user),
                model=str(form_data.get("model") or ""),
                input_per_mtok=admin.parse_credits(
                    form_data.get("input_per_mtok"), what="the input price"
                ),
                output_per_mtok=admin.parse_credits(
                    form_data.get("output_per_mtok"), what="the output price"
                ),
                reason=str(form_data.get("reason") or ""),
                form_token=str(form_data.get("form_token") or ""),
                known_models=[m.id for m in get_settings().models],
                effective_from=admin.parse_effective_from(form_data.get("effective_from")),
            )
        except AICreditsError as exc:
            self._fail(exc)
            return None
        return [
            *self._done(result, AdminState.load_prices),
            rx.set_value("price-input", ""),
            rx.set_value("price-output", ""),
            rx.set_value("price-from", ""),
            rx.set_value("price-reason", ""),
        ]
