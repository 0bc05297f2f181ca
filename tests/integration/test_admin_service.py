"""The admin console's use cases against a real database (SQLite and Postgres): every action
with its audit row, replays of a form token, the money views and spike alerts."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.oauth import ProviderIdentity
from aicredits.adapters.tables import (
    account_flags,
    auth_sessions,
    credit_lots,
    ledger_entries,
    model_prices,
    purchases,
    threshold_crossings,
    trial_addresses,
    usage_events,
    utcnow,
)
from aicredits.adapters.tables import admin_actions as audit_log
from aicredits.domain.errors import InsufficientCredits, MissingReason, UnknownModel
from aicredits.domain.ledger import EntryKind
from aicredits.services import admin_actions, admin_views, api_keys, auth, ledger, pricing, users
from aicredits.services.admin_actions import (
    AdminActor,
    CannotSuspendSelf,
    FlagAlreadyCleared,
    FormAlreadyUsed,
    InvalidEffectiveDate,
    InvalidFormToken,
)
from aicredits.services.ledger import UsageRecord
from aicredits.services.verify import verify_ledger
from aicredits.settings import Settings
from aicredits.state.admin_forms import admin_error_message
from tests.factories import make_user

MODEL = "m-admin"


@pytest.fixture
def boss(db: Database) -> AdminActor:
    user = users.create_user(
        db, email=f"boss-{uuid.uuid4().hex[:6]}@example.test", name="Boss", email_verified=True
    )
    assert user.email is not None
    return AdminActor(user_id=user.id, email=user.email)


def token() -> str:
    return admin_actions.new_form_token()


def audit_rows(db: Database) -> list[sa.Row[tuple[object, ...]]]:
    with db.read() as conn:
        return list(conn.execute(sa.select(audit_log).order_by(audit_log.c.id)).all())


def ledger_rows(db: Database, user_id: int) -> list[sa.Row[tuple[object, ...]]]:
    with db.read() as conn:
        return list(
            conn.execute(
                sa.select(ledger_entries)
                .where(ledger_entries.c.user_id == user_id)
                .order_by(ledger_entries.c.id)
            ).all()
        )


def balance(db: Database, user_id: int) -> int:
    return ledger.get_balance(db, user_id=user_id).balance


def add_flag(db: Database, user_id: int, kind: str = "dispute", amount: int = 500) -> int:
    with db.transaction() as conn:
        return int(
            conn.execute(
                sa.insert(account_flags)
                .values(
                    user_id=user_id,
                    kind=kind,
                    detail="charge disputed",
                    amount=amount,
                    idempotency_key=f"flag:{uuid.uuid4()}",
                    created_at=utcnow(),
                )
                .returning(account_flags.c.id)
            ).scalar_one()
        )


def buy(db: Database, user_id: int, credits: int) -> None:
    """A paid purchase and its credits, as the webhook leaves them."""
    session_id = f"cs_test_{uuid.uuid4().hex}"
    now = utcnow()
    with db.transaction() as conn:
        conn.execute(
            sa.insert(purchases).values(
                user_id=user_id,
                pack_id="starter",
                credits=credits,
                amount=500,
                currency="usd",
                checkout_session_id=session_id,
                status="paid",
                credits_granted=credits,
                created_at=now,
                updated_at=now,
                fulfilled_at=now,
            )
        )
    ledger.grant(
        db,
        user_id=user_id,
        credits=credits,
        key=f"purchase:{session_id}",
        reason="pack",
        kind=EntryKind.PURCHASE,
    )


def seed_price(db: Database) -> pricing.Price:
    return pricing.add_price_version(
        db,
        model=MODEL,
        input_per_mtok=1_000_000,
        output_per_mtok=1_000_000,
        actor="config",
        effective_from=datetime(2000, 1, 1, tzinfo=UTC),
    )


def spend(db: Database, user_id: int, credits: int, at: datetime, model: str = MODEL) -> int:
    """One metered call charging `credits` at `at`; returns its usage event id."""
    price = pricing.current_price(db, model=model, at=at)
    hold = ledger.reserve(
        db, user_id=user_id, credits=credits, request_id=str(uuid.uuid4()), now=at
    )
    settled = ledger.settle(
        db,
        hold=hold,
        actual_credits=credits,
        usage=UsageRecord(
            model=model, price_version_id=price.version_id, input_tokens=credits, output_tokens=0
        ),
        now=at,
    )
    assert settled.usage_event_id is not None
    return settled.usage_event_id


# --- adjust -----------------------------------------------------------------------------------


def test_an_adjustment_is_a_ledger_entry_by_the_admin_with_its_audit_row(
    db: Database, boss: AdminActor
) -> None:
    user = make_user(db, credits=100)
    result = admin_actions.adjust_balance(
        db, actor=boss, user_id=user, credits=-40, reason="double charge", form_token=token()
    )
    assert not result.replayed and balance(db, user) == 60
    entry = ledger_rows(db, user)[-1]
    assert (entry.kind, entry.amount, entry.balance_after) == ("adjustment", -40, 60)
    assert (entry.actor, entry.reason) == (f"admin:{boss.email}", "double charge")
    (row,) = audit_rows(db)
    assert row.id == result.audit_id
    assert (row.actor_user_id, row.actor_email, row.action, row.target_user_id) == (
        boss.user_id,
        boss.email,
        "adjust_balance",
        user,
    )
    assert row.reason == "double charge"
    assert "-40" in row.detail and "balance 60" in row.detail
    assert verify_ledger(db) == []


def test_an_adjustment_below_zero_is_refused_and_writes_nothing(
    db: Database, boss: AdminActor
) -> None:
    user = make_user(db, credits=100)
    hold = ledger.reserve(db, user_id=user, credits=30, request_id=str(uuid.uuid4()))
    before = ledger_rows(db, user)
    for credits in (-101, -71):  # below zero; below what the running call holds
        with pytest.raises(InsufficientCredits) as refused:
            admin_actions.adjust_balance(
                db, actor=boss, user_id=user, credits=credits, reason="x", form_token=token()
            )
        assert "70 available" in admin_error_message(refused.value)
    assert ledger_rows(db, user) == before
    assert audit_rows(db) == []
    assert balance(db, user) == 100
    ledger.release(db, hold_id=hold.id)
    assert verify_ledger(db) == []


def test_an_adjustment_needs_a_reason_and_a_form_token(db: Database, boss: AdminActor) -> None:
    user = make_user(db, credits=100)
    for reason in ("", "   "):
        with pytest.raises(MissingReason):
            admin_actions.adjust_balance(
                db, actor=boss, user_id=user, credits=5, reason=reason, form_token=token()
            )
    for bad in ("", "short", "has spaces in it and more", "x" * 101):
        with pytest.raises(InvalidFormToken):
            admin_actions.adjust_balance(
                db, actor=boss, user_id=user, credits=5, reason="r", form_token=bad
            )
    assert len(ledger_rows(db, user)) == 1 and audit_rows(db) == []


def test_the_same_form_token_twice_is_one_entry_and_one_audit_row(
    db: Database, boss: AdminActor
) -> None:
    user = make_user(db, credits=100)
    form = token()
    # A debit of everything: a second application would be refused, a replay must not be.
    first = admin_actions.adjust_balance(
        db, actor=boss, user_id=user, credits=-100, reason="fraud", form_token=form
    )
    again = admin_actions.adjust_balance(
        db, actor=boss, user_id=user, credits=-100, reason="fraud", form_token=form
    )
    assert again.replayed and again.audit_id == first.audit_id and again.detail == first.detail
    assert balance(db, user) == 0
    assert [r.kind for r in ledger_rows(db, user)] == ["grant", "adjustment"]
    assert len(audit_rows(db)) == 1
    # The token cannot be reused for something else.
    with pytest.raises(FormAlreadyUsed):
        admin_actions.adjust_balance(
            db, actor=boss, user_id=user, credits=-50, reason="r", form_token=form
        )
    with pytest.raises(FormAlreadyUsed):
        admin_actions.grant_credits(
            db, actor=boss, user_id=user, credits=5, reason="r", form_token=form
        )
    assert len(audit_rows(db)) == 1 and balance(db, user) == 0
    assert verify_ledger(db) == []


def test_a_retry_after_a_crash_between_entry_and_audit_row_completes_the_audit_row(
    db: Database, boss: AdminActor
) -> None:
    user = make_user(db, credits=100)
    form = token()
    # The ledger entry of the first try was written, then the worker died.
    ledger.adjust(
        db,
        user_id=user,
        credits=-100,
        key=admin_actions.ledger_key(form),
        actor=boss.ledger_actor,
        reason="crash",
    )
    result = admin_actions.adjust_balance(
        db, actor=boss, user_id=user, credits=-100, reason="crash", form_token=form
    )
    assert not result.replayed and balance(db, user) == 0
    assert len(ledger_rows(db, user)) == 2 and len(audit_rows(db)) == 1
    assert verify_ledger(db) == []


def test_a_failure_after_the_ledger_write_leaves_neither_the_credit_nor_the_audit_row(
    db: Database, boss: AdminActor
) -> None:
    user = make_user(db, credits=100)
    before = ledger_rows(db, user)
    # An actor the users table does not know: the ledger write goes through, then the audit
    # row's foreign key refuses it, in the same transaction.
    ghost = AdminActor(user_id=10**9, email="ghost@example.test")
    form = token()
    for action in (admin_actions.adjust_balance, admin_actions.grant_credits):
        with pytest.raises(sa.exc.IntegrityError):
            action(db, actor=ghost, user_id=user, credits=40, reason="r", form_token=form)
    assert ledger_rows(db, user) == before and balance(db, user) == 100
    assert audit_rows(db) == []
    # The same form, sent again by a real admin, applies once.
    result = admin_actions.grant_credits(
        db, actor=boss, user_id=user, credits=40, reason="r", form_token=form
    )
    assert not result.replayed and balance(db, user) == 140
    assert len(ledger_rows(db, user)) == 2 and len(audit_rows(db)) == 1
    assert verify_ledger(db) == []


@pytest.mark.parametrize("credits", [-100, 25], ids=["debit-everything", "credit"])
def test_one_form_submitted_several_times_at_once_applies_once(
    db: Database, boss: AdminActor, credits: int
) -> None:
    user = make_user(db, credits=100)
    form = token()
    submissions = 4
    gate = threading.Barrier(submissions)
    results: list[admin_actions.ActionResult] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def submit() -> None:
        gate.wait()
        try:
            result = admin_actions.adjust_balance(
                db, actor=boss, user_id=user, credits=credits, reason="r", form_token=form
            )
        except BaseException as exc:
            with lock:
                failures.append(exc)
            return
        with lock:
            results.append(result)

    threads = [threading.Thread(target=submit) for _ in range(submissions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(results) == submissions
    assert len({r.audit_id for r in results}) == 1
    assert sorted(r.replayed for r in results) == [False] + [True] * (submissions - 1)
    assert balance(db, user) == 100 + credits
    assert [r.kind for r in ledger_rows(db, user)] == ["grant", "adjustment"]
    assert len(audit_rows(db)) == 1
    assert verify_ledger(db) == []


# --- grant ------------------------------------------------------------------------------------


def test_a_promotional_grant_can_expire(db: Database, boss: AdminActor) -> None:
    user = make_user(db)
    now = utcnow()
    result = admin_actions.grant_credits(
        db,
        actor=boss,
        user_id=user,
        credits=250,
        reason="launch promo",
        form_token=token(),
        expires_in_days=7,
        now=now,
    )
    assert balance(db, user) == 250
    assert ledger.expiring_credits(db, user_id=user) == [(now + timedelta(days=7), 250)]
    (row,) = audit_rows(db)
    assert (row.action, row.target_user_id, row.reason) == ("grant_credits", user, "launch promo")
    assert "granted 250 credits, expiring" in row.detail and result.detail == row.detail
    entry = ledger_rows(db, user)[-1]
    assert (entry.kind, entry.actor) == ("grant", boss.ledger_actor)
    # At the expiry date the unspent rest leaves.
    ledger.expire_due_grants(db, now=now + timedelta(days=8))
    assert balance(db, user) == 0
    assert verify_ledger(db) == []


def test_a_promotional_grant_without_expiry_stays(db: Database, boss: AdminActor) -> None:
    user = make_user(db)
    admin_actions.grant_credits(
        db, actor=boss, user_id=user, credits=10, reason="sorry", form_token=token()
    )
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(credit_lots)).scalar() == 0
    assert "not expiring" in audit_rows(db)[0].detail
    assert verify_ledger(db) == []


# --- suspension -------------------------------------------------------------------------------


def sign_in(db: Database, subject: str, email: str) -> int:
    identity = ProviderIdentity(
        subject=subject, email=email, email_verified=True, name="", picture=None
    )
    return auth.sign_in_identity(db, provider="dev", identity=identity)[0]


def test_suspending_revokes_sessions_and_keys_and_unsuspending_restores_sign_in(
    db: Database, boss: AdminActor
) -> None:
    settings = Settings(_env_file=None, admin_emails=[])
    email = f"sus-{uuid.uuid4().hex[:6]}@example.test"
    subject = uuid.uuid4().hex
    user = sign_in(db, subject, email)
    session = auth.create_session(db, user_id=user, days=1)
    key = api_keys.create_api_key(db, user_id=user, name="script")
    assert auth.resolve_session(db, settings, session) is not None

    admin_actions.set_suspension(
        db, actor=boss, user_id=user, suspended=True, reason="abuse", form_token=token()
    )
    assert auth.resolve_session(db, settings, session) is None
    assert api_keys.resolve_api_key(db, settings, key.secret) is None
    with db.read() as conn:
        open_sessions = conn.execute(
            sa.select(sa.func.count())
            .select_from(auth_sessions)
            .where(auth_sessions.c.user_id == user, auth_sessions.c.revoked_at.is_(None))
        ).scalar()
    assert open_sessions == 0
    with pytest.raises(auth.AccountSuspended):
        sign_in(db, subject, email)

    admin_actions.set_suspension(
        db, actor=boss, user_id=user, suspended=False, reason="appeal ok", form_token=token()
    )
    assert sign_in(db, subject, email) == user
    fresh = auth.create_session(db, user_id=user, days=1)
    assert auth.resolve_session(db, settings, fresh) is not None
    assert auth.resolve_session(db, settings, session) is None  # the old one stays revoked

    rows = audit_rows(db)
    assert [(r.action, r.target_user_id, r.reason) for r in rows] == [
        ("suspend", user, "abuse"),
        ("unsuspend", user, "appeal ok"),
    ]
    assert "revoked" in rows[0].detail


def test_a_suspension_form_replayed_is_one_action(db: Database, boss: AdminActor) -> None:
    user = make_user(db)
    form = token()
    first = admin_actions.set_suspension(
        db, actor=boss, user_id=user, suspended=True, reason="r", form_token=form
    )
    again = admin_actions.set_suspension(
        db, actor=boss, user_id=user, suspended=True, reason="r", form_token=form
    )
    assert again.replayed and again.audit_id == first.audit_id
    assert len(audit_rows(db)) == 1
    with pytest.raises(FormAlreadyUsed):  # the same form cannot unsuspend
        admin_actions.set_suspension(
            db, actor=boss, user_id=user, suspended=False, reason="r", form_token=form
        )


def test_an_admin_cannot_suspend_themself(db: Database, boss: AdminActor) -> None:
    with pytest.raises(CannotSuspendSelf):
        admin_actions.set_suspension(
            db, actor=boss, user_id=boss.user_id, suspended=True, reason="r", form_token=token()
        )
    assert audit_rows(db) == []
    assert users.find_user_by_email(db, email=boss.email).is_suspended is False


# --- flags ------------------------------------------------------------------------------------


def test_clearing_a_flag_keeps_it_with_who_when_and_the_note(
    db: Database, boss: AdminActor
) -> None:
    user = make_user(db)
    flag = add_flag(db, user, "refund_shortfall", 300)
    now = utcnow()
    form = token()
    result = admin_actions.clear_flag(
        db, actor=boss, flag_id=flag, note="customer repaid", form_token=form, now=now
    )
    with db.read() as conn:
        row = conn.execute(sa.select(account_flags).where(account_flags.c.id == flag)).one()
    assert (row.cleared_at, row.cleared_by, row.clear_note) == (now, boss.email, "customer repaid")
    (audit,) = audit_rows(db)
    assert (audit.action, audit.target_user_id, audit.reason) == (
        "clear_flag",
        user,
        "customer repaid",
    )
    assert "refund_shortfall" in audit.detail and result.audit_id == audit.id

    assert admin_actions.clear_flag(
        db, actor=boss, flag_id=flag, note="x", form_token=form
    ).replayed
    with pytest.raises(FlagAlreadyCleared):
        admin_actions.clear_flag(db, actor=boss, flag_id=flag, note="again", form_token=token())
    with pytest.raises(MissingReason):
        admin_actions.clear_flag(
            db, actor=boss, flag_id=add_flag(db, user), note=" ", form_token=token()
        )
    assert len(audit_rows(db)) == 1


# --- the audit log ----------------------------------------------------------------------------


def test_the_audit_log_refuses_update_and_delete(db: Database, boss: AdminActor) -> None:
    user = make_user(db, credits=10)
    admin_actions.adjust_balance(
        db, actor=boss, user_id=user, credits=5, reason="r", form_token=token()
    )
    for statement in (
        sa.update(audit_log).values(reason="nothing happened"),
        sa.delete(audit_log),
    ):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), db.transaction() as conn:
            conn.execute(statement)
    (row,) = audit_rows(db)
    assert row.reason == "r"


def test_the_audit_log_pages_newest_first(db: Database, boss: AdminActor) -> None:
    user = users.create_user(db, email=f"audited-{uuid.uuid4().hex[:6]}@example.test")
    for n in range(3):
        admin_actions.grant_credits(
            db, actor=boss, user_id=user.id, credits=n + 1, reason=f"r{n}", form_token=token()
        )
    first = admin_views.list_audit(db, page=1, per_page=2)
    second = admin_views.list_audit(db, page=2, per_page=2)
    assert (first.total, first.pages) == (3, 2)
    assert [r.reason for r in first.rows + second.rows] == ["r2", "r1", "r0"]
    assert {(r.actor_email, r.target_email) for r in first.rows} == {(boss.email, user.email)}
    assert admin_views.list_audit(db, page=99, per_page=2).page == 2


# --- users ------------------------------------------------------------------------------------


def test_users_are_found_by_email_by_name_and_by_id(db: Database) -> None:
    tag = uuid.uuid4().hex[:6]
    alice = users.create_user(db, email=f"alice-{tag}@example.test", name="Alice Liddell")
    users.create_user(db, email=f"bob-{tag}@example.test", name="Bob 100%_Builder")
    assert [u.id for u in admin_views.search_users(db, query=f"ALICE-{tag}").users] == [alice.id]
    assert [u.id for u in admin_views.search_users(db, query="liddell").users] == [alice.id]
    assert [u.email for u in admin_views.search_users(db, query="100%_b").users] == [
        f"bob-{tag}@example.test"
    ]
    assert admin_views.search_users(db, query=f"alice%{tag}").users == []  # % is no wildcard
    assert alice.id in [u.id for u in admin_views.search_users(db, query=str(alice.id)).users]
    assert admin_views.search_users(db, query=tag).total == 2


def test_the_user_list_pages_25_at_a_time(db: Database) -> None:
    tag = uuid.uuid4().hex[:6]
    for n in range(27):
        users.create_user(db, email=f"page{n}-{tag}@example.test")
    first = admin_views.search_users(db, query=tag)
    second = admin_views.search_users(db, query=tag, page=2)
    assert (len(first.users), len(second.users), first.total, first.pages) == (25, 2, 27, 2)
    assert not {u.id for u in first.users} & {u.id for u in second.users}


def test_the_user_list_shows_balance_purchases_flags_and_activity(
    db: Database, boss: AdminActor
) -> None:
    user = make_user(db, credits=100)
    buy(db, user, 5_000)
    buy(db, user, 2_000)
    add_flag(db, user, "dispute")
    cleared = add_flag(db, user, "refund_shortfall")
    admin_actions.clear_flag(db, actor=boss, flag_id=cleared, note="ok", form_token=token())
    seed_price(db)
    used_at = utcnow() - timedelta(minutes=3)
    spend(db, user, 30, used_at)
    hold = ledger.reserve(db, user_id=user, credits=70, request_id=str(uuid.uuid4()))
    admin_actions.set_suspension(
        db, actor=boss, user_id=user, suspended=True, reason="r", form_token=token()
    )

    (summary,) = [u for u in admin_views.search_users(db, query="").users if u.id == user]
    assert (summary.balance, summary.held, summary.available) == (7_070, 70, 7_000)
    assert summary.total_purchased == 7_000
    assert summary.open_flags == ("dispute",)
    assert summary.is_suspended
    assert summary.last_activity == used_at
    ledger.release(db, hold_id=hold.id)
    assert verify_ledger(db) == []


def test_a_users_detail_has_ledger_with_running_balance_holds_purchases_usage(
    db: Database, boss: AdminActor
) -> None:
    user = make_user(db, credits=100)
    buy(db, user, 500)
    seed_price(db)
    spend(db, user, 25, utcnow())
    hold = ledger.reserve(db, user_id=user, credits=10, request_id="pending-call")
    admin_actions.adjust_balance(
        db, actor=boss, user_id=user, credits=-5, reason="r", form_token=token()
    )
    add_flag(db, user)

    detail = admin_views.user_detail(db, user_id=user)
    assert [(e.kind, e.amount, e.balance_after) for e in detail.ledger] == [
        ("adjustment", -5, 570),
        ("spend", -25, 575),
        ("purchase", 500, 600),
        ("grant", 100, 100),
    ]
    assert detail.holds[0].request_id == "pending-call" and detail.holds[0].status == "pending"
    assert [p.credits for p in detail.purchases] == [500]
    assert [(u.model, u.charged) for u in detail.usage] == [(MODEL, 25)]
    assert [f.kind for f in detail.flags] == ["dispute"]
    assert [a.action for a in detail.audit] == ["adjust_balance"]
    assert detail.user.available == 560
    ledger.release(db, hold_id=hold.id)
    assert verify_ledger(db) == []


# --- prices -----------------------------------------------------------------------------------


def test_a_later_price_changes_nothing_until_then_and_old_usage_keeps_its_version(
    db: Database, boss: AdminActor
) -> None:
    old = seed_price(db)
    user = make_user(db, credits=1_000)
    event = spend(db, user, 10, utcnow())
    now = utcnow()
    later = now + timedelta(days=2)
    result = pricing.add_price_by_admin(
        db,
        actor=boss,
        model=MODEL,
        input_per_mtok=3_000_000,
        output_per_mtok=4_000_000,
        reason="upstream raised prices",
        form_token=token(),
        known_models=[MODEL],
        effective_from=later,
        now=now,
    )
    assert pricing.current_price(db, model=MODEL) == old
    new = pricing.current_price(db, model=MODEL, at=later)
    assert (new.input_per_mtok, new.output_per_mtok) == (3_000_000, 4_000_000)
    assert new.version_id != old.version_id
    with db.read() as conn:
        kept = conn.execute(
            sa.select(usage_events.c.price_version_id).where(usage_events.c.id == event)
        ).scalar_one()
    assert kept == old.version_id

    (row,) = audit_rows(db)
    assert (row.action, row.target_user_id, row.reason) == (
        "add_price",
        None,
        "upstream raised prices",
    )
    assert MODEL in row.detail and "3,000,000" in row.detail and result.detail == row.detail

    (listed,) = pricing.list_prices(db, configured_models=[MODEL], now=now)
    assert listed.current is not None and listed.current.version_id == old.version_id
    assert [v.status for v in listed.versions] == ["scheduled", "current"]
    (after,) = pricing.list_prices(db, configured_models=[MODEL], now=later)
    assert [v.status for v in after.versions] == ["current", "past"]


def test_a_price_form_replayed_adds_one_version(db: Database, boss: AdminActor) -> None:
    seed_price(db)
    form = token()
    for _ in range(2):
        pricing.add_price_by_admin(
            db,
            actor=boss,
            model=MODEL,
            input_per_mtok=5,
            output_per_mtok=6,
            reason="r",
            form_token=form,
            known_models=[MODEL],
        )
    assert len(pricing.price_history(db, model=MODEL)) == 2
    assert len(audit_rows(db)) == 1


def test_a_price_must_be_for_a_known_model_and_not_start_in_the_past(
    db: Database, boss: AdminActor
) -> None:
    seed_price(db)

    def add(model: str, effective_from: datetime | None = None) -> None:
        pricing.add_price_by_admin(
            db,
            actor=boss,
            model=model,
            input_per_mtok=1,
            output_per_mtok=2,
            reason="r",
            form_token=token(),
            known_models=[MODEL],
            effective_from=effective_from,
        )

    with pytest.raises(UnknownModel):
        add("nope")
    with pytest.raises(InvalidEffectiveDate):
        add(MODEL, utcnow() - timedelta(days=1))
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(model_prices)).scalar() == 1
    assert audit_rows(db) == []


# --- overview and spikes ----------------------------------------------------------------------


def test_the_overview_sums_the_last_30_days(db: Database, boss: AdminActor) -> None:
    seed_price(db)
    pricing.add_price_version(
        db,
        model="m-other",
        input_per_mtok=1_000_000,
        output_per_mtok=0,
        actor="config",
        effective_from=datetime(2000, 1, 1, tzinfo=UTC),
    )
    now = utcnow()
    big = make_user(db, credits=1_000)
    small = make_user(db, credits=2_000)
    buy(db, big, 5_000)
    spend(db, big, 300, now - timedelta(days=2))
    spend(db, big, 200, now - timedelta(days=1), model="m-other")
    spend(db, small, 50, now - timedelta(hours=5))
    spend(db, small, 999, now - timedelta(days=40))  # outside the window
    admin_actions.adjust_balance(
        db, actor=boss, user_id=small, credits=-10, reason="r", form_token=token()
    )

    seen = admin_views.overview(db, spike_factor=5.0, spike_min_credits=10**9)
    assert seen.credits_sold == 5_000
    # The 40-day-old spend is outside the window; the factory grants are inside it.
    assert seen.credits_granted == 3_000
    assert seen.credits_spent == 550
    assert seen.adjustments_net == -10
    assert seen.user_count == 3
    assert [(m.model, m.calls, m.cost, m.charged) for m in seen.usage_by_model] == [
        (MODEL, 2, 350, 350),
        ("m-other", 1, 200, 200),
    ]
    assert [(s.user_id, s.spent) for s in seen.top_spenders] == [(big, 500), (small, 50)]
    assert seen.spikes == []
    assert verify_ledger(db) == []


def test_a_quiet_week_then_a_heavy_hour_is_a_spike_and_an_evenly_heavy_user_is_not(
    db: Database,
) -> None:
    seed_price(db)
    now = utcnow()
    quiet = make_user(db, credits=10_000)
    steady = make_user(db, credits=100_000)
    small = make_user(db, credits=1_000)
    # The quiet user: 168 credits over the week (1 an hour), then 600 in the last hour.
    spend(db, quiet, 168, now - timedelta(days=3))
    spend(db, quiet, 400, now - timedelta(minutes=40))
    spend(db, quiet, 200, now - timedelta(minutes=5))
    # The steady user: 600 every 6 hours all week (100 an hour), and 300 in the last hour.
    for n in range(28):
        spend(db, steady, 600, now - timedelta(hours=1, minutes=30) - timedelta(hours=6 * n))
    spend(db, steady, 300, now - timedelta(minutes=20))
    # A new user with no history but a small hour: below the minimum.
    spend(db, small, 40, now - timedelta(minutes=10))

    alerts = admin_views.spike_alerts(db, factor=5.0, min_credits=100, now=now)
    assert [(a.user_id, a.last_hour, a.previous_week) for a in alerts] == [(quiet, 600, 168)]
    assert alerts[0].usual_hourly == 1
    # The threshold is configurable: at 2x the steady user (3x usual) is listed too, and
    # with no minimum so is the new one.
    loose = admin_views.spike_alerts(db, factor=2.0, min_credits=0, now=now)
    assert [a.user_id for a in loose] == [quiet, steady, small]
    # The overview lists the same alerts.
    seen = admin_views.overview(db, spike_factor=5.0, spike_min_credits=100, now=now)
    assert [a.user_id for a in seen.spikes] == [quiet]
    assert verify_ledger(db) == []


def test_the_overview_lists_the_addresses_that_reached_the_trial_limit(db: Database) -> None:
    now = utcnow()
    today = now.date()
    rows = [
        ("203.0.113.5", today, 3, 2),
        ("2001:db8:1:2::/64", today, 3, 4),
        ("198.51.100.7", today, 1, 0),  # under the limit: not listed
        ("203.0.113.5", today - timedelta(days=1), 3, 1),
        ("192.0.2.9", today - timedelta(days=31), 3, 9),  # outside the 30 days
    ]
    with db.transaction() as conn:
        for address, day, granted, refused in rows:
            conn.execute(
                sa.insert(trial_addresses).values(
                    address=address, day=day, granted=granted, refused=refused
                )
            )
    seen = admin_views.overview(db, spike_factor=5.0, spike_min_credits=100, now=now)
    assert [(a.address, a.day, a.granted, a.refused) for a in seen.limited_addresses] == [
        ("2001:db8:1:2::/64", today, 3, 4),
        ("203.0.113.5", today, 3, 2),
        ("203.0.113.5", today - timedelta(days=1), 3, 1),
    ]


def test_the_overview_lists_an_address_refused_through_sign_in(db: Database) -> None:
    for n in range(3):
        auth.sign_in_identity(
            db,
            provider="dev",
            identity=ProviderIdentity(
                subject=f"s{n}",
                email=f"s{n}@example.test",
                email_verified=True,
                name="",
                picture=None,
            ),
            client_address="203.0.113.5",
            trial_limit=2,
        )
    seen = admin_views.overview(db, spike_factor=5.0, spike_min_credits=100)
    assert [(a.address, a.granted, a.refused) for a in seen.limited_addresses] == [
        ("203.0.113.5", 2, 1)
    ]


def test_an_adjustment_down_records_the_usage_warnings_it_crosses_at_once(
    db: Database, boss: AdminActor
) -> None:
    user = make_user(db, credits=100)
    admin_actions.adjust_balance(
        db, actor=boss, user_id=user, credits=-85, reason="clawed back by hand",
        form_token=token(), settings=Settings(_env_file=None),
    )  # fmt: skip
    with db.read() as conn:
        crossed = sorted(
            conn.execute(
                sa.select(threshold_crossings.c.threshold).where(
                    threshold_crossings.c.user_id == user
                )
            ).scalars()
        )
    assert crossed == [50, 80]
