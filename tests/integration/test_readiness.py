"""/readyz against real servers: the database (SQLite and Postgres) and Redis, up and down."""

from __future__ import annotations

import socket

from starlette.testclient import TestClient

from aicredits.api.routes import build_api
from aicredits.settings import Settings


def _closed_port() -> int:
    """A port nothing listens on: bound once to learn a free number, then released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_readyz(**values: object) -> tuple[int, dict[str, object], str | None]:
    settings = Settings(_env_file=None, **values)  # type: ignore[arg-type]
    with TestClient(build_api(settings)) as client:
        response = client.get("/readyz")
    return response.status_code, response.json(), response.headers.get("retry-after")


def test_ready_when_the_database_and_redis_answer(db_url: str, redis_url: str) -> None:
    status, body, _ = _get_readyz(database_url=db_url, redis_url=redis_url)
    assert status == 200
    assert body == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}


def test_ready_without_redis_when_none_is_configured(sqlite_url: str) -> None:
    status, body, _ = _get_readyz(database_url=sqlite_url, redis_url="")
    assert status == 200
    assert body["checks"] == {"database": "ok", "redis": "not configured"}


def test_unavailable_when_the_database_port_is_closed(redis_url: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/aicredits"
    status, body, retry_after = _get_readyz(database_url=url, redis_url=redis_url)
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["down"] == ["database"]
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert str(checks["database"]).startswith("down")
    assert checks["redis"] == "ok"
    assert retry_after == "5"


def test_unavailable_when_the_redis_port_is_closed(sqlite_url: str) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    status, body, _ = _get_readyz(database_url=sqlite_url, redis_url=url)
    assert status == 503
    assert body["down"] == ["redis"]
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["database"] == "ok"
    assert str(checks["redis"]).startswith("down")


def test_both_named_when_both_are_down() -> None:
    status, body, _ = _get_readyz(
        database_url=f"postgresql://postgres@127.0.0.1:{_closed_port()}/aicredits",
        redis_url=f"redis://127.0.0.1:{_closed_port()}/0",
    )
    assert status == 503
    assert body["down"] == ["database", "redis"]
