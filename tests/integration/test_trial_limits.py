"""Free trials per client address per day (TRIALS_PER_ADDRESS_PER_DAY), through the sign-in
service, on SQLite and Postgres: the limit, other addresses, repeated sign-ins, the repair of
a lost trial, the notice, and sign-ups at the same moment from one address."""

from __future__ import annotations

import inspect
import threading
import uuid
from datetime import date, datetime, timedelta

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.oauth import ProviderIdentity
from aicredits.adapters.tables import ledger_entries, trial_addresses, users, utcnow
from aicredits.domain.trials import UNKNOWN_ADDRESS
from aicredits.services import admin_views, auth, jobs, ledger, trials
from aicredits.services.verify import verify_ledger
from aicredits.settings import Settings

TRIAL = 500
HOME = "203.0.113.5"
NEIGHBOUR = "198.51.100.7"


def config(limit: int = 3, trial: int = TRIAL) -> Settings:
    return Settings(_env_file=None, free_trial_credits=trial, trials_per_address_per_day=limit)


def identity(subject: str | None = None) -> ProviderIdentity:
    subject = subject or uuid.uuid4().hex
    return ProviderIdentity(
        subject=subject, email=f"{subject}@example.test", email_verified=True, name="", picture=None
    )


def sign_in(
    db: Database,
    settings: Settings,
    address: str | None,
    who: ProviderIdentity | None = None,
    *,
    now: datetime | None = None,
) -> int:
    """What finish_login does once the provider has vouched for the identity."""
    user_id, _ = auth.sign_in_identity(
        db,
        provider="dev",
        identity=who or identity(),
        now=now,
        client_address=address,
        trial_limit=auth.trial_limit(settings, address),
    )
    auth.ensure_trial_grant(db, settings, user_id=user_id, now=now)
    return user_id


def balance(db: Database, user_id: int) -> int:
    return ledger.get_balance(db, user_id=user_id).balance


def counts(db: Database, address: str, day: date | None = None) -> tuple[int, int] | None:
    with db.read() as conn:
        row = conn.execute(
            sa.select(trial_addresses.c.granted, trial_addresses.c.refused).where(
                trial_addresses.c.address == address,
                trial_addresses.c.day == (day or utcnow().date()),
            )
        ).first()
    return None if row is None else (int(row.granted), int(row.refused))


def test_past_the_limit_an_account_is_created_without_the_trial_and_told_why(
    db: Database,
) -> None:
    settings = config(limit=3)
    first_three = [sign_in(db, settings, HOME) for _ in range(3)]
    assert [balance(db, u) for u in first_three] == [TRIAL] * 3
    fourth = sign_in(db, settings, HOME)
    assert balance(db, fourth) == 0
    assert trials.trial_notice(db, user_id=fourth) == (
        "No free trial for this account: 3 accounts already got one from your network "
        "today. Buy credits to start."
    )
    assert [trials.trial_notice(db, user_id=u) for u in first_three] == [None] * 3
    assert counts(db, HOME) == (3, 1)
    # Another address has its own count.
    elsewhere = sign_in(db, settings, NEIGHBOUR)
    assert balance(db, elsewhere) == TRIAL
    assert trials.trial_notice(db, user_id=elsewhere) is None
    assert counts(db, NEIGHBOUR) == (1, 0)
    assert verify_ledger(db) == []


def test_a_refused_account_never_gets_the_trial_at_a_later_sign_in(db: Database) -> None:
    settings = config(limit=1)
    sign_in(db, settings, HOME)
    who = identity()
    refused = sign_in(db, settings, HOME, who)
    tomorrow = utcnow() + timedelta(days=1)
    for address in (HOME, NEIGHBOUR):  # even from elsewhere, even on another day
        assert sign_in(db, settings, address, who, now=tomorrow) == refused
    assert not auth.ensure_trial_grant(db, settings, user_id=refused)
    assert balance(db, refused) == 0
    assert counts(db, HOME) == (1, 1)
    assert counts(db, NEIGHBOUR, tomorrow.date()) is None  # signing in again counts nothing


