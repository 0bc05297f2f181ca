"""A plan user out of credits is told so in a way the UI can act on: 402 `quota_exceeded`
with the plan, its reset date and the links, through the OpenAI-compatible API and in the
chat; a pack-only user keeps `insufficient_credits`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import openai
import pytest

from aicredits.adapters.tables import subscriptions, utcnow
from aicredits.services.subscriptions import QuotaExceeded
from aicredits.settings import Plan
from aicredits.state.chat import describe_error
from tests.integration.gateway_fixtures import MESSAGES, MODEL, Rig, running_rig


@pytest.fixture
def rig(db_url: str) -> Iterator[Rig]:
    with running_rig(db_url) as r:
        yield r


def on_plan(rig: Rig, user_id: int, *, status: str = "active") -> datetime:
    """A subscription row as Stripe's events leave it (the event path: test_plans.py)."""
    now = utcnow()
    ends = (now + timedelta(days=12)).replace(microsecond=0)
    with rig.db.transaction() as conn:
        conn.execute(
            subscriptions.insert().values(
                user_id=user_id,
                customer_id=f"cus_{user_id}",
                subscription_id=f"sub_{user_id}",
                plan_id="team",
                price_id="price_team",
                status=status,
                current_period_start=ends - timedelta(days=30),
                current_period_end=ends,
                cancel_at_period_end=False,
                event_created=1,
                simulated=False,
                created_at=now,
                updated_at=now,
            )
        )
    return ends


def test_a_plan_user_out_of_credits_gets_quota_exceeded_with_the_reset_date(rig: Rig) -> None:
    user, key = rig.user(credits=0)
    ends = on_plan(rig, user)
    with pytest.raises(openai.APIStatusError) as caught:
        rig.client(key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
    assert caught.value.status_code == 402
    error = caught.value.response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["plan"] == "team"
    assert datetime.fromisoformat(error["resets_at"]) == ends
    assert error["upgrade_url"] == error["buy_url"] == "http://localhost:3000/credits"
    assert ends.strftime("%Y-%m-%d") in error["message"]
    assert rig.upstream_stats()["chat_requests"] == 0


def test_a_cancelled_plan_leaves_insufficient_credits(rig: Rig) -> None:
    user, key = rig.user(credits=0)
    on_plan(rig, user, status="canceled")
    with pytest.raises(openai.APIStatusError) as caught:
        rig.client(key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
    assert caught.value.response.json()["error"]["code"] == "insufficient_credits"


def test_the_chat_names_the_plan_and_its_reset_date() -> None:
    exc = QuotaExceeded(
        available=3,
        needed=40,
        plan_id="team",
        plan="Team",
        resets_at=datetime(2027, 1, 5, tzinfo=UTC),
    )
    kind, message = describe_error(exc)
    assert kind == "credits"
    assert "Team plan" in message and "2027-01-05" in message


def test_a_past_due_plan_pauses_usage_only_when_its_policy_says_so(db_url: str) -> None:
    plans = [
        Plan(id="team", included_credits=100, price_id="price_team", usable_when_past_due=False)
    ]
    with running_rig(db_url, plans=plans) as rig:
        paused, paused_key = rig.user(credits=50_000)
        on_plan(rig, paused, status="past_due")
        with pytest.raises(openai.APIStatusError) as caught:
            rig.client(paused_key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
        assert caught.value.status_code == 402
        error = caught.value.response.json()["error"]
        assert error["code"] == "plan_past_due"
        assert error["manage_billing_url"] == "http://localhost:3000/credits"
        assert rig.balance(paused).held == 0
        # Paid up again (Stripe's event moves it back to active): usage resumes.
        with rig.db.transaction() as conn:
            conn.execute(
                subscriptions.update()
                .where(subscriptions.c.user_id == paused)
                .values(status="active")
            )
        rig.client(paused_key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
    with running_rig(db_url) as rig:  # the default plans keep usage going while past due
        going, going_key = rig.user(credits=50_000)
        on_plan(rig, going, status="past_due")
        rig.client(going_key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
