"""Crafted websocket events, sent straight to the backend the way an attacker would: the
server refuses them whatever the UI would have shown or hidden."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from reflex.state import BaseState
from socketio.exceptions import ConnectionError as SocketConnectionError

from aicredits.adapters.tables import (
    account_flags,
    admin_actions,
    model_prices,
    reconciliation_runs,
    unmatched_payments,
    utcnow,
)
from aicredits.services import auth, ledger, users
from aicredits.state.admin import AdminOverviewState, AdminPageState, AdminUserAccountState
from aicredits.state.session import SessionState
from tests.e2e import raw_events
from tests.e2e.conftest import RunningApp
from tests.e2e.raw_events import changed, redirects


def send_event(
    app: RunningApp,
    handler: str,
    *,
    cookie: str = "",
    origin: str | None = None,
    payload: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Send one crafted event from the page its handler belongs to (an admin handler from
    /admin, any other from /chat)."""
    path = "/admin" if "admin" in handler else "/chat"
    return raw_events.send_event(
        app, handler, path=path, cookie=cookie, origin=origin, payload=payload
    )


@pytest.fixture(scope="module")
def cookies(app: RunningApp) -> Iterator[dict[str, str]]:
    """Session cookies made on the server, as a sign-in would: one user, one admin."""
    db = app.db()
    made = {}
    for email in ("carol@example.test", "admin@example.test"):
        try:
            user_id = users.find_user_by_email(db, email=email).id
        except Exception:
            user_id = users.create_user(db, email=email, name=email, email_verified=True).id
        token = auth.create_session(db, user_id=user_id, days=1)
        made[email] = f"aicredits_session={token}"
    db.dispose()
    yield made


def test_a_protected_handler_gives_nothing_without_a_session(app: RunningApp) -> None:
    updates = send_event(app, f"{SessionState.get_full_name()}.require_login")
    assert redirects(updates) == ["/login?next=/chat"]
    assert changed(updates, "signed_in") in ([], [False])
    assert not [v for v in changed(updates, "user_email") if v]


def test_a_forged_cookie_is_no_session(app: RunningApp) -> None:
    updates = send_event(
        app, f"{SessionState.get_full_name()}.require_login", cookie="aicredits_session=forged"
    )
    assert redirects(updates) == ["/login?next=/chat"]


def test_the_same_handler_does_answer_a_signed_in_user(
    app: RunningApp, cookies: dict[str, str]
) -> None:
    # The control: proves the two tests above would see data if the guard let it through.
    updates = send_event(
        app, f"{SessionState.get_full_name()}.require_login", cookie=cookies["carol@example.test"]
    )
    assert redirects(updates) == []
    assert changed(updates, "user_email") == ["carol@example.test"]


def test_an_admin_handler_gives_nothing_to_a_signed_out_client(app: RunningApp) -> None:
    updates = send_event(app, f"{AdminOverviewState.get_full_name()}.load")
    assert redirects(updates) == ["/login?next=/admin"]
    assert changed(updates, "user_count") == []


def test_an_admin_handler_gives_nothing_to_a_non_admin(
    app: RunningApp, cookies: dict[str, str]
) -> None:
    updates = send_event(
        app, f"{AdminOverviewState.get_full_name()}.load", cookie=cookies["carol@example.test"]
    )
    assert redirects(updates) == ["/forbidden"]
    assert changed(updates, "user_count") == []


def test_an_admin_handler_answers_an_admin(app: RunningApp, cookies: dict[str, str]) -> None:
    updates = send_event(
        app, f"{AdminOverviewState.get_full_name()}.load", cookie=cookies["admin@example.test"]
    )
    assert redirects(updates) == []
    assert changed(updates, "user_count") and changed(updates, "user_count")[0] >= 2


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost:1"])
def test_a_websocket_from_a_foreign_origin_is_refused(
    app: RunningApp, cookies: dict[str, str], origin: str
) -> None:
    with pytest.raises(SocketConnectionError):
        send_event(
            app,
            f"{AdminOverviewState.get_full_name()}.load",
            cookie=cookies["admin@example.test"],
            origin=origin,
        )


def _admin_states() -> list[type[BaseState]]:
    """The admin pages' base state and every state under it (one per page)."""
    found: list[type[BaseState]] = []
    todo: list[type[BaseState]] = [AdminPageState]
    while todo:
        state = todo.pop()
        found.append(state)
        todo.extend(state.get_substates())
    return found


# Every handler the admin states add, each with the most damaging input a non-admin could send.
ADMIN_STATES = _admin_states()
HANDLER_STATES = {
    name: state
    for state in ADMIN_STATES
    for name in set(state.event_handlers) - set(SessionState.event_handlers)
}
ADMIN_HANDLERS = sorted(HANDLER_STATES)
ADMIN_VARS = {
    name for state in ADMIN_STATES for name in state.__annotations__ if not name.startswith("_")
}


