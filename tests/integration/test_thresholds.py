"""Usage warnings against a real ledger: allowances across top-ups and expiry, each
crossing recorded once, dismissal, and the email job over a real SMTP socket."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import TOP_UP_PREDICATE, threshold_crossings, utcnow
from aicredits.adapters.tables import users as users_table
from aicredits.services import jobs, ledger, outbox, thresholds, users
from aicredits.settings import Settings
from tests.factories import make_user, new_key
from tests.smtp_sink import Sink, smtp_sink

SETTINGS = Settings(_env_file=None)


def spend(db: Database, user: int, credits: int) -> None:
    hold = ledger.reserve(db, user_id=user, credits=credits, request_id=new_key("r"))
    ledger.settle(db, hold=hold, actual_credits=credits)


def rows(db: Database, user: int) -> list[tuple[int, bool]]:
    with db.read() as conn:
        return [
            (r.threshold, r.dismissed_at is not None)
            for r in conn.execute(
                sa.select(threshold_crossings)
                .where(threshold_crossings.c.user_id == user)
                .order_by(threshold_crossings.c.id)
            )
        ]


def test_each_crossing_is_recorded_once_per_allowance(db: Database) -> None:
    user = make_user(db, credits=100)
    spend(db, user, 49)
    assert thresholds.record_crossings(db, SETTINGS, user_id=user) == []
    spend(db, user, 1)
    assert thresholds.record_crossings(db, SETTINGS, user_id=user) == [50]
    assert thresholds.record_crossings(db, SETTINGS, user_id=user) == []
    spend(db, user, 40)
    assert thresholds.record_crossings(db, SETTINGS, user_id=user) == [80]
    assert rows(db, user) == [(50, False), (80, False)]


def test_a_top_up_starts_a_new_allowance_and_clears_the_banner(db: Database) -> None:
    user = make_user(db, credits=100)
    spend(db, user, 85)
    banner = thresholds.banner(db, SETTINGS, user_id=user)
    assert banner is not None and (banner.threshold, banner.level) == (80, "warning")
    ledger.grant(db, user_id=user, credits=1_000, key=new_key(), reason="bought")
    assert thresholds.banner(db, SETTINGS, user_id=user) is None
    allowance = thresholds.current_allowance(db, user_id=user)
    assert (allowance.size, allowance.used) == (1_015, 0)  # the 15 left + the 1,000 bought


def test_expired_credits_count_as_used(db: Database) -> None:
    now = utcnow()
    user = make_user(db)
    ledger.grant(
        db, user_id=user, credits=100, key=new_key(), reason="trial", expires_at=now + timedelta(1)
    )
    spend(db, user, 10)
    ledger.expire_due_grants(db, now=now + timedelta(days=2))
    assert thresholds.current_allowance(db, user_id=user).percent_used == 100
    banner = thresholds.banner(db, SETTINGS, user_id=user)
    assert banner is not None and banner.level == "blocking" and not banner.dismissible


def test_dismissing_hides_a_threshold_until_the_next_top_up(db: Database) -> None:
    user = make_user(db, credits=100)
    spend(db, user, 60)
    assert thresholds.banner(db, SETTINGS, user_id=user) is not None
    assert thresholds.dismiss(db, SETTINGS, user_id=user, threshold=50)
    assert thresholds.banner(db, SETTINGS, user_id=user) is None
    spend(db, user, 25)  # a higher threshold is a new banner
    banner = thresholds.banner(db, SETTINGS, user_id=user)
    assert banner is not None and banner.threshold == 80
    spend(db, user, 15)
    assert not thresholds.dismiss(db, SETTINGS, user_id=user, threshold=100)  # blocking stays


def test_configured_thresholds_are_used(db: Database) -> None:
    user = make_user(db, credits=100)
    spend(db, user, 30)
    custom = Settings(_env_file=None, threshold_percents=[25, 90])
    assert thresholds.record_crossings(db, custom, user_id=user) == [25]


@pytest.fixture
def smtp() -> Iterator[tuple[Sink, Settings]]:
    with smtp_sink() as sink:
        settings = Settings(
            _env_file=None,
            smtp_host=sink.host,
            smtp_port=sink.port,
            smtp_from="alerts@example.test",
            smtp_starttls=False,
        )
        yield sink, settings


def test_the_email_job_sends_each_crossing_once(db: Database, smtp: tuple[Sink, Settings]) -> None:
    sink, settings = smtp
    user = make_user(db, credits=100, email="spender@example.test")
    spend(db, user, 85)
    assert thresholds.record_crossings(db, settings, user_id=user) == [50, 80]
    assert thresholds.send_due_emails(db, settings) == 2
    assert thresholds.send_due_emails(db, settings) == 0
    assert len(sink.messages) == 2
    assert "used 80% of your current credits" in sink.messages[1]
    assert "spender@example.test" in sink.messages[0]


def test_a_failed_email_is_retried_later_and_never_raises(
    db: Database, smtp: tuple[Sink, Settings]
) -> None:
    sink, settings = smtp
    user = make_user(db, credits=100)
    spend(db, user, 55)
    thresholds.record_crossings(db, settings, user_id=user)
    sink.refuse = True
    assert thresholds.send_due_emails(db, settings) == 0
    with db.read() as conn:
        row = conn.execute(sa.select(threshold_crossings)).one()
    assert row.emailed_at is None and row.email_attempts == 1 and "550" in row.email_error
    assert row.next_email_at > utcnow()
    sink.refuse = False
    assert thresholds.send_due_emails(db, settings) == 0  # not due yet: backoff
    later = utcnow() + timedelta(hours=1)
    assert thresholds.send_due_emails(db, settings, now=later) == 1
    assert len(sink.messages) == 1


def test_without_smtp_nothing_is_queued(db: Database) -> None:
    user = make_user(db, credits=100)
    spend(db, user, 55)
    thresholds.record_crossings(db, SETTINGS, user_id=user)
    assert thresholds.send_due_emails(db, SETTINGS) == 0


def test_the_last_top_up_is_read_through_its_partial_index(db: Database) -> None:
    """After every charge the allowance's start is read; on a heavy user's long ledger a scan
    would cost milliseconds per call. The planner can use the partial index only when the
    query repeats the index's predicate with literal constants, not bound parameters: only
    the user id may be a parameter, and the plan must name the index even when Postgres
    plans the statement generically (as it does once psycopg prepares it)."""
    user = make_user(db)
    ledger.grant(db, user_id=user, credits=1000, key=new_key(), reason="test")
    spend(db, user, 10)
    compiled = thresholds.last_top_up_query(user).compile(db.engine)
    assert TOP_UP_PREDICATE in str(compiled)  # literally: not as parameters
    with db.engine.connect() as conn:
        if db.engine.dialect.name == "postgresql":
            literal = thresholds.last_top_up_query(user).compile(
                db.engine, compile_kwargs={"literal_binds": True}
            )
            sql = str(literal).replace(f"user_id = {user}", "user_id = $1")
            conn.exec_driver_sql("SET enable_seqscan = off")
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            conn.exec_driver_sql(f"PREPARE top_up(bigint) AS {sql}")
            rows = conn.exec_driver_sql(f"EXPLAIN EXECUTE top_up({user})")
        else:
            params = tuple(compiled.params[name] for name in compiled.positiontup or ())
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
        plan = "\n".join(str(r[-1]) for r in rows)
    assert "ix_ledger_entries_top_ups" in plan, plan
    assert thresholds.current_allowance(db, user_id=user).size == 1000


def test_the_migration_and_the_model_agree_on_the_top_up_predicate() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "alembic/versions/0007_top_up_index.py"
    spec = importlib.util.spec_from_file_location("m0007", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.PREDICATE == TOP_UP_PREDICATE


def test_the_banner_only_reads(db: Database) -> None:
    """It is computed from the balance: a crossing no charge recorded still shows, and
    showing it writes nothing (the gateway and the jobs record crossings)."""
    user = make_user(db, credits=100)
    spend(db, user, 85)
    banner = thresholds.banner(db, SETTINGS, user_id=user)
    assert banner is not None and (banner.threshold, banner.level) == (80, "warning")
    assert rows(db, user) == []
    assert thresholds.record_crossings(db, SETTINGS, user_id=user) == [50, 80]


def test_a_crossing_no_charge_recorded_can_be_dismissed(db: Database) -> None:
    user = make_user(db, credits=100)
    ledger.adjust(db, user_id=user, credits=-60, key=new_key(), actor="admin", reason="test")
    assert rows(db, user) == []  # an adjustment records no crossing
    assert thresholds.dismiss(db, SETTINGS, user_id=user, threshold=50)
    assert rows(db, user) == [(50, True)]
    assert thresholds.banner(db, SETTINGS, user_id=user) is None


def test_a_user_without_an_email_address_gets_no_email_queued(
    db: Database, smtp: tuple[Sink, Settings]
) -> None:
    sink, settings = smtp
    user = users.create_user(db, email=None, name="No Address").id
    ledger.grant(db, user_id=user, credits=100, key=new_key(), reason="test")
    spend(db, user, 55)
    assert thresholds.record_crossings(db, settings, user_id=user) == [50]
    with db.read() as conn:
        row = conn.execute(sa.select(threshold_crossings)).one()
    assert row.next_email_at is None and row.email_attempts == 0
    assert thresholds.send_due_emails(db, settings, now=utcnow() + timedelta(days=1)) == 0
    assert sink.messages == []


def test_a_queued_email_with_nobody_to_send_it_to_is_closed_at_once(
    db: Database, smtp: tuple[Sink, Settings]
) -> None:
    """Rows queued before addresses were checked (or whose user lost theirs) are not claimed
    and skipped for ever: the first run closes them."""
    sink, settings = smtp
    user = make_user(db, credits=100)
    spend(db, user, 55)
    thresholds.record_crossings(db, settings, user_id=user)
    with db.transaction() as conn:
        conn.execute(sa.update(users_table).where(users_table.c.id == user).values(email=None))
    assert thresholds.send_due_emails(db, settings) == 0
    with db.read() as conn:
        row = conn.execute(sa.select(threshold_crossings)).one()
    assert (row.next_email_at, row.emailed_at, row.email_error) == (None, None, outbox.NO_RECIPIENT)
    assert row.email_attempts == 1
    assert thresholds.send_due_emails(db, settings, now=utcnow() + timedelta(days=1)) == 0
    with db.read() as conn:
        assert conn.execute(sa.select(threshold_crossings.c.email_attempts)).scalar_one() == 1
    assert sink.messages == []


def test_an_email_refused_every_time_is_given_up_with_its_error_kept(
    db: Database, smtp: tuple[Sink, Settings]
) -> None:
    sink, settings = smtp
    user = make_user(db, credits=100)
    spend(db, user, 55)
    thresholds.record_crossings(db, settings, user_id=user)
    sink.refuse = True
    moment = utcnow()
    for _ in range(outbox.MAX_ATTEMPTS):
        assert thresholds.send_due_emails(db, settings, now=moment) == 0
        moment += timedelta(days=1)  # past any backoff
    with db.read() as conn:
        row = conn.execute(sa.select(threshold_crossings)).one()
    assert row.email_attempts == outbox.MAX_ATTEMPTS
    assert row.next_email_at is None and row.emailed_at is None and "550" in row.email_error
    sink.refuse = False
    assert thresholds.send_due_emails(db, settings, now=moment + timedelta(days=30)) == 0
    assert sink.messages == []


def test_credits_that_expire_are_warned_of_by_the_jobs(
    db: Database, smtp: tuple[Sink, Settings]
) -> None:
    sink, settings = smtp
    now = utcnow()
    user = make_user(db, email="expiring@example.test")
    ledger.grant(
        db, user_id=user, credits=100, key=new_key(), reason="trial", expires_at=now + timedelta(1)
    )
    spend(db, user, 10)
    report = jobs.run_all(db, settings, now=now + timedelta(days=2))
    assert (report.credits_expired, report.emails_sent) == (90, 3)
    assert rows(db, user) == [(50, False), (80, False), (100, False)]
    assert sum("used 100% of your current credits" in m for m in sink.messages) == 1


def test_the_settle_tells_the_gateway_when_a_crossing_may_need_recording(db: Database) -> None:
    """The settle returns the current allowance's top-up with the balance (one statement), so
    the gateway skips record_crossings after the charges below every threshold; the others
    still get there."""
    user = make_user(db, credits=100)

    def charge(credits: int) -> bool:
        hold = ledger.reserve(db, user_id=user, credits=credits, request_id=new_key("r"))
        settled = ledger.settle(db, hold=hold, actual_credits=credits)
        assert settled.balance_after is not None
        current = thresholds.current_allowance(db, user_id=user)
        assert settled.top_up_id == current.entry_id  # what the settle read is the allowance
        return thresholds.may_need_recording(
            SETTINGS,
            balance=settled.balance_after,
            top_up_id=settled.top_up_id,
            top_up_balance_after=settled.top_up_balance_after,
        )

    assert charge(49) is False
    assert charge(1) is True  # 50% reached
    assert thresholds.record_crossings(db, SETTINGS, user_id=user) == [50]
    assert charge(30) is True  # still past 50%: checked again (and 80% is reached now)
    assert thresholds.record_crossings(db, SETTINGS, user_id=user) == [80]
    ledger.grant(db, user_id=user, credits=1_000, key=new_key(), reason="bought")
    assert charge(1) is False  # a new allowance, barely used
    assert rows(db, user) == [(50, False), (80, False)]
