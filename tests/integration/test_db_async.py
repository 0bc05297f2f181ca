"""Database.execute_one_async, the metered path's statements without a thread (Postgres):
many at once share a bounded pool, and a statement cancelled mid-way leaves no broken
connection behind."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from aicredits.adapters.db import PG_CONNECTION_DEFAULTS, Database
from tests.servers import silent_port

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


def test_after_the_server_drops_its_connections_only_one_statement_fails(pg_url: str) -> None:
    """As with a Postgres restart: the first statement on a dead connection fails (its
    caller answers 503), and the pool drops every idle one with it, so the next succeed."""
    # Its connections are named, so that only they are dropped: the run's other tests share
    # this database, and their pooled connections must live on.
    name = "aicredits-test-dropped"
    db = Database(f"{pg_url}?application_name={name}")
    conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")

    async def run() -> list[object]:
        await asyncio.gather(*(db.execute_one_async("SELECT pg_sleep(0.05)", {}) for _ in range(5)))
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                (name,),
            )
        outcomes: list[object] = []
        for _ in range(5):
            try:
                outcomes.append(await db.execute_one_async("SELECT 1", {}))
            except psycopg.OperationalError:
                outcomes.append("failed")
        await db.aclose_async()
        return outcomes

    try:
        outcomes = asyncio.run(run())
    finally:
        db.dispose()
    assert outcomes == ["failed"] + [(1,)] * 4


def test_dispose_closes_the_async_connections_of_a_loop_that_is_gone(pg_url: str) -> None:
    """A stopped server's event loop never closes its pool; dispose() must, or every such
    server keeps its connections until the process ends. (Named connections: the run's
    other tests share this database.)"""
    name = "aicredits-test-gone-loop"
    db = Database(f"{pg_url}?application_name={name}")
    conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")

    def backends() -> int:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                (name,),
            ).fetchone()
        return int(row[0]) if row else 0

    async def use() -> None:
        await asyncio.gather(*(db.execute_one_async("SELECT pg_sleep(0.05)", {}) for _ in range(4)))

    # A server's loop that has stopped but is still referenced (as a stopped server's is):
    # closed, yet its pool lives on, and nothing closed it.
    loop = asyncio.new_event_loop()
    loop.run_until_complete(use())
    loop.close()
    assert backends() == 4
    db.dispose()
    deadline = time.monotonic() + 5
    while backends() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backends() == 0
    assert loop.is_closed()  # (kept referenced until here)


@pytest.fixture
def silent_server() -> Iterator[int]:
    with silent_port() as port:
        yield port


def test_a_database_that_does_not_answer_fails_calls_within_seconds(silent_server: int) -> None:
    """Without a connect timeout, both the threads' pool and the event loop's waited for ever
    (the API call with them). Now each fails after PG_CONNECTION_DEFAULTS' 5 s, which the
    API answers with 503 database_unavailable."""
    db = Database(f"postgresql://app@127.0.0.1:{silent_server}/aicredits")
    outcomes: dict[str, tuple[type[BaseException], float]] = {}

    def read_in_a_thread() -> None:
        started = time.monotonic()
        try:
            with db.read() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            outcomes["sync"] = (type(exc), time.monotonic() - started)

    async def statement_on_the_loop() -> None:
        started = time.monotonic()
        try:
            await asyncio.wait_for(db.execute_one_async("SELECT 1", {}), 30)
        except Exception as exc:
            outcomes["async"] = (type(exc), time.monotonic() - started)

    thread = threading.Thread(target=read_in_a_thread, daemon=True)
    thread.start()
    try:
        asyncio.run(statement_on_the_loop())
        thread.join(30)
    finally:
        db.dispose()
    assert set(outcomes) == {"sync", "async"}, outcomes
    sync_error, sync_took = outcomes["sync"]
    async_error, async_took = outcomes["async"]
    assert issubclass(sync_error, sa.exc.OperationalError) and 4 < sync_took < 15, outcomes
    assert issubclass(async_error, psycopg.OperationalError) and 4 < async_took < 15, outcomes


def test_every_connection_carries_the_defaults_and_the_urls_own_values(pg_url: str) -> None:
    db = Database(pg_url + "?connect_timeout=9")

    def settings_of(info: psycopg.ConnectionInfo) -> dict[str, str]:
        parameters = info.get_parameters()
        return {k: parameters.get(k, "") for k in PG_CONNECTION_DEFAULTS}

    expected = {**PG_CONNECTION_DEFAULTS, "connect_timeout": "9"}

    async def on_the_loop() -> dict[str, str]:
        assert await db.execute_one_async("SELECT 1", {}) == (1,)
        pool = db._async_pools[asyncio.get_running_loop()]
        conn = await pool.get()
        try:
            return settings_of(conn.info)
        finally:
            pool.put(conn)
            await db.aclose_async()

    try:
        with db.read() as conn:
            raw = conn.connection.dbapi_connection
            assert isinstance(raw, psycopg.Connection)
            assert settings_of(raw.info) == expected
        assert asyncio.run(on_the_loop()) == expected
    finally:
        db.dispose()
