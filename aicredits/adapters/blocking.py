"""Run blocking work (the database) from async code without stalling the event loop.

A dedicated pool: asyncio's default executor has min(32, cpus + 4) threads, six on a
two-core machine, which would queue database calls behind each other under load.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="aicredits-db")


async def run_blocking(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await loop.run_in_executor(_pool, call)


async def run_blocking_to_completion(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Like run_blocking, but a cancelled caller does not abandon the result half-way: the
    work always finishes in its thread (money must be settled even if the client left)."""
    task = asyncio.ensure_future(run_blocking(fn, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


async def to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Await `work` so that a cancelled caller does not abandon it half-way: it runs to its
    end as its own task (the async path's run_blocking_to_completion)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise
