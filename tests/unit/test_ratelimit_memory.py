"""The in-process rate limiter, on a fake clock: windows, concurrency, and races."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator

import pytest

from aicredits.adapters.ratelimit import (
    MemoryRateLimiter,
    RateLimits,
    Slot,
    build_rate_limiter,
)
from aicredits.domain.errors import RateLimited


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(
    user: int = 0,
    ip: int = 0,
    concurrent: int = 0,
    *,
    clock: FakeClock | None = None,
    window: float = 60.0,
    slot_ttl: float = 900.0,
) -> MemoryRateLimiter:
    limits = RateLimits(user, ip, concurrent, window_seconds=window, slot_ttl_seconds=slot_ttl)
    return MemoryRateLimiter(limits, clock=clock or FakeClock())


_ids = iter(range(10**9))


def acquire(lim: MemoryRateLimiter, user_id: int = 1, ip: str | None = "10.0.0.1") -> Slot:
    return asyncio.run(lim.acquire(user_id=user_id, ip=ip, request_id=f"r{next(_ids)}"))


def refused(lim: MemoryRateLimiter, user_id: int = 1, ip: str | None = "10.0.0.1") -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        acquire(lim, user_id, ip)
    return caught.value


def test_a_user_gets_exactly_the_limit_per_window_then_is_told_when_to_retry() -> None:
    clock = FakeClock()
    lim = limiter(user=3, clock=clock)
    for _ in range(3):
        acquire(lim)
        clock.advance(1)
    exc = refused(lim)
    assert exc.scope == "user"
    assert exc.code == "rate_limited"
    assert exc.retry_after == pytest.approx(57.0)  # the first request leaves at t0 + 60
    assert exc.retry_after_header == "57"
    assert str(exc) == "Too many requests: try again in 57 s."
    acquire(lim, user_id=2)  # another user is not affected


def test_the_ip_window_counts_every_user_behind_one_address() -> None:
    lim = limiter(ip=2)
    acquire(lim, user_id=1, ip="10.0.0.1")
    acquire(lim, user_id=2, ip="10.0.0.1")
    exc = refused(lim, user_id=3, ip="10.0.0.1")
    assert exc.scope == "ip"
    assert "Too many requests" in str(exc)
    acquire(lim, user_id=3, ip="10.0.0.2")  # another address has its own window
    acquire(lim, user_id=3, ip=None)  # no address: no IP check


def test_the_user_window_is_checked_before_the_ip_window_and_concurrency() -> None:
    lim = limiter(user=1, ip=1, concurrent=1)
    acquire(lim)
    assert refused(lim).scope == "user"
    assert refused(lim, user_id=2).scope == "ip"
    assert refused(lim, ip="10.0.0.2").scope == "user"


def test_limits_of_zero_turn_every_check_off() -> None:
    lim = limiter(0, 0, 0)
    slots = [acquire(lim) for _ in range(1000)]
    assert len(slots) == 1000
    assert not lim._user_hits and not lim._ip_hits and not lim._slots  # nothing is recorded


def test_concurrency_is_capped_until_a_slot_is_released_and_release_is_idempotent() -> None:
    lim = limiter(concurrent=2)
    first, second = acquire(lim), acquire(lim)
    exc = refused(lim)
    assert exc.scope == "concurrent"
    assert exc.retry_after == 1.0
    assert exc.retry_after_header == "1"
    assert str(exc) == "Too many calls at once: wait for one to finish."
    acquire(lim, user_id=2)  # the cap is per user

    asyncio.run(first.release())
    asyncio.run(first.release())  # twice: must not free a second slot
    third = acquire(lim)
    assert refused(lim).scope == "concurrent"
    for slot in (second, third):
        asyncio.run(slot.release())
    acquire(lim)
    acquire(lim)


def test_a_reused_request_id_takes_its_own_slot_and_frees_only_its_own() -> None:
    lim = limiter(concurrent=2)
    a = asyncio.run(lim.acquire(user_id=1, ip=None, request_id="same"))
    asyncio.run(lim.acquire(user_id=1, ip=None, request_id="same"))
    assert refused(lim).scope == "concurrent"
    asyncio.run(a.release())
    acquire(lim)
    assert refused(lim).scope == "concurrent"


def test_a_refused_attempt_consumes_nothing() -> None:
    clock = FakeClock()
    lim = limiter(user=3, ip=3, concurrent=1, clock=clock)
    held = acquire(lim)
    for _ in range(10):
        assert refused(lim).scope == "concurrent"
    asyncio.run(held.release())
    acquire(lim)
    for _ in range(10):
        assert refused(lim).scope == "concurrent"
    lim = limiter(user=1, ip=2, clock=clock)
    acquire(lim, user_id=1)
    for _ in range(10):
        assert refused(lim, user_id=1).scope == "user"  # must not eat the IP's window
    acquire(lim, user_id=2)
    assert refused(lim, user_id=3).scope == "ip"


def test_retry_after_counts_down_as_the_clock_moves() -> None:
    clock = FakeClock()
    lim = limiter(user=1, clock=clock, window=10)
    acquire(lim)
    waits = []
    for _ in range(4):
        waits.append(refused(lim).retry_after)
        clock.advance(2.5)
    assert waits == pytest.approx([10.0, 7.5, 5.0, 2.5])
    acquire(lim)  # exactly one window later


def test_the_window_slides_so_a_boundary_allows_no_double_burst() -> None:
    clock = FakeClock(0.0)
    lim = limiter(user=10, clock=clock)
    clock.advance(59)
    for _ in range(10):
        acquire(lim)  # a burst at the end of one minute...
    clock.advance(2)  # ...and the next minute starts
    exc = refused(lim)  # a fixed window would grant another 10 here
    assert exc.retry_after == pytest.approx(58.0)
    clock.advance(57.9)
    refused(lim)
    clock.advance(0.1)
    for _ in range(10):
        acquire(lim)
    refused(lim)


def test_idle_keys_are_dropped_so_memory_does_not_grow() -> None:
    clock = FakeClock()
    lim = limiter(user=5, ip=5, concurrent=5, clock=clock, window=10, slot_ttl=30)
    for user in range(500):
        acquire(lim, user_id=user, ip=f"10.0.{user // 250}.{user % 250}")
    assert len(lim._user_hits) == 500
    clock.advance(31)
    acquire(lim, user_id=10_000, ip="192.0.2.1")  # any call sweeps once the window has passed
    assert list(lim._user_hits) == [10_000]
    assert list(lim._ip_hits) == ["192.0.2.1"]
    assert list(lim._slots) == [10_000]


def test_a_leaked_slot_is_dropped_after_the_slot_ttl() -> None:
    clock = FakeClock()
    lim = limiter(concurrent=1, clock=clock, slot_ttl=300)
    acquire(lim)  # never released
    clock.advance(299)
    assert refused(lim).scope == "concurrent"
    clock.advance(1)
    acquire(lim)


def test_retry_after_header_rounds_up_to_whole_seconds_and_is_at_least_one() -> None:
    assert RateLimited(scope="user", retry_after=0.0001).retry_after_header == "1"
    assert RateLimited(scope="user", retry_after=0).retry_after > 0
    assert RateLimited(scope="user", retry_after=11.2).retry_after_header == "12"
    assert RateLimited(scope="ip", retry_after=12.0000000001).retry_after_header == "12"


def test_64_concurrent_tasks_get_exactly_the_limit() -> None:
    lim = limiter(user=10, concurrent=0)

    async def attempt(i: int) -> bool:
        await asyncio.sleep(0)
        try:
            await lim.acquire(user_id=1, ip=None, request_id=f"t{i}")
        except RateLimited:
            return False
        return True

    async def main() -> list[bool]:
        return await asyncio.gather(*(attempt(i) for i in range(64)))

    assert sum(asyncio.run(main())) == 10


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    # Switch threads as often as possible, so an unlocked check-then-record would race.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def hammer_from_threads(limits: RateLimits, rounds: int, threads: int = 64) -> list[list[str]]:
    """Per round, a fresh limiter that every thread (each with its own event loop) calls
    acquire() on 3 times, all threads starting together; nothing is released. Returns each
    round's outcomes: "granted" or the refusal's scope, one per call. Many short rounds make
    many chances for a race at the moment the limit is reached."""
    limiters = [MemoryRateLimiter(limits) for _ in range(rounds)]
    outcomes: list[list[str]] = [[] for _ in range(rounds)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads, timeout=30)

    async def attempts(i: int) -> None:
        for r, lim in enumerate(limiters):
            start.wait()  # blocking on purpose: it lines the threads up, nothing else runs
            for j in range(3):
                try:
                    await lim.acquire(user_id=1, ip=None, request_id=f"t{i}-{j}")
                except RateLimited as exc:
                    outcomes[r].append(exc.scope)
                else:
                    outcomes[r].append("granted")

    def thread(i: int) -> None:
        try:
            asyncio.run(attempts(i))
        except BaseException as exc:
            errors.append(exc)
            start.abort()  # the others would wait for this thread forever

    pool = [threading.Thread(target=thread, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors[0]
    return outcomes


@pytest.mark.usefixtures("frequent_thread_switches")
def test_64_threads_get_exactly_the_limit_of_requests() -> None:
    for outcomes in hammer_from_threads(RateLimits(20, 0, 0), rounds=100):
        assert outcomes.count("granted") == 20
        assert outcomes.count("user") == 64 * 3 - 20


@pytest.mark.usefixtures("frequent_thread_switches")
def test_64_threads_get_exactly_the_limit_of_concurrency_slots() -> None:
    for outcomes in hammer_from_threads(RateLimits(0, 0, concurrent_per_user=7), rounds=100):
        assert outcomes.count("granted") == 7
        assert outcomes.count("concurrent") == 64 * 3 - 7


def test_release_from_another_thread_frees_the_slot() -> None:
    lim = limiter(concurrent=1)
    slot = acquire(lim)
    worker = threading.Thread(target=lambda: asyncio.run(slot.release()))
    worker.start()
    worker.join()
    acquire(lim)


def test_build_rate_limiter_without_a_redis_url_is_in_process() -> None:
    limits = RateLimits(1, 1, 1)
    assert isinstance(
        build_rate_limiter(limits, redis_url=None, fail_open=False), MemoryRateLimiter
    )
    assert isinstance(build_rate_limiter(limits, redis_url="", fail_open=True), MemoryRateLimiter)


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="0"):
        RateLimits(-1, 0, 0)
    with pytest.raises(ValueError, match="positive"):
        RateLimits(1, 1, 1, window_seconds=0)