def _hostile_payload(
    handler: str, carol_id: int, flag_id: int, unmatched_id: int = 0
) -> dict[str, Any]:
    form = {
        "user_id": str(carol_id),
        "credits": "1000000",
        "reason": "free money",
        "form_token": uuid.uuid4().hex,
        "expires_in_days": "",
        "flag_id": str(flag_id),
        "unmatched_id": str(unmatched_id),
        "note": "nothing to see",
        "model": "demo",
        "input_per_mtok": "0",
        "output_per_mtok": "0",
        "effective_from": "",
        "q": "",
    }
    takes_form = {
        "adjust_balance",
        "grant_credits",
        "suspend_user",
        "unsuspend_user",
        "clear_flag",
        "add_price",
        "search_users",
        "clear_unmatched",
        "run_reconciliation",
    }
    return {"form_data": form} if handler in takes_form else {}


def test_every_admin_handler_is_covered_here() -> None:
    # A new handler must be added to the hostile payloads above if it takes input.
    assert len(ADMIN_HANDLERS) >= 19
    assert {
        "adjust_balance",
        "grant_credits",
        "suspend_user",
        "add_price",
        "clear_unmatched",
        "run_reconciliation",
    } <= set(ADMIN_HANDLERS)
    # One name, one handler: no two admin states share a handler's name.
    assert len(ADMIN_HANDLERS) == sum(
        len(set(state.event_handlers) - set(SessionState.event_handlers)) for state in ADMIN_STATES
    )


@pytest.mark.parametrize("handler", ADMIN_HANDLERS)
def test_every_admin_handler_refuses_a_non_admin_on_the_server(
    app: RunningApp, cookies: dict[str, str], handler: str
) -> None:
    db = app.db()
    try:
        carol = users.find_user_by_email(db, email="carol@example.test").id
        with db.transaction() as conn:
            flag_id = conn.execute(
                sa.insert(account_flags)
                .values(
                    user_id=carol,
                    kind="dispute",
                    amount=5,
                    detail="e2e",
                    idempotency_key=f"e2e-{uuid.uuid4().hex}",
                    created_at=utcnow(),
                )
                .returning(account_flags.c.id)
            ).scalar_one()
            unmatched_id = conn.execute(
                sa.insert(unmatched_payments)
                .values(
                    checkout_session_id=f"cs_test_e2e_{uuid.uuid4().hex}",
                    amount=500,
                    currency="usd",
                    reason="no_marker",
                    detail="e2e",
                    source="webhook",
                    created_at=utcnow(),
                )
                .returning(unmatched_payments.c.id)
            ).scalar_one()
        before_balance = ledger.get_balance(db, user_id=carol).balance
        with db.engine.connect() as conn:
            before_actions = conn.execute(sa.select(sa.func.count()).select_from(admin_actions))
            before_prices = conn.execute(sa.select(sa.func.count()).select_from(model_prices))
            before_runs = conn.execute(sa.select(sa.func.count()).select_from(reconciliation_runs))
            counts = (
                before_actions.scalar_one(),
                before_prices.scalar_one(),
                before_runs.scalar_one(),
            )

        updates = send_event(
            app,
            f"{HANDLER_STATES[handler].get_full_name()}.{handler}",
            cookie=cookies["carol@example.test"],
            payload=_hostile_payload(handler, carol, flag_id, unmatched_id),
        )

        assert redirects(updates) == ["/forbidden"]
        leaked = {
            name.split("_rx_state_")[0]
            for update in updates
            for substate in update.get("delta", {}).values()
            for name in substate
        } & ADMIN_VARS
        assert leaked == set(), f"{handler} sent admin data to a non-admin: {leaked}"
        assert ledger.get_balance(db, user_id=carol).balance == before_balance
        assert not users.find_user_by_email(db, email="carol@example.test").is_suspended
        with db.engine.connect() as conn:
            after = (
                conn.execute(sa.select(sa.func.count()).select_from(admin_actions)).scalar_one(),
                conn.execute(sa.select(sa.func.count()).select_from(model_prices)).scalar_one(),
                conn.execute(
                    sa.select(sa.func.count()).select_from(reconciliation_runs)
                ).scalar_one(),
            )
            cleared = conn.execute(
                sa.select(account_flags.c.cleared_at).where(account_flags.c.id == flag_id)
            ).scalar_one()
            unmatched_cleared = conn.execute(
                sa.select(unmatched_payments.c.cleared_at).where(
                    unmatched_payments.c.id == unmatched_id
                )
            ).scalar_one()
        assert after == counts
        assert cleared is None
        assert unmatched_cleared is None
    finally:
        db.dispose()


def test_an_admin_handler_with_input_does_act_for_an_admin(
    app: RunningApp, cookies: dict[str, str]
) -> None:
    # The control for the test above: the same payload from an admin is applied.
    db = app.db()
    try:
        carol = users.find_user_by_email(db, email="carol@example.test").id
        before = ledger.get_balance(db, user_id=carol).balance
        payload = _hostile_payload("grant_credits", carol, 0)
        payload["form_data"]["credits"] = "7"
        updates = send_event(
            app,
            f"{AdminUserAccountState.get_full_name()}.grant_credits",
            cookie=cookies["admin@example.test"],
            payload=payload,
        )
        assert redirects(updates) == []
        assert ledger.get_balance(db, user_id=carol).balance == before + 7
    finally:
        db.dispose()
