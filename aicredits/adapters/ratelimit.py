"""Request rate limits for the metered AI gateway, checked before any credit is reserved.

Three limits, each off when 0: requests per minute per user, requests per minute per client
IP (both sliding-window logs, so there is no double burst at a window boundary), and calls in
flight per user (a slot held from `acquire()` until `Slot.release()`).

With `REDIS_URL` set, `RedisRateLimiter` keeps the state in Redis and decides each call in
one Lua script, so several web workers share the limits exactly. Without it,
`MemoryRateLimiter` keeps them in this process. Use `build_rate_limiter()` to get either.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aicredits.adapters import metrics
from aicredits.domain.errors import LimiterUnavailable, LimitScope, RateLimited

logger = logging.getLogger(__name__)


# What a refused concurrent call is told: slots free up when calls finish, at no known time.
CONCURRENT_RETRY_AFTER = 1.0
# An outage would otherwise log once per request.
OUTAGE_LOG_EVERY = 30.0
UNAVAILABLE_MESSAGE = "The rate limiter is unavailable; try again shortly."

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class RateLimits:
    user_per_minute: int  # 0 = no limit
    ip_per_minute: int  # 0 = no limit
    concurrent_per_user: int  # 0 = no limit
    # The per-minute limits count requests over this window (tests and benches shorten it).
    window_seconds: float = 60.0
    # A slot not renewed for this long is presumed leaked by a crashed worker and dropped
    # (the gateway renews the slots of its calls with their holds' leases).
    slot_ttl_seconds: float = 900.0

    def __post_init__(self) -> None:
        if min(self.user_per_minute, self.ip_per_minute, self.concurrent_per_user) < 0:
            raise ValueError("rate limits must be 0 (off) or positive")
        if self.window_seconds <= 0 or self.slot_ttl_seconds <= 0:
            raise ValueError("window_seconds and slot_ttl_seconds must be positive")


class Slot(Protocol):
    async def release(self) -> None:
        """Free the concurrency slot. Idempotent; never raises."""
        ...

    async def renew(self) -> None:
        """Keep the slot for another slot_ttl_seconds (its call is still running). Never
        raises: a slot that could not be renewed at worst expires early."""
        ...


class RateLimiter(Protocol):
    async def acquire(self, *, user_id: int, ip: str | None, request_id: str) -> Slot:
        """Count one request against the windows and take one concurrency slot, or raise
        RateLimited (having consumed nothing) or LimiterUnavailable. `request_id` must be
        unique per call."""
        ...

    async def aclose(self) -> None: ...


class _NoSlot:
    """The slot of a call that holds none (no concurrency limit, or failing open)."""

    __slots__ = ()

    async def release(self) -> None:
        return None

    async def renew(self) -> None:
        return None


NO_SLOT: Slot = _NoSlot()


# --- in this process -------------------------------------------------------------------------


class MemoryRateLimiter:
    """The limits for one process. Safe to call from the event loop and from worker threads:
    each check-and-record happens under one lock, and nothing inside it awaits."""

    def __init__(self, limits: RateLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._user_hits: dict[int, deque[float]] = {}
        self._ip_hits: dict[str, deque[float]] = {}
        self._slots: dict[int, dict[str, float]] = {}
        self._next_sweep = clock() + limits.window_seconds

    async def acquire(self, *, user_id: int, ip: str | None, request_id: str) -> Slot:
        try:
            return self._acquire(user_id, ip, request_id)
        except RateLimited as refused:
            metrics.rate_limit_refused(limit=refused.scope)
            raise

    async def aclose(self) -> None:
        return None

    def _acquire(self, user_id: int, ip: str | None, request_id: str) -> Slot:
        limits = self._limits
        window = limits.window_seconds
        with self._lock:
            now = self._clock()
            if now >= self._next_sweep:
                self._sweep(now)
            if limits.user_per_minute:
                wait = _window_wait(self._user_hits, user_id, limits.user_per_minute, window, now)
                if wait is not None:
                    raise RateLimited(scope="user", retry_after=wait)
            if ip and limits.ip_per_minute:
                wait = _window_wait(self._ip_hits, ip, limits.ip_per_minute, window, now)
                if wait is not None:
                    raise RateLimited(scope="ip", retry_after=wait)
            slots = None
            if limits.concurrent_per_user:
                slots = self._live_slots(user_id, now)
                if slots is not None and len(slots) >= limits.concurrent_per_user:
                    raise RateLimited(scope="concurrent", retry_after=CONCURRENT_RETRY_AFTER)
            # Every check passed: only now does the call count anywhere.
            if limits.user_per_minute:
                self._user_hits.setdefault(user_id, deque()).append(now)
            if ip and limits.ip_per_minute:
                self._ip_hits.setdefault(ip, deque()).append(now)
            if not limits.concurrent_per_user:
                return NO_SLOT
            if slots is None:
                slots = self._slots[user_id] = {}
            member = _unique_member(request_id, slots.__contains__)
            slots[member] = now
            return _MemorySlot(self, user_id, member)

    def _live_slots(self, user_id: int, now: float) -> dict[str, float] | None:
        slots = self._slots.get(user_id)
        if slots is None:
            return None
        horizon = now - self._limits.slot_ttl_seconds
        for member in [m for m, at in slots.items() if at <= horizon]:
            del slots[member]
        if not slots:
            del self._slots[user_id]
            return None
        return slots

    def _renew(self, user_id: int, member: str) -> None:
        with self._lock:
            slots = self._slots.get(user_id)
            if slots is not None and member in slots:
                slots[member] = self._clock()

    def _release(self, user_id: int, member: str) -> None:
        with self._lock:
            slots = self._slots.get(user_id)
            if slots is not None:
                slots.pop(member, None)
                if not slots:
                    del self._slots[user_id]

    def _sweep(self, now: float) -> None:
        """Drop every expired entry and empty key, so users and IPs that never come back do
        not stay in memory. Runs at most once per window: amortised, it costs little."""
        horizon = now - self._limits.window_seconds
        for user_id in list(self._user_hits):
            _prune(self._user_hits, user_id, horizon)
        for ip in list(self._ip_hits):
            _prune(self._ip_hits, ip, horizon)
        for user_id in list(self._slots):
            self._live_slots(user_id, now)
        self._next_sweep = now + self._limits.window_seconds


def _prune(hits: dict[K, deque[float]], key: K, horizon: float) -> deque[float] | None:
    """`key`'s log without the requests at or before `horizon`; an emptied key is dropped."""
    log = hits.get(key)
    if log is None:
        return None
    while log and log[0] <= horizon:
        log.popleft()
    if not log:
        del hits[key]
        return None
    return log


