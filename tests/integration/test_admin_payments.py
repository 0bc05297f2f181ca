"""The Payments page's use cases on SQLite and Postgres: an unmatched payment cleared with a
note once, audited, whatever is replayed; reconciliation run now, audited and kept."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import admin_actions as audit_log
from aicredits.adapters.tables import ledger_entries, unmatched_payments, utcnow
from aicredits.domain.errors import MissingReason
from aicredits.services import admin_actions, admin_payments, users
from aicredits.services.admin_actions import AdminActor
from aicredits.services.admin_payments import UnknownUnmatchedPayment, UnmatchedAlreadyCleared
from aicredits.settings import get_settings
from tests.integration import fake_stripe as fs
from tests.integration.fake_stripe import Shop, make_shop


@pytest.fixture
def shop(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    yield make_shop(db, monkeypatch)
    get_settings.cache_clear()


@pytest.fixture
def boss(db: Database) -> AdminActor:
    user = users.create_user(
        db, email=f"boss-{uuid.uuid4().hex[:6]}@example.test", name="Boss", email_verified=True
    )
    assert user.email is not None
    return AdminActor(user_id=user.id, email=user.email)


def refused_payment(shop: Shop, sid: str = "cs_test_link_1") -> int:
    body = fs.event("checkout.session.completed", fs.checkout_session(sid, user_id=1))
    assert shop.deliver(body).json()["outcome"] == "unmatched"
    with shop.db.read() as conn:
        return int(
            conn.execute(
                sa.select(unmatched_payments.c.id).where(
                    unmatched_payments.c.checkout_session_id == sid
                )
            ).scalar_one()
        )


def audit_rows(db: Database) -> list[sa.Row[object]]:
    with db.read() as conn:
        return list(conn.execute(sa.select(audit_log).order_by(audit_log.c.id)).all())


def test_clearing_an_unmatched_payment_keeps_it_with_the_note_and_audits_once(
    shop: Shop, boss: AdminActor
) -> None:
    unmatched_id = refused_payment(shop)
    view = admin_payments.payments_view(shop.db)
    assert view.open_unmatched == 1 and view.unmatched[0].paid == "5.00 USD"
    form = admin_actions.new_form_token()
    first = admin_payments.clear_unmatched(
        shop.db, actor=boss, unmatched_id=unmatched_id, note="refunded at Stripe", form_token=form
    )
    again = admin_payments.clear_unmatched(
        shop.db, actor=boss, unmatched_id=unmatched_id, note="refunded at Stripe", form_token=form
    )
    assert not first.replayed and again.replayed
    (row,) = audit_rows(shop.db)
    assert (row.action, row.reason, row.target_user_id) == (
        "clear_unmatched",
        "refunded at Stripe",
        None,
    )
    assert "cs_test_link_1" in row.detail
    view = admin_payments.payments_view(shop.db)
    assert view.open_unmatched == 0
    cleared = view.unmatched[0]
    assert (cleared.cleared_by, cleared.clear_note) == (boss.email, "refunded at Stripe")
    with pytest.raises(UnmatchedAlreadyCleared):
        admin_payments.clear_unmatched(
            shop.db,
            actor=boss,
            unmatched_id=unmatched_id,
            note="again",
            form_token=admin_actions.new_form_token(),
        )
    assert len(audit_rows(shop.db)) == 1  # the refused second clear rolled its row back
    with shop.db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger_entries)).scalar() == 0


def test_clearing_needs_a_note_and_a_real_unmatched_payment(shop: Shop, boss: AdminActor) -> None:
    unmatched_id = refused_payment(shop)
    with pytest.raises(MissingReason):
        admin_payments.clear_unmatched(
            shop.db,
            actor=boss,
            unmatched_id=unmatched_id,
            note="  ",
            form_token=admin_actions.new_form_token(),
        )
    with pytest.raises(UnknownUnmatchedPayment):
        admin_payments.clear_unmatched(
            shop.db,
            actor=boss,
            unmatched_id=unmatched_id + 1000,
            note="x",
            form_token=admin_actions.new_form_token(),
        )
    assert audit_rows(shop.db) == []
    assert admin_payments.payments_view(shop.db).open_unmatched == 1


def test_running_reconciliation_now_keeps_its_report_and_audits_it_once(
    shop: Shop, boss: AdminActor
) -> None:
    refused_payment(shop)
    assert admin_payments.payments_view(shop.db).last_run is None
    form = admin_actions.new_form_token()
    now = utcnow()
    result = admin_payments.run_reconciliation(
        shop.db, shop.settings, actor=boss, form_token=form, now=now
    )
    assert "1 discrepancies, 0 fixed" in result.detail
    replay = admin_payments.run_reconciliation(shop.db, shop.settings, actor=boss, form_token=form)
    assert replay.replayed
    (row,) = audit_rows(shop.db)
    assert row.action == "run_reconciliation"
    run = admin_payments.payments_view(shop.db).last_run
    assert run is not None and run.trigger == "admin" and not run.stripe_checked
    assert [(d.kind, d.session_id) for d in run.discrepancies] == [
        ("unmatched_payment", "cs_test_link_1")
    ]
