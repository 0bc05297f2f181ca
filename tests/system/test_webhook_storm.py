"""A webhook storm: 200 signed Stripe events, duplicated and shuffled, sent concurrently on
separate connections (so they land on different workers). Each purchase is credited once."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import ledger_entries, purchases, stripe_events, utcnow
from aicredits.services.purchases import insert_purchase
from aicredits.settings import CreditPack
from tests.integration import fake_stripe as fs
from tests.system.conftest import accounts, assert_ledger_sound, scalar
from tests.system.harness import WEBHOOK_SECRET, RunningApp, provision

USERS = 20
SESSIONS_PER_USER = 4
PACK_CREDITS = 5_000
DELIVERIES = 200


@pytest.mark.timeout(120)
def test_two_hundred_shuffled_duplicate_events_credit_each_purchase_once(
    system_app: RunningApp, app_db: Database
) -> None:
    users = provision(system_app.env, [0] * USERS, label="storm")
    sessions = [
        (f"cs_test_storm_{u.user_id}_{n}", u.user_id)
        for u in users
        for n in range(SESSIONS_PER_USER)
    ]
    # Each session as "Buy" records it (the app credits only sessions it created).
    pack = CreditPack(id="starter", credits=PACK_CREDITS, amount=500, currency="usd")
    for sid, uid in sessions:
        insert_purchase(
            app_db,
            user_id=uid,
            pack=pack,
            session_id=sid,
            amount=500,
            currency="usd",
            customer_id=None,
            simulated=False,
            now=utcnow(),
        )
    # One completion per session, each delivered twice (Stripe's retries), plus a second,
    # distinct event for some sessions (Stripe sends both completed and async_succeeded).
    bodies = []
    for sid, uid in sessions:
        obj = fs.checkout_session(sid, user_id=uid, credits=PACK_CREDITS)
        body = fs.event("checkout.session.completed", obj)
        bodies += [body, body]
    rng = random.Random(8)
    for sid, uid in rng.sample(sessions, DELIVERIES - len(bodies)):
        obj = fs.checkout_session(sid, user_id=uid, credits=PACK_CREDITS)
        bodies.append(fs.event("checkout.session.async_payment_succeeded", obj))
    rng.shuffle(bodies)
    assert len(bodies) == DELIVERIES

    def deliver(body: str) -> int:
        # A new connection per delivery: the kernel spreads them over the workers.
        with httpx.Client(timeout=60) as client:
            response = client.post(
                f"{system_app.base_url}/api/stripe/webhook",
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "Stripe-Signature": fs.sign(body, WEBHOOK_SECRET),
                },
            )
            return response.status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(deliver, bodies))
    assert statuses == [200] * DELIVERIES

    balances = accounts(app_db, [u.user_id for u in users])
    assert all(
        (a.balance, a.held) == (SESSIONS_PER_USER * PACK_CREDITS, 0) for a in balances.values()
    )
    purchase_entries = scalar(
        app_db,
        sa.select(sa.func.count())
        .select_from(ledger_entries)
        .where(ledger_entries.c.kind == "purchase"),
    )
    assert purchase_entries == len(sessions)
    paid = scalar(
        app_db,
        sa.select(sa.func.count())
        .select_from(purchases)
        .where(purchases.c.status == "paid", purchases.c.credits_granted == PACK_CREDITS),
    )
    assert paid == len(sessions)
    distinct_events = len({body for body in bodies})
    assert scalar(app_db, sa.select(sa.func.count()).select_from(stripe_events)) == distinct_events
    assert_ledger_sound(app_db)
