"""The Redis rate limiter against a real Redis: the memory limiter's semantics, exact limits
under concurrency from one process and from two, expiry of idle keys and leaked slots, and
what happens when Redis is down.

Redis is at AICREDITS_TEST_REDIS_URL (default: the local server, db 0). `make test` starts it
when it is down; run by hand without it, these tests fail with a message saying so rather
than skipping silently. Each test uses its own random key prefix and deletes its keys.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar, cast
from urllib.parse import urlsplit

import pytest
import redis
from redis.asyncio import Redis

from aicredits.adapters.ratelimit import (
    ACQUIRE_LUA,
    REDIS_CONNECT_TIMEOUT,
    REDIS_TIMEOUT,
    MemoryRateLimiter,
    RateLimits,
    RedisRateLimiter,
    Slot,
    build_rate_limiter,
    limiter_client,
)
from aicredits.domain.errors import LimiterUnavailable, RateLimited
from tests.integration.ratelimit_workers import acquire_many

REDIS_URL = os.environ.get("AICREDITS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
UNREACHABLE = "redis://127.0.0.1:1/0"
LOGGER = "aicredits.adapters.ratelimit"
T = TypeVar("T")


@pytest.fixture(scope="module")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({exc}). `make test` starts it; or run "
            '`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ""`, or point '
            "AICREDITS_TEST_REDIS_URL at another server.",
            pytrace=False,
        )
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client, to look at the keys the limiter leaves."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix(db: redis.Redis) -> Iterator[str]:
    prefix = f"aicredits:test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(db.scan_iter(match=prefix + "*"))
    if keys:
        db.delete(*keys)


def our_keys(db: redis.Redis, prefix: str) -> list[str]:
    return sorted(k.decode().removeprefix(prefix) for k in db.scan_iter(match=prefix + "*"))


def pttl(db: redis.Redis, key: str) -> int:
    return cast(int, db.pttl(key))


def run(
    url: str,
    prefix: str,
    limits: RateLimits,
    scenario: Callable[[RedisRateLimiter], Awaitable[T]],
    *,
    fail_open: bool = False,
) -> T:
    """Run `scenario` with a fresh limiter (and client) in its own event loop."""

    async def main() -> T:
        lim = RedisRateLimiter(Redis.from_url(url), limits, fail_open=fail_open, key_prefix=prefix)
        try:
            return await scenario(lim)
        finally:
            await lim.aclose()

    return asyncio.run(main())


_ids = iter(range(10**9))


async def acquire(lim: RedisRateLimiter, user_id: int = 1, ip: str | None = "10.0.0.1") -> Slot:
    return await lim.acquire(user_id=user_id, ip=ip, request_id=f"r{next(_ids)}")


async def refused(
    lim: RedisRateLimiter, user_id: int = 1, ip: str | None = "10.0.0.1"
) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await acquire(lim, user_id, ip)
    return caught.value


# --- the same semantics as the memory limiter -------------------------------------------------


def test_a_user_gets_exactly_the_limit_per_window_then_is_told_when_to_retry(
    redis_url: str, prefix: str, db: redis.Redis
) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        for _ in range(3):
            await acquire(lim)
        exc = await refused(lim)
        assert exc.scope == "user"
        assert 9.0 < exc.retry_after <= 10.0
        assert exc.retry_after_header == "10"
        assert str(exc) == "Too many requests: try again in 10 s."
        await acquire(lim, user_id=2)

    run(redis_url, prefix, RateLimits(3, 0, 0, window_seconds=10), scenario)
    assert our_keys(db, prefix) == ["u:1", "u:2"]
    assert db.zcard(prefix + "u:1") == 3
    assert 0 < pttl(db, prefix + "u:1") <= 10_000  # idle keys vanish on their own


def test_the_ip_window_counts_every_user_behind_one_address(redis_url: str, prefix: str) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        await acquire(lim, user_id=1, ip="10.0.0.1")
        await acquire(lim, user_id=2, ip="10.0.0.1")
        exc = await refused(lim, user_id=3, ip="10.0.0.1")
        assert exc.scope == "ip"
        assert 0 < exc.retry_after <= 60
        await acquire(lim, user_id=3, ip="2001:db8::1")
        await acquire(lim, user_id=3, ip=None)  # no address: no IP check

    run(redis_url, prefix, RateLimits(0, 2, 0), scenario)


def test_the_user_window_is_checked_before_the_ip_window_and_concurrency(
    redis_url: str, prefix: str
) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        await acquire(lim)
        assert (await refused(lim)).scope == "user"
        assert (await refused(lim, user_id=2)).scope == "ip"
        assert (await refused(lim, ip="10.0.0.2")).scope == "user"

    run(redis_url, prefix, RateLimits(1, 1, 1), scenario)


def test_limits_of_zero_turn_every_check_off(redis_url: str, prefix: str, db: redis.Redis) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        for _ in range(200):
            await acquire(lim)

    run(redis_url, prefix, RateLimits(0, 0, 0), scenario)
    assert our_keys(db, prefix) == []  # nothing is recorded


def test_concurrency_is_capped_until_a_slot_is_released_and_release_is_idempotent(
    redis_url: str, prefix: str, db: redis.Redis
) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        first, second = await acquire(lim), await acquire(lim)
        exc = await refused(lim)
        assert exc.scope == "concurrent"
        assert exc.retry_after == 1.0
        assert str(exc) == "Too many calls at once: wait for one to finish."
        other = await acquire(lim, user_id=2)  # the cap is per user
        assert 0 < pttl(db, prefix + "c:1") <= 900_000

        await first.release()
        await first.release()  # twice: must not free a second slot
        third = await acquire(lim)
        assert (await refused(lim)).scope == "concurrent"
        for slot in (second, third, other):
            await slot.release()

    run(redis_url, prefix, RateLimits(0, 0, 2), scenario)
    assert our_keys(db, prefix) == []  # an emptied slot set is gone


def test_a_reused_request_id_takes_its_own_slot_and_counts_again(
    redis_url: str, prefix: str, db: redis.Redis
) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        a = await lim.acquire(user_id=1, ip=None, request_id="same")
        await lim.acquire(user_id=1, ip=None, request_id="same")
        assert db.zcard(prefix + "u:1") == 2
        assert (await refused(lim)).scope == "concurrent"
        await a.release()
        await acquire(lim)
        assert (await refused(lim)).scope == "concurrent"

    run(redis_url, prefix, RateLimits(10, 0, 2), scenario)


def test_a_refused_attempt_consumes_nothing(redis_url: str, prefix: str, db: redis.Redis) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        held = await acquire(lim, user_id=1)
        for _ in range(10):
            assert (await refused(lim, user_id=1)).scope == "concurrent"
        assert db.zcard(prefix + "u:1") == 1
        assert db.zcard(prefix + "ip:10.0.0.1") == 1
        await held.release()
        await acquire(lim, user_id=1)
        await acquire(lim, user_id=2)
        for _ in range(10):
            assert (await refused(lim, user_id=1)).scope == "user"  # not eating the IP's window
        await acquire(lim, user_id=3)
        assert db.zcard(prefix + "ip:10.0.0.1") == 4

    run(redis_url, prefix, RateLimits(2, 4, 1), scenario)


def test_retry_after_counts_down_as_time_passes(redis_url: str, prefix: str) -> None:
    async def timed_refusal(lim: RedisRateLimiter) -> tuple[float, float, float]:
        sent = time.monotonic()
        wait = (await refused(lim)).retry_after
        return sent, wait, time.monotonic()

    async def scenario(lim: RedisRateLimiter) -> None:
        await acquire(lim)
        sent1, first, received1 = await timed_refusal(lim)
        await asyncio.sleep(0.5)
        sent2, second, received2 = await timed_refusal(lim)
        assert 1.5 < first <= 2.0
        # Redis's clock moved between the two calls by what the client saw, give or take the
        # round trips (and a millisecond of rounding): bounds that hold on a loaded machine.
        assert sent2 - received1 - 0.002 <= first - second <= received2 - sent1 + 0.002
        await asyncio.sleep(second + 0.01)
        await acquire(lim)

    run(redis_url, prefix, RateLimits(1, 0, 0, window_seconds=2), scenario)


def test_the_window_slides_so_a_boundary_allows_no_double_burst(
    redis_url: str, prefix: str
) -> None:
    async def scenario(lim: RedisRateLimiter) -> list[tuple[float, float]]:
        granted: list[tuple[float, float]] = []  # (sent, answered) of each granted call
        deadline = time.monotonic() + 2.6
        while time.monotonic() < deadline:  # ask as fast as possible, across 2.6 windows
            sent = time.monotonic()
            try:
                await acquire(lim)
                granted.append((sent, time.monotonic()))
            except RateLimited as exc:
                await asyncio.sleep(min(exc.retry_after, 0.05))
        return granted

    granted = run(redis_url, prefix, RateLimits(5, 0, 0, window_seconds=1), scenario)
    # Any 6 grants span at least a whole window, as Redis saw it; a fixed window allows 10
    # within moments around a boundary. And the window does refill: 5 at 0 s, 1 s and 2 s.
    for i in range(len(granted) - 5):
        assert granted[i + 5][1] - granted[i][0] >= 0.999, granted
    assert len(granted) == 15, granted


def test_idle_keys_vanish_after_the_window_and_the_slot_ttl(
    redis_url: str, prefix: str, db: redis.Redis
) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        await acquire(lim)  # the slot is never released
        assert our_keys(db, prefix) == ["c:1", "ip:10.0.0.1", "u:1"]
        await asyncio.sleep(0.5)
        assert our_keys(db, prefix) == ["c:1"]
        await asyncio.sleep(0.6)
        assert our_keys(db, prefix) == []

    limits = RateLimits(5, 5, 5, window_seconds=0.2, slot_ttl_seconds=1.0)
    run(redis_url, prefix, limits, scenario)


def test_a_leaked_slot_is_dropped_after_the_slot_ttl(redis_url: str, prefix: str) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        await acquire(lim)  # a crashed worker: never released
        assert (await refused(lim)).scope == "concurrent"
        await asyncio.sleep(0.5)
        assert (await refused(lim)).scope == "concurrent"
        await asyncio.sleep(0.6)
        await acquire(lim)

    run(redis_url, prefix, RateLimits(0, 0, 1, slot_ttl_seconds=1.0), scenario)


# --- exact under concurrency ------------------------------------------------------------------


def test_64_concurrent_acquires_on_one_user_get_exactly_the_limit(
    redis_url: str, prefix: str, db: redis.Redis
) -> None:
    async def attempt(lim: RedisRateLimiter, i: int) -> str:
        try:
            await lim.acquire(user_id=1, ip="10.0.0.1", request_id=f"t{i}")
        except RateLimited as exc:
            return exc.scope
        return "granted"

    async def scenario(lim: RedisRateLimiter) -> list[str]:
        return list(await asyncio.gather(*(attempt(lim, i) for i in range(64))))

    outcomes = run(redis_url, prefix + "w:", RateLimits(10, 0, 0), scenario)
    assert outcomes.count("granted") == 10
    assert outcomes.count("user") == 54
    outcomes = run(redis_url, prefix + "c:", RateLimits(0, 0, 7), scenario)
    assert outcomes.count("granted") == 7
    assert outcomes.count("concurrent") == 57
    assert db.zcard(prefix + "c:c:1") == 7


def run_processes(
    url: str, prefix: str, limits: RateLimits, check_held: Callable[[], None]
) -> list[str]:
    """Two processes, each with its own client and 64 tasks making 3 attempts each, all let
    go together. `check_held` runs while they still hold their slots."""
    ctx = multiprocessing.get_context("spawn")
    start, done, results = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=acquire_many, args=(url, prefix, limits, 64, 3, start, done, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    try:
        try:
            start.wait(timeout=60)
        except threading.BrokenBarrierError:
            pytest.fail(f"a worker failed to start: {results.get(timeout=10)}")
        outcomes = [o for _ in procs for o in results.get(timeout=60)]
        check_held()
    finally:
        done.set()
        for p in procs:
            p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    errors = [o for o in outcomes if o.startswith("error")]
    assert not errors, errors[0]
    assert len(outcomes) == 2 * 64 * 3
    return outcomes


def test_two_processes_sharing_redis_get_exactly_the_limit_between_them(
    redis_url: str, prefix: str, db: redis.Redis
) -> None:
    def check_held() -> None:
        assert db.zcard(prefix + "u:1") == 50
        assert db.zcard(prefix + "ip:10.9.9.9") == 50

    outcomes = run_processes(redis_url, prefix, RateLimits(50, 100, 0), check_held)
    assert outcomes.count("granted") == 50
    assert outcomes.count("user") == 2 * 64 * 3 - 50


def test_two_processes_sharing_redis_share_the_concurrency_slots(
    redis_url: str, prefix: str, db: redis.Redis
) -> None:
    def check_held() -> None:
        assert db.zcard(prefix + "c:1") == 5

    outcomes = run_processes(redis_url, prefix, RateLimits(0, 0, 5), check_held)
    assert outcomes.count("granted") == 5
    assert outcomes.count("concurrent") == 2 * 64 * 3 - 5
    assert not db.exists(prefix + "c:1")  # both processes released theirs


# --- Redis down -------------------------------------------------------------------------------


def test_fail_open_with_redis_unreachable_grants_and_warns_once_per_30_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    now = [0.0]

    async def scenario() -> float:
        lim = build_rate_limiter(RateLimits(1, 1, 1), redis_url=UNREACHABLE, fail_open=True)
        assert isinstance(lim, RedisRateLimiter)
        lim._clock = lambda: now[0]
        slowest = 0.0
        for _ in range(4):  # far over every limit: all granted, nothing counted
            t0 = time.monotonic()
            slot = await lim.acquire(user_id=1, ip="10.0.0.1", request_id=uuid.uuid4().hex)
            slowest = max(slowest, time.monotonic() - t0)
            await slot.release()
        now[0] += 31
        await lim.acquire(user_id=1, ip="10.0.0.1", request_id=uuid.uuid4().hex)
        await lim.aclose()
        return slowest

    assert asyncio.run(scenario()) < 1.0
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    assert "fail-open" in warnings[0].getMessage()
    assert "(0 more since the last such log)" in warnings[0].getMessage()
    assert "(3 more since the last such log)" in warnings[1].getMessage()


def test_fail_closed_with_redis_unreachable_raises_limiter_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def scenario() -> tuple[LimiterUnavailable, float]:
        lim = build_rate_limiter(RateLimits(1, 1, 1), redis_url=UNREACHABLE, fail_open=False)
        t0 = time.monotonic()
        with pytest.raises(LimiterUnavailable) as caught:
            await lim.acquire(user_id=1, ip=None, request_id="r1")
        elapsed = time.monotonic() - t0
        await lim.aclose()
        return caught.value, elapsed

    exc, elapsed = asyncio.run(scenario())
    assert elapsed < 1.0
    assert exc.code == "rate_limiter_unavailable"
    assert str(exc) == "The rate limiter is unavailable; try again shortly."
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.ERROR]
    assert "fail-closed" in caplog.records[0].getMessage()


class Relay:
    """A TCP relay in front of Redis that can delay its replies, or die like a crashed server."""

    def __init__(self, url: str, reply_delay: float = 0.0) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._db = parts.path or "/0"
        self._reply_delay = reply_delay
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}{self._db}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            try:
                while data := await src.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, 0.0), pipe(up_reader, writer, self._reply_delay)
        )


def test_redis_dying_mid_life_makes_release_log_and_acquire_fail_closed(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def scenario() -> None:
        relay = Relay(redis_url)
        lim = RedisRateLimiter(
            Redis.from_url(await relay.start(), socket_timeout=0.5),
            RateLimits(5, 5, 5),
            fail_open=False,
            key_prefix=prefix,
        )
        slot = await acquire(lim)
        await relay.stop()
        await slot.release()  # logged, not raised
        with pytest.raises(LimiterUnavailable):
            await acquire(lim)
        await lim.aclose()

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2
    assert "could not free slot" in messages[0]
    assert "fail-closed" in messages[1]


def test_a_release_in_a_cancelled_request_still_frees_the_slot(
    redis_url: str, prefix: str, db: redis.Redis
) -> None:
    async def scenario(lim: RedisRateLimiter) -> None:
        slot = await acquire(lim)
        # No idle connection: the release must connect first, so it suspends before sending.
        await lim._client.connection_pool.disconnect()

        async def cancelled_request() -> None:
            # Level-triggered cancellation (anyio, Starlette): every await in the `finally`
            # of a cancelled request raises at once, before any byte is sent.
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await slot.release()

        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(cancelled_request())
        for _ in range(50):
            if not db.exists(prefix + "c:1"):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the slot was never freed")

    run(redis_url, prefix, RateLimits(0, 0, 1), scenario)


def test_an_acquire_cancelled_in_flight_does_not_leak_its_slot(
    redis_url: str, prefix: str, db: redis.Redis
) -> None:
    db.script_load(ACQUIRE_LUA)  # so the one EVALSHA below is the only round trip

    async def scenario() -> None:
        relay = Relay(redis_url, reply_delay=0.3)
        client = Redis.from_url(await relay.start())
        lim = RedisRateLimiter(client, RateLimits(0, 0, 1), fail_open=False, key_prefix=prefix)
        await client.execute_command("PING")  # connected, so the acquire only sends its script
        task = asyncio.create_task(acquire(lim))
        await asyncio.sleep(0.1)  # the script has run in Redis; its reply is on the way
        assert db.zcard(prefix + "c:1") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.6)  # the reply arrives, then the orphaned slot is freed
        assert not db.exists(prefix + "c:1")
        await lim.aclose()
        await relay.stop()

    asyncio.run(scenario())


# --- choosing one -----------------------------------------------------------------------------


def test_build_rate_limiter_uses_redis_when_a_url_is_set(
    redis_url: str,
) -> None:
    limits = RateLimits(1, 1, 1)
    assert isinstance(
        build_rate_limiter(limits, redis_url=None, fail_open=False), MemoryRateLimiter
    )
    assert isinstance(build_rate_limiter(limits, redis_url="", fail_open=False), MemoryRateLimiter)

    async def scenario() -> None:
        lim = build_rate_limiter(limits, redis_url=redis_url, fail_open=False)
        assert isinstance(lim, RedisRateLimiter)
        kwargs = lim._client.connection_pool.connection_kwargs
        assert kwargs["socket_connect_timeout"] == REDIS_CONNECT_TIMEOUT
        assert kwargs["socket_timeout"] == REDIS_TIMEOUT
        assert lim._prefix == "aicredits:rl:"
        await lim.aclose()

    asyncio.run(scenario())


def test_a_burst_on_a_busy_worker_is_not_mistaken_for_a_redis_outage(
    redis_url: str, prefix: str
) -> None:
    """The limiter's timeouts are timed by the worker's event loop. A burst of calls at once
    on a cold worker opens a connection each, and the loop may run other calls' Python for
    a while before it gets back to the finished connects: here it is kept busy for 0.8 s
    while 30 connects are under way. A healthy Redis must not fail those calls (fail-closed
    would answer each with a 503, as 0.5 s timeouts did)."""

    async def scenario() -> list[Slot | BaseException | None]:
        lim = RedisRateLimiter(
            limiter_client(redis_url), RateLimits(0, 0, 100), fail_open=False, key_prefix=prefix
        )

        async def other_calls_python() -> None:
            await asyncio.sleep(0)  # after every acquire has started to connect
            time.sleep(0.8)

        try:
            results = await asyncio.gather(
                *(acquire(lim, user_id=n) for n in range(30)),
                other_calls_python(),
                return_exceptions=True,
            )
            for slot in results[:-1]:
                if not isinstance(slot, BaseException):
                    await cast(Slot, slot).release()
            return results[:-1]
        finally:
            await lim.aclose()

    results = asyncio.run(scenario())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