def test_signing_in_again_does_not_use_up_the_addresss_trials(db: Database) -> None:
    settings = config(limit=3)
    regular = identity()
    user = sign_in(db, settings, HOME, regular)
    for _ in range(5):
        assert sign_in(db, settings, HOME, regular) == user
    assert counts(db, HOME) == (1, 0)
    # A second provider with the same verified email links to the same account: no count.
    linked = ProviderIdentity(
        subject="other-provider-subject",
        email=regular.email,
        email_verified=True,
        name="",
        picture=None,
    )
    user_id, created = auth.sign_in_identity(
        db, provider="oidc", identity=linked, client_address=HOME, trial_limit=3
    )
    assert (user_id, created) == (user, False)
    assert counts(db, HOME) == (1, 0)
    others = [sign_in(db, settings, HOME) for _ in range(2)]
    assert [balance(db, u) for u in others] == [TRIAL, TRIAL]
    assert balance(db, user) == TRIAL


def test_a_trial_lost_to_a_crash_is_still_given_at_the_next_sign_in(db: Database) -> None:
    settings = config(limit=1)
    who = identity()
    user_id, created = auth.sign_in_identity(
        db, provider="dev", identity=who, client_address=HOME, trial_limit=1
    )
    assert created and balance(db, user_id) == 0  # the grant never ran
    assert sign_in(db, settings, NEIGHBOUR, who) == user_id
    assert balance(db, user_id) == TRIAL
    assert counts(db, HOME) == (1, 0)
    assert counts(db, NEIGHBOUR) is None


def test_the_limit_resets_with_the_utc_day(db: Database) -> None:
    settings = config(limit=1)
    today = utcnow()
    assert balance(db, sign_in(db, settings, HOME, now=today)) == TRIAL
    assert balance(db, sign_in(db, settings, HOME, now=today)) == 0
    tomorrow = today + timedelta(days=1)
    assert balance(db, sign_in(db, settings, HOME, now=tomorrow)) == TRIAL
    assert counts(db, HOME, tomorrow.date()) == (1, 0)


def test_one_ipv6_64_is_one_address(db: Database) -> None:
    settings = config(limit=1)
    assert balance(db, sign_in(db, settings, "2001:db8:5:6::1")) == TRIAL
    assert balance(db, sign_in(db, settings, "2001:db8:5:6:abcd::2")) == 0
    assert balance(db, sign_in(db, settings, "2001:db8:5:7::1")) == TRIAL
    assert counts(db, "2001:db8:5:6::/64") == (1, 1)


def test_an_unknown_address_counts_in_one_shared_bucket(db: Database) -> None:
    settings = config(limit=1)
    assert balance(db, sign_in(db, settings, None)) == TRIAL
    assert balance(db, sign_in(db, settings, "testclient")) == 0
    assert counts(db, UNKNOWN_ADDRESS) == (1, 1)


@pytest.mark.parametrize(("limit", "trial"), [(0, TRIAL), (1, 0)])
def test_nothing_is_counted_without_a_limit_or_without_a_trial(
    db: Database, limit: int, trial: int
) -> None:
    settings = config(limit=limit, trial=trial)
    accounts = [sign_in(db, settings, HOME) for _ in range(3)]
    assert [balance(db, u) for u in accounts] == [trial] * 3
    assert [trials.trial_notice(db, user_id=u) for u in accounts] == [None] * 3
    assert counts(db, HOME) is None


def test_the_notice_goes_once_the_account_has_credits(db: Database) -> None:
    settings = config(limit=1)
    sign_in(db, settings, HOME)
    refused = sign_in(db, settings, HOME)
    assert trials.trial_notice(db, user_id=refused) is not None
    ledger.grant(db, user_id=refused, credits=100, key=f"buy:{refused}", reason="a purchase")
    assert trials.trial_notice(db, user_id=refused) is None