def _window_wait(
    hits: dict[K, deque[float]], key: K, limit: int, window: float, now: float
) -> float | None:
    """None if `key` has room for one more request in the window, else the seconds until its
    oldest request leaves it (> 0)."""
    log = _prune(hits, key, now - window)
    if log is None or len(log) < limit:
        return None
    return log[0] + window - now


def _unique_member(request_id: str, taken: Callable[[str], bool]) -> str:
    # A reused request id must still count as a separate call (and free only its own slot).
    member, n = request_id, 1
    while taken(member):
        n += 1
        member = f"{request_id}#{n}"
    return member


class _MemorySlot:
    __slots__ = ("_limiter", "_member", "_released", "_user_id")

    def __init__(self, limiter: MemoryRateLimiter, user_id: int, member: str) -> None:
        self._limiter = limiter
        self._user_id = user_id
        self._member = member
        self._released = False

    async def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._user_id, self._member)

    async def renew(self) -> None:
        if not self._released:
            self._limiter._renew(self._user_id, self._member)


# --- shared through Redis --------------------------------------------------------------------

# One script per acquire: prune, check all three limits, then record, atomically. The clock is
# the server's TIME, so workers with skewed clocks still agree. Sorted sets hold request ids
# scored by milliseconds. Returns {0, slot member or ''} or {1 user | 2 ip | 3 concurrent, wait ms}.
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local user_limit = tonumber(ARGV[1])
local ip_limit = tonumber(ARGV[2])
local slot_limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local slot_ttl = tonumber(ARGV[5])
local request_id = ARGV[6]

