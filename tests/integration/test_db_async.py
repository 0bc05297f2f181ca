"""Database.execute_one_async, the metered path's statements without a thread (Postgres):
many at once share a bounded pool, and a statement cancelled mid-way leaves no broken
connection behind."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from aicredits.adapters.db import Database

pytestmark = pytest.mark.postgres


def test_more_statements_at_once_than_connections_all_complete(pg_url: str) -> None:
    db = Database(pg_url)

    async def run() -> list[int]:
        rows = await asyncio.gather(
            *(
                db.execute_one_async("SELECT %(n)s::int, pg_sleep(0.01)", {"n": n})
                for n in range(60)
            )
        )
        try:
            return [row[0] for row in rows if row is not None]
        finally:
            await db.aclose_async()

    try:
        assert asyncio.run(run()) == list(range(60))
    finally:
        db.dispose()


def test_a_cancelled_statement_does_not_poison_the_pool(pg_url: str) -> None:
    db = Database(pg_url)

    async def run() -> tuple[int, ...] | None:
        slow = asyncio.ensure_future(db.execute_one_async("SELECT pg_sleep(5)", {}))
        await asyncio.sleep(0.2)  # sent, and running on the server
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        # Every connection of the pool is still usable (none is left mid-statement).
        rows = await asyncio.gather(*(db.execute_one_async("SELECT 1", {}) for _ in range(30)))
        try:
            assert all(row == (1,) for row in rows)
            return await db.execute_one_async("SELECT 2", {})
        finally:
            await db.aclose_async()

    try:
        assert asyncio.run(run()) == (2,)
    finally:
        db.dispose()
