"""Reconciliation against a fake Stripe HTTP API on SQLite and Postgres, through the command
operators run: more sessions than one page holds, one of each kind of discrepancy, each
reported; --fix credits the missing payment once and a second --fix changes nothing;
verify-ledger stays clean. Also the daily job and the exit codes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from aicredits import cli
from aicredits.adapters.db import Database
from aicredits.adapters.tables import (
    ledger_entries,
    reconciliation_runs,
    unmatched_payments,
    utcnow,
)
from aicredits.services import jobs, reconciliation
from aicredits.services.verify import verify_ledger
from aicredits.settings import get_settings
from tests.factories import make_user
from tests.integration import fake_stripe as fs
from tests.integration.fake_stripe import FakeStripe, Shop, make_shop
from tests.servers import serve_asgi

STARTER = 5_000
PAGE = 3  # the fake's pages: the walk must follow has_more / starting_after


@pytest.fixture
def stripe_server() -> Iterator[tuple[FakeStripe, str]]:
    # One per test: the walk sees every session the fake holds.
    fake = FakeStripe(page_cap=PAGE)
    with serve_asgi(fake.app, ready_path="/health") as base:
        yield fake, base


@pytest.fixture
def fake(stripe_server: tuple[FakeStripe, str]) -> FakeStripe:
    return stripe_server[0]


@pytest.fixture
def shop(
    db: Database, monkeypatch: pytest.MonkeyPatch, stripe_server: tuple[FakeStripe, str]
) -> Iterator[Shop]:
    yield make_shop(
        db, monkeypatch, STRIPE_SECRET_KEY="sk_test_fake", STRIPE_API_BASE=stripe_server[1]
    )
    get_settings.cache_clear()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["reconcile", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def credited_purchase(shop: Shop, fake: FakeStripe, uid: int) -> str:
    sid = shop.start(uid)
    session = fake.pay(sid)
    assert (
        shop.deliver(fs.event("checkout.session.completed", session)).json()["outcome"]
        == "credited"
    )
    return sid


def seed_every_discrepancy(shop: Shop, fake: FakeStripe, uid: int) -> dict[str, str]:
    """Clean purchases (more than a page of them) and one of each discrepancy kind."""
    for _ in range(PAGE + 2):
        credited_purchase(shop, fake, uid)
    # Paid at Stripe, the webhook never came.
    missing = shop.start(uid)
    fake.pay(missing)
    # Credited here on a completion that said paid; Stripe says the session expired unpaid.
    unpaid = shop.start(uid)
    fake.sessions[unpaid].update(status="expired")
    shop.deliver(fs.event("checkout.session.completed", fs.checkout_session(unpaid, user_id=uid)))
    # Refunded at Stripe; the refund's event never came.
    refunded = credited_purchase(shop, fake, uid)
    fake.refund(refunded, 500)
    # Paid at Stripe at another amount than the purchase's.
    mismatched = shop.start(uid)
    fake.pay(mismatched)
    fake.sessions[mismatched]["amount_total"] = 400
    # Paid on the account some other way, never sent to the app.
    foreign = fake.add_session(
        {**fs.checkout_session(f"cs_test_link_{uid}", user_id=uid, credits=1_000_000)}
    )
    return {
        reconciliation.PAID_NOT_CREDITED: missing,
        reconciliation.CREDITED_NOT_PAID: unpaid,
        reconciliation.REFUND_NOT_CLAWED_BACK: refunded,
        reconciliation.AMOUNT_MISMATCH: mismatched,
        reconciliation.UNMATCHED_PAYMENT: foreign["id"],
    }


def test_reconcile_reports_each_discrepancy_and_fix_credits_the_missing_payment_once(
    shop: Shop, fake: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    uid = make_user(shop.db)
    seeded = seed_every_discrepancy(shop, fake, uid)
    balance = shop.balance(uid)
    entries = _count(shop.db, ledger_entries)

    code, out = run(capsys, "--since", "1d")
    assert code == cli.EXIT_BROKEN, out
    for kind, sid in seeded.items():
        assert f"{kind}: {sid}" in out, (kind, out)
    assert out.count(": cs_") == len(seeded), out  # the clean purchases are not listed
    assert "FIXED" not in out
    assert shop.balance(uid) == balance  # reporting changes nothing
    pages = fake.calls("GET", "/v1/checkout/sessions")
    assert len(pages) >= 4 and any("starting_after" in p.params for p in pages)
    assert fake.calls("GET", "/v1/refunds")

    code, out = run(capsys, "--since", "1d", "--fix")
    assert code == cli.EXIT_BROKEN  # the others are for a person to look at
    assert f"FIXED {reconciliation.PAID_NOT_CREDITED}: {seeded['paid_not_credited']}" in out
    assert shop.balance(uid) == balance + STARTER
    assert shop.purchase(seeded["paid_not_credited"]).status == "paid"
    assert _count(shop.db, ledger_entries) == entries + 1

    code, out = run(capsys, "--since", "1d", "--fix")
    assert code == cli.EXIT_BROKEN
    assert "FIXED" not in out and reconciliation.PAID_NOT_CREDITED not in out
    assert shop.balance(uid) == balance + STARTER
    assert _count(shop.db, ledger_entries) == entries + 1
    assert verify_ledger(shop.db) == []
    assert cli.main(["verify-ledger"]) == cli.EXIT_OK
    kept = reconciliation.last_run(shop.db)
    assert kept is not None and kept.trigger == "cli" and kept.fix and kept.stripe_checked


def test_a_lost_row_paid_at_stripe_is_fixed_from_the_pack_table(
    shop: Shop, fake: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    with shop.db.transaction() as conn:
        conn.execute(sa.text("DELETE FROM purchases"))
    fake.sessions[sid]["metadata"]["credits"] = "1000000"
    fake.pay(sid)
    code, out = run(capsys, "--fix")
    assert code == cli.EXIT_OK, out
    assert f"FIXED {reconciliation.PAID_NOT_CREDITED}: {sid}" in out
    assert shop.balance(uid) == STARTER
    assert run(capsys, "--fix")[0] == cli.EXIT_OK
    assert shop.balance(uid) == STARTER


def test_reconcile_is_clean_when_everything_agrees(
    shop: Shop, fake: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    uid = make_user(shop.db)
    for _ in range(PAGE + 1):
        credited_purchase(shop, fake, uid)
    code, out = run(capsys)
    assert code == cli.EXIT_OK, out
    assert "payments OK: no discrepancy" in out


@pytest.mark.parametrize("since", ["yesterday", "0d", "2999-01-01"])
def test_reconcile_refuses_a_window_it_cannot_read(
    shop: Shop, capsys: pytest.CaptureFixture[str], since: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reconcile", "--since", since])
    assert exit_.value.code == cli.EXIT_BAD_INPUT
    assert _count(shop.db, reconciliation_runs) == 0


def test_the_daily_job_reconciles_once_a_day_and_fixes(shop: Shop, fake: FakeStripe) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    fake.pay(sid)
    now = utcnow()
    first = jobs.run_all(shop.db, shop.settings, now=now)
    assert first.payment_discrepancies == 1
    assert shop.balance(uid) == STARTER
    # Within the day: not again.
    assert jobs.run_all(shop.db, shop.settings, now=now + timedelta(hours=23)) == jobs.JobReport(
        0, 0, 0, 0
    )
    assert _count(shop.db, reconciliation_runs) == 1
    jobs.run_all(shop.db, shop.settings, now=now + timedelta(days=1, minutes=1))
    assert _count(shop.db, reconciliation_runs) == 2
    kept = reconciliation.last_run(shop.db)
    assert kept is not None and kept.trigger == "job" and kept.discrepancies == []
    assert shop.balance(uid) == STARTER


def test_without_stripe_reconcile_reports_the_unmatched_payments(
    db: Database, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    simulated = make_shop(db, monkeypatch)
    try:
        assert run(capsys)[0] == cli.EXIT_OK
        uid = make_user(db)
        body = fs.event("checkout.session.completed", fs.checkout_session("cs_test_x", user_id=uid))
        assert simulated.deliver(body).json()["outcome"] == "unmatched"
        code, out = run(capsys)
        assert code == cli.EXIT_BROKEN
        assert "Stripe was not walked" in out
        assert f"{reconciliation.UNMATCHED_PAYMENT}: cs_test_x" in out
    finally:
        get_settings.cache_clear()


def _count(db: Database, table: sa.Table, *where: Any) -> int:
    with db.read() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
        )


def test_a_foreign_payment_is_logged_and_counted_once_however_often_it_is_seen(
    shop: Shop,
    fake: FakeStripe,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Stripe account shared with another product: its paid sessions are not ours. Each is
    recorded, logged and counted once; later runs only list it while it is open."""
    uid = make_user(shop.db)
    foreign = fake.add_session(fs.checkout_session("cs_test_other_product", user_id=uid))
    counted = _metric(reason="no_marker")
    with caplog.at_level("WARNING", logger="aicredits.services.payment_trust"):
        for _ in range(3):
            code, out = run(capsys, "--since", "1d")
            assert code == cli.EXIT_BROKEN
            assert f"{reconciliation.UNMATCHED_PAYMENT}: {foreign['id']}" in out
    warnings = [r for r in caplog.records if "unmatched payment" in r.getMessage()]
    assert len(warnings) == 1
    assert _metric(reason="no_marker") == counted + 1
    assert _count(shop.db, unmatched_payments) == 1


def _metric(*, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "aicredits_unmatched_payments_total", {"reason": reason, "source": "reconcile"}
    )
    return value or 0.0
