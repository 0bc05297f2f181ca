"""Admission of a metered call: a rate-limit slot and a credit hold, the two things every call
takes before it may reach the upstream.

They are two round trips to two servers (Redis, Postgres). Taken one after the other they
are about a millisecond of every call's latency; taken at the same time, the slower of the
two. But a hold taken for a call the limiter then refuses holds credits for a moment, and a
sibling call of the same user could be refused for credits it would have had. So both go
out together only when no other call of the user is being admitted or running in this
process, the user was not refused by a limit lately, and the call carries no idempotency key
(whose hold must not exist for a call that was never admitted). Otherwise the slot comes
first, as it always did. A call the limiter refuses gives its fresh hold back at once.

One case is left: this process does not see the user's calls on other workers. A call that
the concurrency limit refuses because of them holds its credits for about one round trip, and
a sibling on another worker that reserves in that instant, with a balance too small for both,
is refused for credits (402). From then on that user's calls here take their slot first.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aicredits.adapters.ratelimit import RateLimiter, Slot
from aicredits.domain.errors import LimiterUnavailable, RateLimited
from aicredits.services.ledger import HoldView

# How long after a refusal by a limit the user's calls take their slot first. At least the
# refusal's own Retry-After, so a client hammering past its limit costs no database writes.
REFUSAL_MEMORY_SECONDS = 10.0
# Remembered refusals kept at most (the oldest half is forgotten beyond this).
MAX_REMEMBERED = 10_000


class Admission:
    """Slots and holds for one gateway (one event loop)."""

    def __init__(
        self,
        limiter: RateLimiter,
        release_hold: Callable[[HoldView], Awaitable[object]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self._release_hold = release_hold
        self._clock = clock
        # Per user: calls of this process from admission until their slot is released.
        self._active: Counter[int] = Counter()
        self._refused_until: dict[int, float] = {}
        self._background: set[asyncio.Task[None]] = set()

    def active(self, user_id: int) -> int:
        """This process's calls of `user_id` being admitted or holding a slot."""
        return self._active[user_id]

    def overlaps(self, user_id: int, *, keyed: bool) -> bool:
        """Whether a call of `user_id` now takes its slot and hold at the same time."""
        if keyed or self._active[user_id]:
            return False
        until = self._refused_until.get(user_id)
        if until is None:
            return True
        if self._clock() < until:
            return False
        del self._refused_until[user_id]
        return True

    async def admit(
        self,
        *,
        user_id: int,
        ip: str | None,
        request_id: str,
        keyed: bool,
        reserve: Callable[[], Awaitable[HoldView]],
    ) -> tuple[Slot, HoldView]:
        """A slot and a hold (from `reserve`), or the refusal: the limiter's first, then the
        ledger's. Whatever was taken for a refused call is given back."""
        overlap = self.overlaps(user_id, keyed=keyed)
        self._active[user_id] += 1

        def acquire() -> Awaitable[Slot]:
            return self.limiter.acquire(user_id=user_id, ip=ip, request_id=request_id)

        try:
            if overlap:
                slot, hold = await self._together(acquire, reserve)
            else:
                slot, hold = await self._in_turn(acquire, reserve)
        except BaseException as exc:
            self._done(user_id)
            if isinstance(exc, RateLimited):
                self._remember_refusal(user_id, exc.retry_after)
            elif isinstance(exc, LimiterUnavailable):
                self._remember_refusal(user_id, 0.0)
            raise
        return _CountedSlot(slot, lambda: self._done(user_id)), hold

    async def _in_turn(
        self, acquire: Callable[[], Awaitable[Slot]], reserve: Callable[[], Awaitable[HoldView]]
    ) -> tuple[Slot, HoldView]:
        slot = await acquire()
        try:
            return slot, await reserve()
        except BaseException:
            await slot.release()
            raise

    async def _together(
        self, acquire: Callable[[], Awaitable[Slot]], reserve: Callable[[], Awaitable[HoldView]]
    ) -> tuple[Slot, HoldView]:
        acquiring = asyncio.ensure_future(acquire())
        reserving = asyncio.ensure_future(reserve())
        both = asyncio.ensure_future(self._settle_pair(acquiring, reserving))
        try:
            return await asyncio.shield(both)
        except asyncio.CancelledError:
            # The caller went away: whatever the pair took goes back once it has it.
            both.add_done_callback(self._give_back)
            raise

    async def _settle_pair(
        self, acquiring: asyncio.Future[Slot], reserving: asyncio.Future[HoldView]
    ) -> tuple[Slot, HoldView]:
        await asyncio.wait((acquiring, reserving))
        refused = acquiring.exception()
        if refused is not None:
            failed = reserving.exception()
            if failed is None and not reserving.result().replayed:
                await self._release_hold(reserving.result())
            raise refused
        slot = acquiring.result()
        failed = reserving.exception()
        if failed is not None:
            await slot.release()
            raise failed
        return slot, reserving.result()

    def _give_back(self, both: asyncio.Future[tuple[Slot, HoldView]]) -> None:
        if both.cancelled() or both.exception() is not None:
            return
        slot, hold = both.result()

        async def give_back() -> None:
            try:
                await slot.release()
            finally:
                if not hold.replayed:
                    await self._release_hold(hold)

        task = asyncio.get_running_loop().create_task(give_back())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _done(self, user_id: int) -> None:
        self._active[user_id] -= 1
        if self._active[user_id] <= 0:
            del self._active[user_id]

    def _remember_refusal(self, user_id: int, retry_after: float) -> None:
        if len(self._refused_until) >= MAX_REMEMBERED:
            for stale in list(self._refused_until)[: MAX_REMEMBERED // 2]:
                del self._refused_until[stale]
        self._refused_until[user_id] = self._clock() + max(retry_after, REFUSAL_MEMORY_SECONDS)


class _CountedSlot:
    """A slot that tells its admission when it is released (once)."""

    __slots__ = ("_on_release", "_slot")

    def __init__(self, slot: Slot, on_release: Callable[[], None]) -> None:
        self._slot = slot
        self._on_release: Callable[[], None] | None = on_release

    async def release(self) -> None:
        done, self._on_release = self._on_release, None
        try:
            await self._slot.release()
        finally:
            if done is not None:
                done()

    async def renew(self) -> None:
        await self._slot.renew()
