"""Admission: a call's rate-limit slot and credit hold, taken at the same time only when that
cannot change any call's outcome, and given back whenever the call is refused."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from aicredits.domain.errors import InsufficientCredits, LimiterUnavailable, RateLimited
from aicredits.services.admission import REFUSAL_MEMORY_SECONDS, Admission
from aicredits.services.ledger import HoldView

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeSlot:
    def __init__(self) -> None:
        self.released = 0

    async def release(self) -> None:
        self.released += 1

    async def renew(self) -> None:
        return None


class FakeLimiter:
    """Answers after `delay` seconds: a slot, or `refuse` raised."""

    def __init__(self, log: list[str], *, delay: float = 0.01) -> None:
        self.log = log
        self.delay = delay
        self.refuse: BaseException | None = None
        self.slots: list[FakeSlot] = []

    async def acquire(self, *, user_id: int, ip: str | None, request_id: str) -> FakeSlot:
        self.log.append("acquire start")
        await asyncio.sleep(self.delay)
        self.log.append("acquire end")
        if self.refuse is not None:
            raise self.refuse
        slot = FakeSlot()
        self.slots.append(slot)
        return slot

    async def aclose(self) -> None:
        return None


def hold(hold_id: int = 1, *, replayed: bool = False) -> HoldView:
    return HoldView(
        id=hold_id,
        user_id=7,
        request_id=f"req_{hold_id}",
        amount=100,
        status="pending",
        charged=None,
        unbilled=0,
        expires_at=datetime(2026, 1, 1, tzinfo=UTC),
        replayed=replayed,
    )


class Rig:
    def __init__(self, *, limiter_delay: float = 0.01, reserve_delay: float = 0.01) -> None:
        self.log: list[str] = []
        self.now = 1000.0
        self.limiter = FakeLimiter(self.log, delay=limiter_delay)
        self.reserve_delay = reserve_delay
        self.reserve_fails: BaseException | None = None
        self.replayed = False
        self.released: list[int] = []
        self.admission = Admission(self.limiter, self.release, clock=lambda: self.now)
        self._next = 0

    async def release(self, view: HoldView) -> None:
        self.released.append(view.id)

    async def reserve(self) -> HoldView:
        self.log.append("reserve start")
        await asyncio.sleep(self.reserve_delay)
        self.log.append("reserve end")
        if self.reserve_fails is not None:
            raise self.reserve_fails
        self._next += 1
        return hold(self._next, replayed=self.replayed)

    async def admit(self, *, user_id: int = 7, keyed: bool = False) -> tuple[Any, HoldView]:
        return await self.admission.admit(
            user_id=user_id, ip="10.0.0.1", request_id="req_x", keyed=keyed, reserve=self.reserve
        )


def overlapped(log: list[str]) -> bool:
    return log.index("reserve start") < log.index("acquire end")


async def test_a_lone_call_takes_its_slot_and_hold_at_the_same_time() -> None:
    rig = Rig()
    slot, view = await rig.admit()
    assert overlapped(rig.log)
    assert view.id == 1 and rig.admission.active(7) == 1
    await slot.release()
    await slot.release()  # idempotent: counted once
    assert rig.limiter.slots[0].released == 2
    assert rig.admission.active(7) == 0


async def test_a_call_with_an_idempotency_key_takes_its_slot_first() -> None:
    rig = Rig()
    await rig.admit(keyed=True)
    assert rig.log == ["acquire start", "acquire end", "reserve start", "reserve end"]


async def test_a_second_call_of_a_busy_user_takes_its_slot_first() -> None:
    rig = Rig()
    first, _ = await rig.admit()
    rig.log.clear()
    await rig.admit()
    assert not overlapped(rig.log)
    await first.release()
    rig.log.clear()
    await rig.admit(user_id=8)  # another user is not busy
    assert overlapped(rig.log)


async def test_a_refused_call_gives_its_fresh_hold_back_and_raises_the_limiters_refusal() -> None:
    rig = Rig(limiter_delay=0.02)
    rig.limiter.refuse = RateLimited(scope="user", retry_after=3)
    rig.reserve_fails = None
    with pytest.raises(RateLimited):
        await rig.admit()
    assert overlapped(rig.log)
    assert rig.released == [1]
    assert rig.admission.active(7) == 0


async def test_the_limiters_refusal_wins_over_the_ledgers() -> None:
    rig = Rig()
    rig.limiter.refuse = RateLimited(scope="concurrent", retry_after=1)
    rig.reserve_fails = InsufficientCredits(needed=100, available=5)
    with pytest.raises(RateLimited):
        await rig.admit()
    assert rig.released == []


async def test_a_replayed_hold_is_never_released_by_a_refusal() -> None:
    rig = Rig()
    rig.replayed = True
    rig.limiter.refuse = RateLimited(scope="user", retry_after=1)
    with pytest.raises(RateLimited):
        await rig.admit()
    assert rig.released == []


async def test_after_a_refusal_the_users_calls_take_their_slot_first_for_a_while() -> None:
    rig = Rig()
    rig.limiter.refuse = RateLimited(scope="user", retry_after=2)
    with pytest.raises(RateLimited):
        await rig.admit()
    rig.log.clear()
    with pytest.raises(RateLimited):
        await rig.admit()
    # Refused before any reserve: a client hammering past its limit costs no writes.
    assert rig.log == ["acquire start", "acquire end"]
    assert rig.released == [1]
    rig.limiter.refuse = None
    rig.now += REFUSAL_MEMORY_SECONDS + 0.1
    rig.log.clear()
    await rig.admit()
    assert overlapped(rig.log)


async def test_a_limiter_outage_also_makes_the_user_take_the_slot_first() -> None:
    rig = Rig()
    rig.limiter.refuse = LimiterUnavailable("down")
    with pytest.raises(LimiterUnavailable):
        await rig.admit()
    assert rig.released == [1]
    assert not rig.admission.overlaps(7, keyed=False)


async def test_a_refused_reserve_gives_the_slot_back() -> None:
    for limiter_delay, reserve_delay in ((0.02, 0.0), (0.0, 0.02)):
        rig = Rig(limiter_delay=limiter_delay, reserve_delay=reserve_delay)
        rig.reserve_fails = InsufficientCredits(needed=100, available=5)
        with pytest.raises(InsufficientCredits):
            await rig.admit()
        assert [s.released for s in rig.limiter.slots] == [1]
        assert rig.admission.active(7) == 0
        # Not a limit's refusal: the next call still overlaps.
        assert rig.admission.overlaps(7, keyed=False)


async def test_a_caller_that_goes_away_gets_its_slot_and_hold_given_back() -> None:
    rig = Rig(limiter_delay=0.05, reserve_delay=0.05)
    call = asyncio.ensure_future(rig.admit())
    await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.1)
    assert [s.released for s in rig.limiter.slots] == [1]
    assert rig.released == [1]
    assert rig.admission.active(7) == 0