def test_the_notice_names_the_day_once_it_is_past(db: Database) -> None:
    settings = config(limit=1)
    monday = datetime.fromisoformat("2026-11-30T10:00:00+00:00")
    sign_in(db, settings, HOME, now=monday)
    refused = sign_in(db, settings, HOME, now=monday)
    notice = trials.trial_notice(db, user_id=refused, now=monday + timedelta(days=2))
    assert notice is not None
    assert "1 account had already got one from your network on 2026-11-30 (UTC)" in notice


def test_sign_ups_at_the_same_moment_from_one_address_get_exactly_the_limit(
    db: Database,
) -> None:
    settings = config(limit=3)
    gate = threading.Barrier(10)
    made: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def sign_up() -> None:
        try:
            gate.wait()
            user_id = sign_in(db, settings, HOME)
            with lock:
                made.append(user_id)
        except BaseException as exc:  # reported below, so a thread's failure fails the test
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=sign_up) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(made)) == 10
    assert sorted(balance(db, u) for u in made) == [0] * 7 + [TRIAL] * 3
    assert counts(db, HOME) == (3, 7)
    with db.read() as conn:
        withheld = conn.execute(
            sa.select(sa.func.count()).where(users.c.trial_withheld_at.is_not(None))
        ).scalar_one()
        grants = conn.execute(
            sa.select(sa.func.count()).where(ledger_entries.c.reason == "free trial")
        ).scalar_one()
    assert (withheld, grants) == (7, 3)
    assert verify_ledger(db) == []


def test_in_development_sign_ups_from_this_machine_are_not_limited(db: Database) -> None:
    """`make run`: every account a developer makes comes from 127.0.0.1 (or ::1)."""
    settings = Settings(
        _env_file=None, environment="dev", free_trial_credits=TRIAL, trials_per_address_per_day=1
    )
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.1", "127.0.0.1"):
        user = sign_in(db, settings, address)
        assert balance(db, user) == TRIAL, address
    # Other addresses still count, in development too.
    assert balance(db, sign_in(db, settings, HOME)) == TRIAL
    assert balance(db, sign_in(db, settings, HOME)) == 0


def test_in_production_this_machines_address_is_limited_like_any_other(db: Database) -> None:
    """Behind a proxy that is not trusted, every client looks like 127.0.0.1: the limit must
    not open up for all of them."""
    settings = Settings(
        _env_file=None, environment="prod", free_trial_credits=TRIAL, trials_per_address_per_day=1
    )
    assert auth.trial_limit(settings, "127.0.0.1") == 1
    assert auth.trial_limit(settings.model_copy(update={"environment": "dev"}), "127.0.0.1") == 0


def test_counts_per_address_are_forgotten_after_the_admin_overviews_window(
    db: Database,
) -> None:
    settings = config(limit=1)
    now = utcnow()
    kept_days = trials.ADDRESS_DAYS_KEPT
    old, edge = now - timedelta(days=kept_days + 1), now - timedelta(days=kept_days)
    for moment in (old, edge, now):
        sign_in(db, settings, HOME, now=moment)
    refused_today = sign_in(db, settings, HOME, now=now)
    report = jobs.run_all(db, settings, now=now)
    assert report.trial_addresses_forgotten == 1
    assert counts(db, HOME, old.date()) is None
    assert counts(db, HOME, edge.date()) == (1, 0)  # still inside the overview's window
    assert counts(db, HOME, now.date()) == (1, 1)
    # Today's limit still holds, and the refused account is still told why.
    assert balance(db, sign_in(db, settings, HOME, now=now)) == 0
    assert trials.trial_notice(db, user_id=refused_today, now=now) is not None
    assert jobs.run_all(db, settings, now=now).trial_addresses_forgotten == 0
    # The overview never looks further back than the counts are kept.
    window = inspect.signature(admin_views.overview).parameters["days"].default
    assert window <= kept_days
