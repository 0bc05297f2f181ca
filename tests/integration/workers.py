"""Code that runs in child processes of the concurrency tests (importable under spawn)."""

from __future__ import annotations

import threading
import traceback
from typing import Any

from aicredits.adapters.db import Database
from aicredits.domain.errors import InsufficientCredits
from aicredits.services import ledger


def reserve_many(
    url: str,
    user_id: int,
    credits: int,
    request_ids: list[str],
    start: Any,
    results: Any,
) -> None:
    """Reserve once per request id, all threads released together; report outcomes."""
    # Four of these share the server's connection limit (100 by default) with the parent.
    pool = {} if url.startswith("sqlite") else {"pool_size": 10, "max_overflow": 0}
    db = Database(url, **pool)
    outcomes: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(len(request_ids) + 1)

    def attempt(request_id: str) -> None:
        gate.wait()
        try:
            ledger.reserve(db, user_id=user_id, credits=credits, request_id=request_id)
            outcome = "held"
        except InsufficientCredits:
            outcome = "refused"
        except Exception:  # reported to the parent, which fails the test
            outcome = "error: " + traceback.format_exc()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt, args=(rid,)) for rid in request_ids]
    for t in threads:
        t.start()
    start.wait()  # every process is ready: go
    gate.wait()
    for t in threads:
        t.join()
    db.dispose()
    results.put(outcomes)
