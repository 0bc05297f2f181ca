"""Random operation sequences against a simple in-memory model, ending with verify-ledger clean.

The model is deliberately naive (lists and dicts, no SQL); the database must agree with it
after every step, on SQLite and on Postgres.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from aicredits.adapters.db import Database
from aicredits.domain.errors import InsufficientCredits
from aicredits.services import ledger, recovery, users
from aicredits.services.verify import verify_ledger
from tests.dbutil import empty_postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=10)
USERS = 3


@dataclass
class ModelLot:
    seq: int
    expires_at: datetime
    remaining: int


@dataclass
class ModelHold:
    user: int
    amount: int
    expires_at: datetime
    status: str = "pending"


@dataclass
class ModelAccount:
    balance: int = 0
    held: int = 0
    lots: list[ModelLot] = field(default_factory=list)

    def debit(self, amount: int) -> None:
        self.balance -= amount
        for lot in sorted(self.lots, key=lambda lot: (lot.expires_at, lot.seq)):
            take = min(lot.remaining, amount)
            lot.remaining -= take
            amount -= take


def make_machine(new_db: Callable[[], Database]) -> type[RuleBasedStateMachine]:
    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.db = new_db()
            self.now = T0
            self.user_ids = [
                users.create_user(self.db, email=f"p{i}@example.test").id for i in range(USERS)
            ]
            self.accounts = {u: ModelAccount() for u in self.user_ids}
            self.holds: dict[int, ModelHold] = {}
            self.grants: list[tuple[str, int, int]] = []
            self.seq = 0

        def teardown(self) -> None:
            assert verify_ledger(self.db) == []
            self.db.dispose()

        def _user(self, index: int) -> int:
            return self.user_ids[index % USERS]

        @rule(
            who=st.integers(0, USERS - 1),
            credits=st.integers(1, 200),
            expires_in=st.one_of(st.none(), st.integers(1, 90)),
        )
        def grant(self, who: int, credits: int, expires_in: int | None) -> None:
            user = self._user(who)
            self.seq += 1
            key = f"g{self.seq}"
            expires_at = self.now + timedelta(minutes=expires_in) if expires_in else None
            ledger.grant(
                self.db,
                user_id=user,
                credits=credits,
                key=key,
                reason="prop",
                expires_at=expires_at,
                now=self.now,
            )
            account = self.accounts[user]
            account.balance += credits
            if expires_at:
                account.lots.append(ModelLot(self.seq, expires_at, credits))
            self.grants.append((key, user, credits))

        @precondition(lambda self: self.grants)
        @rule(pick=st.integers(0, 10_000))
        def replay_a_grant(self, pick: int) -> None:
            key, user, credits = self.grants[pick % len(self.grants)]
            result = ledger.grant(
                self.db, user_id=user, credits=credits, key=key, reason="prop", now=self.now
            )
            assert result.replayed

        @rule(who=st.integers(0, USERS - 1), credits=st.integers(0, 120))
        def reserve(self, who: int, credits: int) -> None:
            user = self._user(who)
            account = self.accounts[user]
            self.seq += 1
            try:
                hold = ledger.reserve(
                    self.db,
                    user_id=user,
                    credits=credits,
                    request_id=f"r{self.seq}",
                    lease=TTL,
                    now=self.now,
                )
            except InsufficientCredits:
                assert account.balance - account.held < credits
                return
            assert account.balance - account.held >= credits
            account.held += credits
            self.holds[hold.id] = ModelHold(user, credits, self.now + TTL)

        @precondition(lambda self: self.holds)
        @rule(pick=st.integers(0, 10_000), actual=st.integers(0, 150))
        def settle(self, pick: int, actual: int) -> None:
            hold_id = sorted(self.holds)[pick % len(self.holds)]
            hold = self.holds[hold_id]
            result = ledger.settle(self.db, hold=hold_id, actual_credits=actual, now=self.now)
            if hold.status != "pending":
                assert not result.applied
                return
            charged = min(actual, hold.amount)
            assert (result.applied, result.charged) == (True, charged)
            account = self.accounts[hold.user]
            account.held -= hold.amount
            account.debit(charged)
            hold.status = "settled"

        @precondition(lambda self: self.holds)
        @rule(pick=st.integers(0, 10_000))
        def release(self, pick: int) -> None:
            hold_id = sorted(self.holds)[pick % len(self.holds)]
            hold = self.holds[hold_id]
            ledger.release(self.db, hold_id=hold_id, now=self.now)
            if hold.status == "pending":
                self.accounts[hold.user].held -= hold.amount
                hold.status = "released"

        @rule(who=st.integers(0, USERS - 1), credits=st.integers(-150, 150).filter(bool))
        def adjust(self, who: int, credits: int) -> None:
            user = self._user(who)
            account = self.accounts[user]
            self.seq += 1
            try:
                ledger.adjust(
                    self.db,
                    user_id=user,
                    credits=credits,
                    key=f"a{self.seq}",
                    actor="prop",
                    reason="prop",
                    now=self.now,
                )
            except InsufficientCredits:
                assert credits < 0
                assert account.balance - account.held < -credits
                return
            if credits > 0:
                account.balance += credits
            else:
                account.debit(-credits)

        @rule(minutes=st.integers(1, 60))
        def advance_and_run_jobs(self, minutes: int) -> None:
            self.now += timedelta(minutes=minutes)
            recovery.reclaim_lapsed_holds(self.db, now=self.now)
            for hold in self.holds.values():
                if hold.status == "pending" and hold.expires_at <= self.now:
                    hold.status = "expired"
                    self.accounts[hold.user].held -= hold.amount
            ledger.expire_due_grants(self.db, now=self.now)
            for account in self.accounts.values():
                for lot in sorted(account.lots, key=lambda lot: (lot.expires_at, lot.seq)):
                    if lot.expires_at <= self.now and lot.remaining:
                        take = min(lot.remaining, account.balance - account.held)
                        lot.remaining -= take
                        account.balance -= take

        @invariant()
        def balances_match_the_model(self) -> None:
            for user, account in self.accounts.items():
                bal = ledger.get_balance(self.db, user_id=user)
                assert (bal.balance, bal.held) == (account.balance, account.held), user
                assert bal.balance >= 0 and 0 <= bal.held <= bal.balance

        @invariant()
        def expiring_credits_match_the_model(self) -> None:
            for user, account in self.accounts.items():
                expected = [
                    (lot.expires_at, lot.remaining)
                    for lot in sorted(account.lots, key=lambda x: (x.expires_at, x.seq))
                    if lot.remaining > 0
                ]
                assert ledger.expiring_credits(self.db, user_id=user) == expected

    return LedgerMachine


def test_random_sequences_on_sqlite(sqlite_template: Path, tmp_path: Path) -> None:
    counter = iter(range(10**6))

    def new_db() -> Database:
        path = tmp_path / f"prop{next(counter)}.db"
        shutil.copyfile(sqlite_template, path)
        return Database(f"sqlite:///{path}")

    run_state_machine_as_test(
        make_machine(new_db),
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


@pytest.mark.postgres
def test_random_sequences_on_postgres(pg_url: str) -> None:
    def new_db() -> Database:
        empty_postgres(pg_url)
        return Database(pg_url)

    run_state_machine_as_test(
        make_machine(new_db),
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
