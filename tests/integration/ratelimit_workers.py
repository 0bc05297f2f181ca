"""Code that runs in child processes of the Redis rate limiter tests (importable under spawn)."""

from __future__ import annotations

import asyncio
import os
import traceback
from typing import Any

from redis.asyncio import Redis

from aicredits.adapters.ratelimit import RateLimits, RedisRateLimiter, Slot
from aicredits.domain.errors import RateLimited


def acquire_many(
    url: str,
    prefix: str,
    limits: RateLimits,
    tasks: int,
    attempts: int,
    start: Any,
    done: Any,
    results: Any,
) -> None:
    """`tasks` asyncio tasks with this process's own client each call acquire() `attempts`
    times on user 1, starting when every process is ready. Granted slots are held until the
    parent sets `done`, then released. Reports one outcome per call: "granted", the refusal's
    scope, or "error: ..."."""

    async def main() -> None:
        client = Redis.from_url(url)
        limiter = RedisRateLimiter(client, limits, fail_open=False, key_prefix=prefix)
        held: list[Slot] = []
        outcomes: list[str] = []

        async def attempt(task: int) -> None:
            for i in range(attempts):
                rid = f"p{os.getpid()}-t{task}-{i}"
                try:
                    held.append(await limiter.acquire(user_id=1, ip="10.9.9.9", request_id=rid))
                    outcomes.append("granted")
                except RateLimited as exc:
                    outcomes.append(exc.scope)
                except Exception:
                    outcomes.append("error: " + traceback.format_exc())

        try:
            await client.execute_command("PING")  # connect before the start line, not after it
            await asyncio.to_thread(start.wait)
            await asyncio.gather(*(attempt(t) for t in range(tasks)))
            results.put(outcomes)
            await asyncio.to_thread(done.wait, 60)
            await asyncio.gather(*(slot.release() for slot in held))
        finally:
            await limiter.aclose()

    try:
        asyncio.run(main())
    except Exception:
        start.abort()  # do not leave the other processes waiting at the start line
        results.put(["error: " + traceback.format_exc()])
