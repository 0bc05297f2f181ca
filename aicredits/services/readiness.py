"""Readiness: can this worker serve a request right now (database, and Redis when used)?

A load balancer stops sending traffic to a worker that answers 503 and tries again later;
liveness (`/healthz`) stays separate so a database outage does not get every worker
restarted. Each check has a short deadline: a probe that hangs is worse than one that fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import cast

import sqlalchemy as sa
from redis.asyncio import Redis

from aicredits.adapters.blocking import run_blocking
from aicredits.adapters.db import Database, database_for

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 2.0
OK = "ok"
NOT_CONFIGURED = "not configured"


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(state in (OK, NOT_CONFIGURED) for state in self.checks.values())

    @property
    def down(self) -> list[str]:
        return [name for name, state in self.checks.items() if state not in (OK, NOT_CONFIGURED)]


def _select_one(db: Database) -> None:
    with db.read() as conn:
        conn.execute(sa.text("SELECT 1")).scalar_one()


async def _database_state(database_url: str, timeout: float) -> str:
    try:
        await asyncio.wait_for(run_blocking(_select_one, database_for(database_url)), timeout)
    except TimeoutError:
        logger.warning("readiness: the database did not answer within %.1f s", timeout)
        return f"down: no answer within {timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", and is reported
        logger.warning("readiness: the database failed: %s: %s", type(exc).__name__, exc)
        return f"down: {type(exc).__name__}"
    return OK


async def _ping(client: Redis) -> None:
    # redis-py types ping() for its sync and async clients at once.
    await cast("Awaitable[bool]", client.ping())


async def _redis_state(redis_url: str, timeout: float) -> str:
    if not redis_url:
        return NOT_CONFIGURED
    client = Redis.from_url(redis_url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        await asyncio.wait_for(_ping(client), timeout)
    except TimeoutError:
        logger.warning("readiness: Redis did not answer within %.1f s", timeout)
        return f"down: no answer within {timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", and is reported
        logger.warning("readiness: Redis failed: %s: %s", type(exc).__name__, exc)
        return f"down: {type(exc).__name__}"
    finally:
        await client.aclose()
    return OK


async def check_readiness(
    *, database_url: str, redis_url: str, timeout: float = CHECK_TIMEOUT_SECONDS
) -> Readiness:
    """Check the database (`SELECT 1`) and Redis (`PING`, when configured) concurrently."""
    database, redis = await asyncio.gather(
        _database_state(database_url, timeout), _redis_state(redis_url, timeout)
    )
    return Readiness({"database": database, "redis": redis})
