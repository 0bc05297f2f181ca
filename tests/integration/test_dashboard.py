"""The credits dashboard's figures, history and CSV, from a real ledger (SQLite and Postgres)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import Pool
from starlette.testclient import TestClient

from aicredits.adapters.db import Database
from aicredits.adapters.tables import utcnow
from aicredits.services import auth, dashboard, ledger, pricing
from aicredits.services.ledger import UsageRecord
from aicredits.settings import DEFAULT_MODELS, Settings, get_settings
from tests.factories import make_user, new_key

SETTINGS = Settings(_env_file=None)


def call(
    db: Database, user: int, charged: int, *, model: str = "demo-model", tokens: int = 10
) -> None:
    price = pricing.current_price(db, model=model)
    hold = ledger.reserve(db, user_id=user, credits=charged, request_id=new_key("r"))
    ledger.settle(
        db,
        hold=hold,
        actual_credits=charged,
        usage=UsageRecord(model, price.version_id, tokens, tokens * 2),
    )


@pytest.fixture
def priced(db: Database) -> Database:
    pricing.seed_prices(db, DEFAULT_MODELS)
    pricing.add_price_version(
        db, model="other-model", input_per_mtok=1, output_per_mtok=1, actor="t"
    )
    return db


def test_summary_shows_available_held_total_money_and_expiring(priced: Database) -> None:
    db = priced
    user = make_user(db, credits=5_000)
    ledger.grant(
        db, user_id=user, credits=300, key=new_key(), reason="promo",
        expires_at=utcnow() + timedelta(days=3),
    )  # fmt: skip
    ledger.reserve(db, user_id=user, credits=100, request_id="in-flight")
    s = dashboard.summary(db, SETTINGS, user_id=user)
    assert (s.available, s.held, s.total) == (5_200, 100, 5_300)
    assert s.available_money == "5.20 USD"  # 5,000 credits for 5.00 USD
    assert [credits for _, credits in s.expiring] == [300]
    assert s.allowance.size == 5_300 and s.allowance_since is not None


def test_usage_is_summed_by_model_and_by_day(priced: Database) -> None:
    db = priced
    user = make_user(db, credits=1_000)
    call(db, user, 5)
    call(db, user, 7)
    call(db, user, 3, model="other-model", tokens=100)
    other = make_user(db, credits=1_000)
    call(db, other, 50)  # someone else's usage never shows
    by_model = {m.model: m for m in dashboard.usage_by_model(db, user_id=user)}
    assert (by_model["demo-model"].calls, by_model["demo-model"].credits) == (2, 12)
    assert by_model["demo-model"].input_tokens == 20
    assert by_model["other-model"].output_tokens == 200
    days = dashboard.daily_usage(db, user_id=user)
    assert len(days) == 30
    assert days[-1].credits_by_model == {"demo-model": 12, "other-model": 3}
    assert all(d.credits_by_model == {} for d in days[:-1])


def test_history_pages_and_filters_newest_first(priced: Database) -> None:
    db = priced
    user = make_user(db, credits=1_000)
    for _ in range(25):
        call(db, user, 1)
    lines, pages = dashboard.history(db, user_id=user, page=1, per_page=10)
    assert pages == 3
    assert [line.kind for line in lines] == ["spend"] * 10
    assert lines[0].balance_after == 975 and lines[0].id > lines[1].id
    last, _ = dashboard.history(db, user_id=user, page=3, per_page=10)
    assert [line.kind for line in last][-1] == "grant"
    grants, grant_pages = dashboard.history(db, user_id=user, kind="grant")
    assert [(g.kind, g.amount) for g in grants] == [("grant", 1_000)] and grant_pages == 1
    beyond, _ = dashboard.history(db, user_id=user, page=99, per_page=10)
    assert beyond == last  # a page past the end shows the last one


def test_the_csv_holds_the_users_ledger_and_usage(priced: Database) -> None:
    db = priced
    user = make_user(db, credits=1_000)
    call(db, user, 4)
    rows = list(csv.DictReader(io.StringIO("".join(dashboard.export_csv(db, user_id=user)))))
    assert [r["record"] for r in rows] == ["ledger", "ledger", "usage"]
    grant, spend, usage = rows
    assert (grant["kind_or_model"], grant["credits"], grant["balance_after"]) == (
        "grant",
        "1000",
        "1000",
    )
    assert (spend["credits"], spend["balance_after"]) == ("-4", "996")
    assert (usage["kind_or_model"], usage["credits"], usage["input_tokens"]) == (
        "demo-model",
        "-4",
        "10",
    )


@pytest.fixture
def client(priced: Database, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("DATABASE_URL", db_url)
    get_settings.cache_clear()
    from aicredits.api.routes import build_api

    yield TestClient(build_api(get_settings()), follow_redirects=False)
    get_settings.cache_clear()


def test_the_export_route_serves_only_the_signed_in_users_csv(
    priced: Database, client: TestClient
) -> None:
    db = priced
    user, other = make_user(db, credits=70), make_user(db, credits=900)
    token = auth.create_session(db, user_id=user, days=1)
    response = client.get("/credits/export.csv", cookies={"aicredits_session": token})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(r["record"], r["credits"]) for r in rows] == [("ledger", "70")]
    assert other  # the other user's 900 are nowhere in it
    assert "900" not in response.text
    signed_out = client.get("/credits/export.csv")
    assert signed_out.status_code == 303 and "/login" in signed_out.headers["location"]


def test_the_credits_page_is_read_in_one_snapshot(priced: Database) -> None:
    db = priced
    user = make_user(db, credits=1_000)
    for _ in range(3):
        call(db, user, 200)
    ledger.reserve(db, user_id=user, credits=50, request_id="in-flight")
    checkouts = []

    def count(*_: object) -> None:
        checkouts.append(1)

    # Every pool (the Database has two on Postgres: one of them in autocommit).
    sa.event.listen(Pool, "checkout", count)
    try:
        page = dashboard.credits_page(db, SETTINGS, user_id=user, history_kind="spend")
    finally:
        sa.event.remove(Pool, "checkout", count)
    assert len(checkouts) == 1  # one connection, one transaction, for the whole page
    assert page.available == page.summary.available == 350
    assert (page.summary.held, page.summary.total) == (50, 400)
    assert (page.summary.allowance.used, page.summary.allowance_percent) == (600, 60)
    assert page.usage.banner is not None and page.usage.banner.threshold == 50
    assert page.usage.level == "info"
    assert [line.amount for line in page.history] == [-200, -200, -200]
    assert page.history_pages == 1
    assert sum(m.credits for m in page.usage_by_model) == 600
    assert sum(sum(d.credits_by_model.values()) for d in page.daily_usage) == 600
    assert [p.id for p in page.packs] == [p.id for p in SETTINGS.packs]
    assert page.purchases == [] and page.trial_notice == ""


def test_a_user_who_never_had_credits_has_used_none_of_them(priced: Database) -> None:
    s = dashboard.summary(priced, SETTINGS, user_id=make_user(priced))
    assert (s.allowance.size, s.allowance_percent, s.allowance_since) == (0, 0, None)