local function wait_ms(key, limit)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) < limit then
    return nil
  end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end

local function record(key, ttl)
  -- a reused request id still counts as a separate call
  local member, n = request_id, 1
  while redis.call('ZADD', key, 'NX', now, member) == 0 do
    n = n + 1
    member = request_id .. '#' .. n
  end
  redis.call('PEXPIRE', key, ttl)
  return member
end

if user_limit > 0 then
  local wait = wait_ms(KEYS[1], user_limit)
  if wait then return {1, wait} end
end
if ip_limit > 0 then
  local wait = wait_ms(KEYS[2], ip_limit)
  if wait then return {2, wait} end
end
if slot_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - slot_ttl)
  if redis.call('ZCARD', KEYS[3]) >= slot_limit then
    return {3, 0}
  end
end

if user_limit > 0 then record(KEYS[1], window) end
if ip_limit > 0 then record(KEYS[2], window) end
local slot = ''
if slot_limit > 0 then slot = record(KEYS[3], slot_ttl) end
return {0, slot}
"""

_SCOPES: dict[int, LimitScope] = {1: "user", 2: "ip", 3: "concurrent"}

# A call still running keeps its slot: re-score it now (only if it is still there).
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
"""
# Redis down or unreachable. Anything else (a script error) is a bug and propagates.
_OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisRateLimiter:
    """The limits shared by every process using this Redis. Closing it closes the client."""

    def __init__(
        self,
        client: Redis,
        limits: RateLimits,
        *,
        fail_open: bool,
        key_prefix: str = "aicredits:rl:",
    ) -> None:
        self._client = client
        self._limits = limits
        self._fail_open = fail_open
        self._prefix = key_prefix
        self._script = client.register_script(ACQUIRE_LUA)
        self._renew_script = client.register_script(RENEW_LUA)
        self._window_ms = max(1, round(limits.window_seconds * 1000))
        self._slot_ttl_ms = max(1, round(limits.slot_ttl_seconds * 1000))
        self._clock: Callable[[], float] = time.monotonic  # for outage logs only
        self._logged_at: float | None = None
        self._not_logged = 0
        self._releases: set[asyncio.Future[None]] = set()

    async def acquire(self, *, user_id: int, ip: str | None, request_id: str) -> Slot:
        limits = self._limits
        ip_limit = limits.ip_per_minute if ip else 0
        if not (limits.user_per_minute or ip_limit or limits.concurrent_per_user):
            return NO_SLOT  # nothing to check or record: no round trip
        slot_key = f"{self._prefix}c:{user_id}"
        keys = [f"{self._prefix}u:{user_id}", f"{self._prefix}ip:{ip or ''}", slot_key]
        args: list[int | str] = [
            limits.user_per_minute,
            ip_limit,
            limits.concurrent_per_user,
            self._window_ms,
            self._slot_ttl_ms,
            request_id,
        ]
        call = asyncio.ensure_future(self._script(keys=keys, args=args))
        try:
            reply = await asyncio.shield(call)
        except _OUTAGE as exc:
            return self._outage(exc)
        except asyncio.CancelledError:
            # The script may still grant a slot nobody will release: free it when it does.
            call.add_done_callback(lambda done: self._free_orphan(done, slot_key))
            raise
        verdict, detail = _parse(reply)
        if verdict == 0:
            return _RedisSlot(self, slot_key, detail) if detail else NO_SLOT
        scope = _SCOPES[verdict]
        wait = CONCURRENT_RETRY_AFTER if scope == "concurrent" else int(detail) / 1000
        metrics.rate_limit_refused(limit=scope)
        raise RateLimited(scope=scope, retry_after=wait)

    async def aclose(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self._client.aclose()

    def _outage(self, exc: BaseException) -> Slot:
        self._log_outage(exc)
        if self._fail_open:
            return NO_SLOT
        metrics.rate_limit_refused(limit="unavailable")
        raise LimiterUnavailable(UNAVAILABLE_MESSAGE) from exc

    def _log_outage(self, exc: BaseException) -> None:
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < OUTAGE_LOG_EVERY:
            self._not_logged += 1
            return
        not_logged, self._not_logged, self._logged_at = self._not_logged, 0, now
        logger.log(
            logging.WARNING if self._fail_open else logging.ERROR,
            "rate limiter: Redis unreachable (%s: %s); %s (%d more since the last such log)",
            type(exc).__name__,
            exc,
            "letting calls through unlimited (fail-open)"
            if self._fail_open
            else "refusing calls (fail-closed)",
            not_logged,
        )

    def _start_release(self, slot_key: str, member: str) -> asyncio.Future[None]:
        task = asyncio.ensure_future(self._release(slot_key, member))
        # Held here so the task is not collected, and so aclose() can wait for it.
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task

    async def _release(self, slot_key: str, member: str) -> None:
        try:
            await self._client.zrem(slot_key, member)
        except (RedisError, OSError) as exc:
            logger.warning(
                "rate limiter: could not free slot %s of %s (%s: %s); it expires within %g s",
                member,
                slot_key,
                type(exc).__name__,
                exc,
                self._limits.slot_ttl_seconds,
            )
        except Exception:
            # Never raised: release runs in `finally` and `except` blocks, where it would hide
            # the error being handled.
            logger.exception("rate limiter: could not free slot %s of %s", member, slot_key)

    async def _renew(self, slot_key: str, member: str) -> None:
        try:
            await self._renew_script(keys=[slot_key], args=[member, self._slot_ttl_ms])
        except (RedisError, OSError) as exc:
            self._log_outage(exc)

    def _free_orphan(self, call: asyncio.Future[Any], slot_key: str) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        verdict, member = _parse(call.result())
        if verdict == 0 and member:
            self._start_release(slot_key, member)


def _parse(reply: Any) -> tuple[int, str]:
    verdict, detail = reply
    if isinstance(detail, bytes):
        detail = detail.decode()
    return int(verdict), str(detail)


class _RedisSlot:
    __slots__ = ("_limiter", "_member", "_released", "_slot_key")

    def __init__(self, limiter: RedisRateLimiter, slot_key: str, member: str) -> None:
        self._limiter = limiter
        self._slot_key = slot_key
        self._member = member
        self._released = False

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        # Shielded: release runs in `finally` blocks of cancelled requests (a client that
        # went away), and a ZREM cut short would leak the slot for slot_ttl_seconds.
        await asyncio.shield(self._limiter._start_release(self._slot_key, self._member))

    async def renew(self) -> None:
        if not self._released:
            await self._limiter._renew(self._slot_key, self._member)


# --- choosing one ----------------------------------------------------------------------------


# How long the limiter waits to connect to Redis, and for an answer, before the call is
# failed (or let through, fail-open). These are timed by the worker's event loop, which
# may not get back to a finished connect or a reply for a while when a burst of calls
# arrives at once, each with its own Python to run: at 0.5 s, 100 calls at once on a
# loaded 2-core machine got 503s from a healthy Redis. A Redis that is down refuses the
# connection at once; these matter only for one that hangs.
REDIS_CONNECT_TIMEOUT = 2.0
REDIS_TIMEOUT = 2.0


def limiter_client(redis_url: str) -> Redis:
    return Redis.from_url(
        redis_url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        socket_timeout=REDIS_TIMEOUT,
        health_check_interval=30,
    )


def build_rate_limiter(
    limits: RateLimits, *, redis_url: str | None, fail_open: bool
) -> RateLimiter:
    """Redis-backed limits shared by every worker when `redis_url` is set, else in-process."""
    if not redis_url:
        return MemoryRateLimiter(limits)
    return RedisRateLimiter(
        limiter_client(redis_url), limits, fail_open=fail_open, key_prefix="aicredits:rl:"
    )
