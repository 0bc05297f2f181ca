"""A revoked API key, or a suspended user's, stops working on every worker within a second.

Each worker remembers a resolved key for at most api_keys.KEY_CACHE_SECONDS, so the metered
path skips the key's database lookup. Here both workers of the production app have just
resolved (and so remember) the key when it is revoked behind their backs, through the
database, as another worker or the admin console would; from a second later every call, on
whichever worker serves it, is refused.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable

import pytest

from aicredits.adapters.db import Database
from aicredits.services import api_keys, users
from aicredits.services.api_keys import KEY_CACHE_SECONDS
from tests.system.harness import RunningApp, provision, wait_until

WORKERS = 2


def call(app: RunningApp, api_key: str) -> tuple[int, int | None]:
    """GET /v1/models (authenticated, nothing charged) on a new connection: (status, the pid
    of the worker that served it)."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
    try:
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {api_key}"})
        response = conn.getresponse()
        response.read()
        client_port = conn.sock.getsockname()[1] if conn.sock else 0
        return response.status, app.pid_serving(client_port)
    finally:
        conn.close()


def warm_every_worker(app: RunningApp, api_key: str) -> None:
    """Call until each worker has served the key with a 200 (so each remembers it)."""
    served: set[int] = set()

    def both() -> bool:
        status, pid = call(app, api_key)
        assert status == 200
        if pid is not None:
            served.add(pid)
        return len(served) >= WORKERS

    wait_until(both, timeout=60, interval=0.01, what="both workers serving the key")


def revoke_by_key(db: Database, user_id: int) -> None:
    key = api_keys.list_api_keys(db, user_id=user_id)[0]
    api_keys.revoke_api_key(db, user_id=user_id, key_id=key.id)


def suspend(db: Database, user_id: int) -> None:
    users.set_suspended(db, user_id=user_id, suspended=True)


@pytest.mark.parametrize("revoke", [revoke_by_key, suspend], ids=["revoked", "suspended"])
def test_revocation_reaches_every_worker_within_a_second(
    system_app: RunningApp, app_db: Database, revoke: Callable[[Database, int], None]
) -> None:
    account = provision(system_app.env, [1000], label=f"revoke-{revoke.__name__}")[0]
    warm_every_worker(system_app, account.api_key)
    revoke(app_db, account.user_id)
    revoked_at = time.monotonic()

    refused_by: set[int] = set()
    served_after_the_second: list[tuple[int, int | None]] = []
    while time.monotonic() < revoked_at + KEY_CACHE_SECONDS + 3:
        began = time.monotonic()
        status, pid = call(system_app, account.api_key)
        if began >= revoked_at + KEY_CACHE_SECONDS:
            if status != 401:
                served_after_the_second.append((status, pid))
            elif pid is not None:
                refused_by.add(pid)
    assert served_after_the_second == []
    assert len(refused_by) == WORKERS  # both workers were asked, and both refused
