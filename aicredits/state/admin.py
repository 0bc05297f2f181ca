"""The admin console's state: one class per page, each holding that page's vars and handlers,
on a small base with what every page shares (the messages, the forms' token).

Every handler is `@admin_only` (state/guards.py): it checks the admin role on the server before
anything else, since any handler can be called by a crafted websocket message, whatever the
page shows. A refused call changes none of these states' vars, and an admin state with a
handler that lacks the guard is refused when its class is defined.

Forms carry a random token in a hidden field, made when the form is rendered. The handler
reads it from the submitted form, never from this state, so a form submitted twice sends the
same token twice and the services apply it once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.domain.errors import AICreditsError
from aicredits.services import admin_actions, admin_payments, admin_views, auto_topup, pricing
from aicredits.services.admin_actions import ActionResult, AdminActor
from aicredits.services.admin_views import UserDetail
from aicredits.services.auth import CurrentUser
from aicredits.services.runtime import get_database, run_blocking
from aicredits.settings import get_settings
from aicredits.state import admin_forms, admin_rows
from aicredits.state.guards import Role, admin_only, unguarded_handlers
from aicredits.state.session import SessionState


class AdminPageState(SessionState):
    """What every admin page shares: its messages and the token of the forms it renders."""

    error: str = ""
    notice: str = ""
    form_token: str = ""

    # Set by an action that reloads its page next, so the reload keeps its message.
    _keep_messages: bool = False

    def __init_subclass__(cls, mixin: bool = False, **kwargs: Any) -> None:
        # Checked before Reflex registers the class: a refused class leaves no trace.
        if unguarded := unguarded_handlers(cls, Role.ADMIN):
            raise TypeError(f"{cls.__name__}: every admin handler is @admin_only, not {unguarded}")
        super().__init_subclass__(mixin=mixin, **kwargs)

    @staticmethod
    def _actor(user: CurrentUser) -> AdminActor:
        return AdminActor(user_id=user.id, email=user.email or f"user-{user.id}")

    async def _start_load(self, admin: CurrentUser) -> None:
        """A page's on_load, once its guard has let the admin in: the header's balance (the
        guard is the page's only sign-in check), fresh messages and a new form token."""
        await self._refresh_balance(admin)
        if not self._keep_messages:
            self.error = ""
            self.notice = ""
        self._keep_messages = False
        self.form_token = admin_actions.new_form_token()

    def _done(self, result: ActionResult, reload: EventSpec | Any) -> list[Any]:
        already = " (this form had already been submitted: nothing changed now)"
        self.error = ""
        self.notice = "Done: " + result.detail + (already if result.replayed else "") + "."
        self._keep_messages = True
        self.form_token = admin_actions.new_form_token()
        return [reload]

    def _fail(self, exc: AICreditsError) -> None:
        self.notice = ""
        self.error = admin_forms.admin_error_message(exc)


class AdminOverviewState(AdminPageState):
    """/admin: the money over the last 30 days, spike alerts, sign-ups past the trial limit."""

    user_count: int = 0
    window: str = ""
    totals: list[dict[str, str]] = []
    usage_by_model: list[dict[str, str]] = []
    top_spenders: list[dict[str, str]] = []
    spikes: list[dict[str, str]] = []
    spike_rule: str = ""
    limited_addresses: list[dict[str, str]] = []
    trial_rule: str = ""

    @rx.event
    @admin_only
    async def load(self, user: CurrentUser) -> EventSpec | None:
        await self._start_load(user)
        settings = get_settings()
        seen = await run_blocking(
            admin_views.overview,
            get_database(),
            spike_factor=settings.spike_factor,
            spike_min_credits=settings.spike_min_credits,
        )
        self.user_count = seen.user_count
        self.window = admin_rows.window_text(seen.since, seen.until)
        self.totals = admin_rows.totals_rows(seen)
        self.usage_by_model = [admin_rows.model_usage_row(m) for m in seen.usage_by_model]
        self.top_spenders = [admin_rows.spender_row(s) for s in seen.top_spenders]
        self.spikes = [admin_rows.spike_row(s) for s in seen.spikes]
        self.spike_rule = (
            f"spent at least {settings.spike_min_credits:,} credits in the last hour, and more "
            f"than {settings.spike_factor:g} times their average hourly spend over the 7 days "
            "before it"
        )
        self.limited_addresses = [admin_rows.limited_address_row(a) for a in seen.limited_addresses]
        self.trial_rule = admin_views.trial_limit_rule(settings)
        return None


class AdminUserSearchState(AdminPageState):
    """/admin/users: users found by email, name or id, a page at a time."""

    user_query: str = ""
    users: list[dict[str, str]] = []
    users_total: int = 0
    users_page: int = 1
    users_pages: int = 1

    async def _show_users(self, query: str, page: int) -> None:
        found = await run_blocking(admin_views.search_users, get_database(), query=query, page=page)
        self.user_query = found.query
        self.users = [admin_rows.user_row(u) for u in found.users]
        self.users_total = found.total
        self.users_page = found.page
        self.users_pages = found.pages

    @rx.event
    @admin_only
    async def load_users(self, user: CurrentUser) -> EventSpec | None:
        await self._start_load(user)
        await self._show_users(self.user_query, self.users_page)
        return None

    @rx.event
    @admin_only
    async def search_users(self, user: CurrentUser, form_data: dict[str, Any]) -> EventSpec | None:
        query = form_data.get("q")
        await self._show_users(query if isinstance(query, str) else "", 1)
        return None

    @rx.event
    @admin_only
    async def users_next_page(self, user: CurrentUser) -> EventSpec | None:
        await self._show_users(self.user_query, self.users_page + 1)
        return None

    @rx.event
    @admin_only
    async def users_previous_page(self, user: CurrentUser) -> EventSpec | None:
        await self._show_users(self.user_query, self.users_page - 1)
        return None


class AdminUserAccountState(AdminPageState):
    """/admin/user?id=N: one account, and the actions on it."""

    target: dict[str, str] = {}
    ledger: list[dict[str, str]] = []
    holds: list[dict[str, str]] = []
    purchases: list[dict[str, str]] = []
    usage: list[dict[str, str]] = []
    flags: list[dict[str, str]] = []
    expiring: list[dict[str, str]] = []
    user_audit: list[dict[str, str]] = []
    # Auto top-up: the user's settings, and their recent top-ups.
    topup_settings: list[dict[str, str]] = []
    topup_history: list[dict[str, str]] = []

    def _show_detail(self, detail: UserDetail) -> None:
        self.target = admin_rows.user_row(detail.user)
        self.ledger = [admin_rows.ledger_row(e) for e in detail.ledger]
        self.holds = [admin_rows.hold_row(h) for h in detail.holds]
        self.purchases = [admin_rows.purchase_row(p) for p in detail.purchases]
        self.usage = [admin_rows.usage_row(u) for u in detail.usage]
        self.flags = [admin_rows.flag_row(f) for f in detail.flags]
        self.expiring = [admin_rows.expiring_row(at, c) for at, c in detail.expiring]
        self.user_audit = [admin_rows.audit_row(a) for a in detail.audit]

    def _clear_detail(self) -> None:
        self.target = {}
        self.ledger, self.holds, self.purchases, self.usage = [], [], [], []
        self.flags, self.expiring, self.user_audit = [], [], []
        self.topup_settings, self.topup_history = [], []

    @rx.event
    @admin_only
    async def load_user(self, user: CurrentUser) -> EventSpec | None:
        """on_load of /admin/user?id=N, and the reload after each action on that page."""
        await self._start_load(user)
        try:
            wanted = admin_forms.parse_id(self.router.url.query_parameters.get("id"))
            detail = await run_blocking(admin_views.user_detail, get_database(), user_id=wanted)
        except AICreditsError as exc:
            self._clear_detail()
            self._fail(exc)
            return None
        self._show_detail(detail)
        topups = await run_blocking(
            auto_topup.view, get_database(), get_settings(), user_id=detail.user.id
        )
        self.topup_settings = admin_rows.auto_topup_rows(topups)
        self.topup_history = [admin_rows.topup_row(line) for line in topups.history]
        return None

    async def _credit_action(
        self,
        user: CurrentUser,
        action: Callable[..., ActionResult],
        form_data: dict[str, Any],
        **extra: Any,
    ) -> ActionResult | None:
        """Run one of the two balance actions from its form; None (with the error shown)
        when the service refuses it. Refreshes the header when admins change themselves."""
        try:
            result = await run_blocking(
                action,
                get_database(),
                actor=self._actor(user),
                user_id=admin_forms.parse_id(form_data.get("user_id")),
                credits=admin_forms.parse_credits(form_data.get("credits")),
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
    @admin_only
    async def adjust_balance(self, user: CurrentUser, form_data: dict[str, Any]) -> Any:
        result = await self._credit_action(
            user, admin_actions.adjust_balance, form_data, settings=get_settings()
        )
        if result is None:
            return None
        return [
            *self._done(result, AdminUserAccountState.load_user),
            rx.set_value("adjust-credits", ""),
            rx.set_value("adjust-reason", ""),
        ]

    @rx.event
    @admin_only
    async def grant_credits(self, user: CurrentUser, form_data: dict[str, Any]) -> Any:
        try:
            days = admin_forms.parse_optional_days(form_data.get("expires_in_days"))
        except AICreditsError as exc:
            self._fail(exc)
            return None
        result = await self._credit_action(
            user, admin_actions.grant_credits, form_data, expires_in_days=days
        )
        if result is None:
            return None
        return [
            *self._done(result, AdminUserAccountState.load_user),
            rx.set_value("grant-credits", ""),
            rx.set_value("grant-reason", ""),
            rx.set_value("grant-days", ""),
        ]

    async def _set_suspension(
        self, user: CurrentUser, form_data: dict[str, Any], *, suspended: bool
    ) -> Any:
        try:
            result = await run_blocking(
                admin_actions.set_suspension,
                get_database(),
                actor=self._actor(user),
                user_id=admin_forms.parse_id(form_data.get("user_id")),
                suspended=suspended,
                reason=str(form_data.get("reason") or ""),
                form_token=str(form_data.get("form_token") or ""),
            )
        except AICreditsError as exc:
            self._fail(exc)
            return None
        return [
            *self._done(result, AdminUserAccountState.load_user),
            rx.set_value("suspension-reason", ""),
        ]

    @rx.event
    @admin_only
    async def suspend_user(self, user: CurrentUser, form_data: dict[str, Any]) -> Any:
        return await self._set_suspension(user, form_data, suspended=True)

    @rx.event
    @admin_only
    async def unsuspend_user(self, user: CurrentUser, form_data: dict[str, Any]) -> Any:
        return await self._set_suspension(user, form_data, suspended=False)

    @rx.event
    @admin_only
    async def clear_flag(self, user: CurrentUser, form_data: dict[str, Any]) -> Any:
        try:
            result = await run_blocking(
                admin_actions.clear_flag,
                get_database(),
                actor=self._actor(user),
                flag_id=admin_forms.parse_id(form_data.get("flag_id"), what="flag"),
                note=str(form_data.get("note") or ""),
                form_token=str(form_data.get("form_token") or ""),
            )
        except AICreditsError as exc:
            self._fail(exc)
            return None
        return self._done(result, AdminUserAccountState.load_user)


class AdminAuditLogState(AdminPageState):
    """/admin/audit: every admin action, newest first, a page at a time."""

    audit: list[dict[str, str]] = []
    audit_total: int = 0
    audit_page: int = 1
    audit_pages: int = 1

    async def _show_audit(self, page: int) -> None:
        found = await run_blocking(admin_views.list_audit, get_database(), page=page)
        self.audit = [admin_rows.audit_row(a) for a in found.rows]
        self.audit_total = found.total
        self.audit_page = found.page
        self.audit_pages = found.pages

    @rx.event
    @admin_only
    async def load_audit(self, user: CurrentUser) -> EventSpec | None:
        await self._start_load(user)
        await self._show_audit(1)
        return None

    @rx.event
    @admin_only
    async def audit_next_page(self, user: CurrentUser) -> EventSpec | None:
        await self._show_audit(self.audit_page + 1)
        return None

    @rx.event
    @admin_only
    async def audit_previous_page(self, user: CurrentUser) -> EventSpec | None:
        await self._show_audit(self.audit_page - 1)
        return None


class AdminPricesState(AdminPageState):
    """/admin/prices: each model's price now and every version, and a new version's form."""

    current_prices: list[dict[str, str]] = []
    price_versions: list[dict[str, str]] = []
    model_ids: list[str] = []

    @rx.event
    @admin_only
    async def load_prices(self, user: CurrentUser) -> EventSpec | None:
        await self._start_load(user)
        configured = [m.id for m in get_settings().models]
        listed = await run_blocking(
            pricing.list_prices, get_database(), configured_models=configured
        )
        self.current_prices = [admin_rows.current_price_row(m) for m in listed]
        self.price_versions = [admin_rows.price_version_row(v) for m in listed for v in m.versions]
        self.model_ids = [m.model for m in listed if m.configured]
        return None

    @rx.event
    @admin_only
    async def add_price(self, user: CurrentUser, form_data: dict[str, Any]) -> Any:
        try:
            result = await run_blocking(
                pricing.add_price_by_admin,
                get_database(),
                actor=self._actor(user),
                model=str(form_data.get("model") or ""),
                input_per_mtok=admin_forms.parse_credits(
                    form_data.get("input_per_mtok"), what="the input price"
                ),
                output_per_mtok=admin_forms.parse_credits(
                    form_data.get("output_per_mtok"), what="the output price"
                ),
                reason=str(form_data.get("reason") or ""),
                form_token=str(form_data.get("form_token") or ""),
                known_models=[m.id for m in get_settings().models],
                effective_from=admin_forms.parse_effective_from(form_data.get("effective_from")),
            )
        except AICreditsError as exc:
            self._fail(exc)
            return None
        return [
            *self._done(result, AdminPricesState.load_prices),
            rx.set_value("price-input", ""),
            rx.set_value("price-output", ""),
            rx.set_value("price-from", ""),
            rx.set_value("price-reason", ""),
        ]


class AdminPaymentsState(AdminPageState):
    """/admin/payments: the last reconciliation with Stripe, the unmatched payments, and the
    actions on them."""

    last_run: dict[str, str] = {}
    last_run_items: list[dict[str, str]] = []
    unmatched: list[dict[str, str]] = []
    open_unmatched: int = 0

    async def _show_payments(self) -> None:
        seen = await run_blocking(admin_payments.payments_view, get_database())
        self.last_run = admin_rows.reconciliation_summary(seen.last_run)
        self.last_run_items = (
            [admin_rows.discrepancy_row(d) for d in seen.last_run.discrepancies]
            if seen.last_run
            else []
        )
        self.unmatched = [admin_rows.unmatched_row(u) for u in seen.unmatched]
        self.open_unmatched = seen.open_unmatched

    @rx.event
    @admin_only
    async def load_payments(self, user: CurrentUser) -> EventSpec | None:
        await self._start_load(user)
        await self._show_payments()
        return None

    @rx.event
    @admin_only
    async def run_reconciliation(self, user: CurrentUser, form_data: dict[str, Any]) -> Any:
        try:
            result = await run_blocking(
                admin_payments.run_reconciliation,
                get_database(),
                get_settings(),
                actor=self._actor(user),
                form_token=str(form_data.get("form_token") or ""),
            )
        except AICreditsError as exc:
            self._fail(exc)
            return None
        return self._done(result, AdminPaymentsState.load_payments)

    @rx.event
    @admin_only
    async def clear_unmatched(self, user: CurrentUser, form_data: dict[str, Any]) -> Any:
        try:
            result = await run_blocking(
                admin_payments.clear_unmatched,
                get_database(),
                actor=self._actor(user),
                unmatched_id=admin_forms.parse_id(
                    form_data.get("unmatched_id"), what="unmatched payment"
                ),
                note=str(form_data.get("note") or ""),
                form_token=str(form_data.get("form_token") or ""),
            )
        except AICreditsError as exc:
            self._fail(exc)
            return None
        return self._done(result, AdminPaymentsState.load_payments)
