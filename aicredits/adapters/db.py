"""Engine and transactions, correct on SQLite and Postgres and across processes.

SQLite: WAL, a busy timeout, foreign keys on, and write transactions opened with
BEGIN IMMEDIATE so two writers never both read and then deadlock on upgrading their lock.
Postgres: psycopg 3 at READ COMMITTED; the ledger's conditional UPDATEs re-check their
WHERE clause after waiting on a row lock, which is what makes a reservation atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from aicredits.settings import get_settings, normalise_database_url

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _prepare_sqlite_file(url: sa.URL) -> None:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


# libpq's connection settings wherever the URL does not set its own (Postgres only). Without
# them a database that stops answering (a failover, a network partition, a NAT or proxy that
# forgot an idle connection) leaves calls waiting for minutes, or for ever, where they should
# fail within seconds (a 503 on the API).
PG_CONNECTION_DEFAULTS = {
    "connect_timeout": "5",  # seconds to connect and sign in
    # Idle connections are probed after 30 s, every 10 s: a NAT keeps their state, and a peer
    # that is gone is noticed before a statement is sent to it.
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    # Milliseconds: a statement sent and not even acknowledged by the server's machine this
    # long ends the connection. (A slow statement is acknowledged at once, so it is not cut.)
    "tcp_user_timeout": "20000",
}


def with_connection_defaults(url: str) -> str:
    """`url` with PG_CONNECTION_DEFAULTS added where it does not set them (not SQLite)."""
    parsed = sa.make_url(normalise_database_url(url))
    if parsed.get_backend_name() != "postgresql":
        return url
    missing = {k: v for k, v in PG_CONNECTION_DEFAULTS.items() if k not in parsed.query}
    return parsed.update_query_dict(missing).render_as_string(hide_password=False)


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    url = with_connection_defaults(normalise_database_url(url))
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        _prepare_sqlite_file(parsed)
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    # No pre-ping: it costs a round trip per transaction. A dropped connection fails one
    # statement, SQLAlchemy invalidates the pool, and the caller's error path handles it.
    kwargs.setdefault("pool_recycle", 1800)
    return sa.create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below own the transaction boundaries.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """The app's handle on its database: short transactions for writes, cheap ones for reads."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = normalise_database_url(url)
        self.engine = create_db_engine(self.url, **engine_kwargs)
        # Postgres: a second pool whose connections stay in autocommit, for the single-statement
        # operations on the metered path (no BEGIN/COMMIT round trips, no mode switching).
        self._autocommit_engine = (
            None
            if self.is_sqlite
            else create_db_engine(self.url, isolation_level="AUTOCOMMIT", **engine_kwargs)
        )
        self._async_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncPool] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One unit of work: commits on success, rolls back on any exception."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        """A read that takes no write lock, so it never waits on writers.

        With `snapshot`, every statement sees the same moment (REPEATABLE READ on Postgres;
        a SQLite read transaction already does).
        """
        if self._autocommit_engine is not None and not snapshot:
            with self._autocommit_engine.connect() as conn:
                yield conn
            return
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(sqlite_begin="DEFERRED")
            else:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def execute_one(self, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """Postgres: run one statement as its own transaction, straight through psycopg, and
        return its first row. For the hot path, where SQLAlchemy's per-call work shows."""
        if self._autocommit_engine is None:
            raise RuntimeError("execute_one() is for Postgres; use transaction() on SQLite")
        fairy = self._autocommit_engine.raw_connection()
        try:
            cursor = fairy.driver_connection.execute(sql, params)  # type: ignore[union-attr]
            row = cursor.fetchone() if cursor.description else None
            return None if row is None else tuple(row)
        except psycopg.OperationalError:
            fairy.invalidate()  # the connection is gone; do not hand it out again
            raise
        finally:
            fairy.close()

    async def execute_one_async(self, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """execute_one without a thread: on an asyncio psycopg connection of the running event
        loop's own small pool (autocommit). For the metered path's single statements, where a
        hop to a thread and back costs more than the statement. A call cancelled mid-way
        closes its connection (its state is unknown), never returns it to the pool."""
        if self._autocommit_engine is None:
            raise RuntimeError("execute_one_async() is for Postgres; use transaction() on SQLite")
        loop = asyncio.get_running_loop()
        pool = self._async_pools.get(loop)
        if pool is None:
            pool = self._async_pools[loop] = _AsyncPool(self._conninfo)
        conn = await pool.get()
        try:
            cursor = await conn.execute(sql, params)
            row = await cursor.fetchone() if cursor.description else None
        except BaseException as exc:
            if isinstance(exc, psycopg.OperationalError):
                # The server went away (a restart?): the idle ones are as dead as this one.
                # As SQLAlchemy does for the sync pool, drop them all, not one per failure.
                pool.invalidate_idle()
            await pool.discard(conn)
            raise
        pool.put(conn)
        return None if row is None else tuple(row)

    async def aclose_async(self) -> None:
        """Close the running event loop's async connections (its gateway's shutdown)."""
        pool = self._async_pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.aclose()

    @property
    def _conninfo(self) -> str:
        url = sa.make_url(with_connection_defaults(self.url)).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session in one transaction, for the simpler, non-ledger use cases."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def insert_ignoring_conflict(self, target: sa.Table, *, index: str | tuple[str, ...]) -> Any:
        """INSERT ... ON CONFLICT (index) DO NOTHING, in this database's dialect."""
        return insert_ignoring_conflict(self.dialect, target, index=index)

    @contextmanager
    def job_lock(self, name: str) -> Iterator[bool]:
        """Yield whether this process got the job `name` to itself (Postgres: a session-level
        advisory lock on a dedicated connection, released at the end; another worker asking
        meanwhile gets False and skips the run). SQLite is one machine, where the jobs'
        conditional updates already keep each piece of work to one writer."""
        if self.is_sqlite:
            yield True
            return
        key = int.from_bytes(
            hashlib.sha256(f"aicredits-job:{name}".encode()).digest()[:8], "big", signed=True
        )
        with self.engine.connect() as conn:
            got = bool(conn.exec_driver_sql("SELECT pg_try_advisory_lock(%s)", (key,)).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (key,))
                    conn.commit()

    def dispose(self) -> None:
        """Close every idle connection: the engines' pools, and the async connections of
        every event loop, also of loops that are gone (a stopped server's), which nothing
        else would close before the process ends."""
        self.engine.dispose()
        if self._autocommit_engine is not None:
            self._autocommit_engine.dispose()
        pools = list(self._async_pools.values())
        self._async_pools = weakref.WeakKeyDictionary()
        for pool in pools:
            pool.invalidate_idle()


class _AsyncPool:
    """Autocommit AsyncConnections of one event loop: at most SIZE, made on demand and kept;
    a caller waits (FIFO) for a free one beyond that, as with the sync engine's pool. No
    pre-ping (as the sync engine): a dropped connection fails one statement and is
    discarded; the caller's error path handles that statement."""

    SIZE = 15  # the sync engine's pool_size + max_overflow

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots = asyncio.Semaphore(self.SIZE)

    async def get(self) -> psycopg.AsyncConnection[Any]:
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
            return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        except BaseException:
            self._slots.release()
            raise

    def put(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not conn.closed:
            self._idle.append(conn)
        self._slots.release()

    async def discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._slots.release()
        with contextlib.suppress(Exception):  # it is being thrown away
            await asyncio.shield(conn.close())

    def invalidate_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.pgconn.finish()  # closes the socket now, without a round trip

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


def insert_ignoring_conflict(
    dialect: str, target: sa.Table, *, index: str | tuple[str, ...]
) -> Any:
    """INSERT ... ON CONFLICT (index) DO NOTHING, in the dialect named (a connection's
    `conn.dialect.name`, or Database.dialect)."""
    ins = sqlite.insert(target) if dialect == "sqlite" else postgresql.insert(target)
    columns = [index] if isinstance(index, str) else list(index)
    return ins.on_conflict_do_nothing(index_elements=columns)


@contextmanager
def unit_of_work(target: Database | Connection) -> Iterator[Connection]:
    """Where a write runs: in a transaction of its own when given the Database, or inside the
    caller's, when given its connection, as a savepoint, so the caller commits everything it
    did once and a write that fails (a replayed idempotency key) undoes only itself."""
    if isinstance(target, Database):
        with target.transaction() as conn:
            yield conn
        return
    with target.begin_nested():
        yield target


@contextmanager
def reading(target: Database | Connection, *, snapshot: bool = False) -> Iterator[Connection]:
    """A read: through the caller's connection (its transaction sees its own writes), or a
    read of its own (with `snapshot`, one whose statements all see the same moment)."""
    if isinstance(target, Database):
        with target.read(snapshot=snapshot) as conn:
            yield conn
        return
    yield target


@lru_cache(maxsize=8)
def database_for(url: str) -> Database:
    """One Database (one pool) per URL per process."""
    return Database(url)


def get_database() -> Database:
    """The process-wide database for the configured DATABASE_URL."""
    return database_for(get_settings().database_url)
