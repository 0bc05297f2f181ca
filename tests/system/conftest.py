"""The fault and load suite's fixtures: private services for the whole run, and the real app
in production mode (Postgres, Redis, several workers) once per test module, each module on
its own fresh database.

A module may set `WORKERS` (default 2) and `APP_ENV` (extra environment for the app).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import credit_accounts, holds, usage_events
from aicredits.services.verify import verify_ledger
from tests.system.harness import RunningApp, Services, app_env, private_services, running_app


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/system/" in item.nodeid:
            item.add_marker(pytest.mark.system)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test shows the end of its app's log: what the workers said is the first clue
    to a failure seen only in CI."""
    outcome: Any = yield  # pluggy's Result (the hookwrapper protocol)
    report = outcome.get_result()
    app = getattr(item, "funcargs", {}).get("system_app")
    if report.failed and isinstance(app, RunningApp) and app.log.exists():
        lines = app.log.read_text(errors="replace").splitlines()[-80:]
        report.sections.append(("app log (last 80 lines)", "\n".join(lines)))


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    with private_services() as running:
        yield running


@pytest.fixture(scope="module")
def system_app(request: pytest.FixtureRequest, services: Services) -> Iterator[RunningApp]:
    module = request.module.__name__.rsplit(".", 1)[-1]
    name = f"{module}_{uuid.uuid4().hex[:6]}"
    url = services.postgres.create_database(name)
    services.redis.client().flushall()
    env = app_env(services, url, **getattr(request.module, "APP_ENV", {}))
    workers = getattr(request.module, "WORKERS", 2)
    with running_app(env, workers=workers, log=services.base / f"{name}.log") as app:
        yield app


@pytest.fixture(scope="module")
def app_db(system_app: RunningApp) -> Iterator[Database]:
    database = Database(system_app.database_url)
    yield database
    database.dispose()


# --- what every scenario checks afterwards, from the database ---------------------------------


def scalar(db: Database, query: Any) -> Any:
    with db.read() as conn:
        return conn.execute(query).scalar_one()


def pending_holds(db: Database) -> int:
    return int(
        scalar(
            db,
            sa.select(sa.func.count()).select_from(holds).where(holds.c.status == "pending"),
        )
    )


def usage_by_request(db: Database, request_ids: list[str]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {rid: [] for rid in request_ids}
    with db.read() as conn:
        for row in conn.execute(
            sa.select(usage_events).where(usage_events.c.request_id.in_(request_ids))
        ):
            found[row.request_id].append(row)
    return found


def holds_by_request(db: Database, request_ids: list[str]) -> dict[str, Any]:
    with db.read() as conn:
        rows = conn.execute(sa.select(holds).where(holds.c.request_id.in_(request_ids))).all()
    return {row.request_id: row for row in rows}


def accounts(db: Database, user_ids: list[int]) -> dict[int, Any]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(credit_accounts).where(credit_accounts.c.user_id.in_(user_ids))
        ).all()
    return {row.user_id: row for row in rows}


def assert_ledger_sound(db: Database) -> None:
    """verify-ledger clean, no hold left open, every settled hold with exactly one usage
    event and every usage event with its settled hold."""
    assert verify_ledger(db) == []
    assert pending_holds(db) == 0
    with db.read() as conn:
        settled = conn.execute(
            sa.select(holds.c.request_id).where(holds.c.status == "settled")
        ).scalars()
        settled_ids = sorted(settled)
        events = sorted(conn.execute(sa.select(usage_events.c.request_id)).scalars())
    assert events == settled_ids
