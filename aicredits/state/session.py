"""Who is signed in, resolved on the server for every protected event.

The session cookie reaches the backend in the websocket handshake; Reflex keeps it in
`self.router.headers.cookie` on the server and never sends it to the browser. Every
protected handler calls `_authenticate()` itself: any handler can be invoked by a crafted
websocket message, whatever the UI shows or hides.
"""

from __future__ import annotations

from urllib.parse import quote

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.domain.identity import safe_next_path
from aicredits.domain.money import credits_text, grouped
from aicredits.services import auth, auto_topup, cookies, ledger, thresholds, trials
from aicredits.services.auth import CurrentUser
from aicredits.services.runtime import get_database, run_blocking, start_event
from aicredits.settings import get_settings


def provider_buttons() -> list[dict[str, str]]:
    """One "Sign in with ..." form per configured provider: it posts to the backend."""
    settings = get_settings()
    return [
        {"name": p.name, "label": p.label, "action": f"{settings.api_url}/auth/login/{p.name}"}
        for p in auth.sign_in_providers(settings)
    ]


def login_path(next_path: str) -> str:
    return f"/login?next={quote(safe_next_path(next_path), safe='/')}"


class SessionState(rx.State):
    # Backend-only (leading underscore): never sent to the browser.
    _user_id: int | None = None

    signed_in: bool = False
    user_name: str = ""
    user_initial: str = ""
    user_email: str = ""
    avatar_url: str = ""
    is_admin: bool = False
    available_credits: int = 0
    # The header's balance: "1,234 credits", and how much of the allowance is used as a
    # level: "" (below the first warning), info, warning or blocking.
    balance_text: str = ""
    available_grouped: str = "0"
    usage_level: str = ""
    # The usage warning shown on every page: "" (none), info, warning or blocking.
    banner_level: str = ""
    banner_text: str = ""
    banner_threshold: int = 0
    banner_dismissible: bool = False
    # Auto top-up's notice, beside the usage warning: "" (none), failed, action_required,
    # disabled or cap_reached; the text; the pack to buy on Stripe's page.
    topup_notice_kind: str = ""
    topup_notice_text: str = ""
    topup_notice_pack: str = ""
    # Why this account has no free trial, on /chat and /credits ("" when it has one, or has
    # had credits since).
    trial_notice: str = ""

    async def _authenticate(self) -> CurrentUser | None:
        """Resolve the session cookie against the database, now. None when signed out."""
        user = await self._fetch_user(*self._session_key())
        self._show(user)
        return user

    def _session_key(self) -> tuple[str, str, str]:
        """(the Cookie header, the page's route, the client's address): all `_fetch_user`
        needs from the state. A background event reads these inside `async with self` and
        resolves them outside it."""
        return (
            self.router.headers.cookie,
            self.router.route_id or "/",
            self.router.session.client_ip,
        )

    @staticmethod
    async def _fetch_user(cookie_header: str, page: str, client_ip: str = "") -> CurrentUser | None:
        """Resolve a session cookie against the database, touching no state."""
        settings = get_settings()
        token = cookies.read_cookie(cookie_header, cookies.cookie_name(settings, cookies.SESSION))
        user = await run_blocking(auth.resolve_session, get_database(), settings, token)
        # A Reflex event has no HTTP request: its log lines get a fresh id, the page's route
        # (its pattern, e.g. /admin/user) as their route, this user, and the websocket's
        # client (the real one behind a trusted proxy).
        start_event(route=f"event:{page}", user_id=user.id if user else None, client_ip=client_ip)
        return user

    def _show(self, user: CurrentUser | None) -> None:
        self._user_id = user.id if user else None
        self.signed_in = user is not None
        self.user_name = user.name if user else ""
        self.user_initial = (user.name[:1].upper() or "?") if user else ""
        self.user_email = (user.email or "") if user else ""
        self.avatar_url = (user.avatar_url or "") if user else ""
        self.is_admin = user.is_admin if user else False
        if user is None:
            self._show_balance(0, thresholds.UsageStatus("", None))
            self.trial_notice = ""

    def _show_banner(self, banner: thresholds.Banner | None) -> None:
        self.banner_level = banner.level if banner else ""
        self.banner_text = banner.text if banner else ""
        self.banner_threshold = banner.threshold if banner else 0
        self.banner_dismissible = banner.dismissible if banner else False

    async def _refresh_balance(self, user: CurrentUser) -> None:
        """The header's credits and the usage banner, read again (after any charge)."""
        self._show_balance(*await self._fetch_balance(user.id))

    @staticmethod
    async def _fetch_balance(user_id: int) -> tuple[int, thresholds.UsageStatus]:
        """Read what the header shows, touching no state: a background event calls this
        outside `async with self`, so the state's lock is never held across the database."""
        db = get_database()
        balance = await run_blocking(ledger.get_balance, db, user_id=user_id)
        usage = await run_blocking(thresholds.status, db, get_settings(), user_id=user_id)
        return balance.available, usage

    async def _refresh_trial_notice(self, user: CurrentUser) -> None:
        notice = await run_blocking(trials.trial_notice, get_database(), user_id=user.id)
        self.trial_notice = notice or ""

    def _show_balance(self, available: int, usage: thresholds.UsageStatus) -> None:
        self.available_credits = available
        self.balance_text = credits_text(available)
        self.available_grouped = grouped(available)
        self.usage_level = usage.level
        self._show_banner(usage.banner)
        self.topup_notice_kind = usage.topup.kind if usage.topup else ""
        self.topup_notice_text = usage.topup.text if usage.topup else ""
        self.topup_notice_pack = usage.topup.pack_id if usage.topup else ""

    @rx.event
    async def dismiss_banner(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        await run_blocking(
            thresholds.dismiss,
            get_database(),
            get_settings(),
            user_id=user.id,
            threshold=self.banner_threshold,
        )
        await self._refresh_balance(user)
        return None

    @rx.event
    async def dismiss_topup_notice(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        await run_blocking(auto_topup.dismiss_notice, get_database(), user_id=user.id)
        await self._refresh_balance(user)
        return None

    def _to_login(self) -> EventSpec:
        return rx.redirect(login_path(self.router.url.path or "/"))

    @rx.event
    async def require_login(self) -> EventSpec | None:
        """on_load of every signed-in page."""
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        await self._refresh_balance(user)
        return None

    async def _load_visitor(self) -> None:
        """For public pages: show who is signed in, if anyone."""
        user = await self._authenticate()
        if user is not None:
            await self._refresh_balance(user)

    @rx.event
    async def load_visitor(self) -> None:
        await self._load_visitor()
