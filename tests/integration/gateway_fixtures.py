"""A running API (our /v1 routes over real HTTP) in front of a running fake upstream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import sqlalchemy as sa
from openai.types.chat import ChatCompletionMessageParam

from aicredits.adapters.db import Database, database_for
from aicredits.adapters.tables import holds, usage_events
from aicredits.api.routes import build_api
from aicredits.devtools.fake_upstream import FakeUpstreamConfig
from aicredits.devtools.fake_upstream import build_app as build_fake_upstream
from aicredits.services import api_keys, ledger, pricing
from aicredits.services.verify import verify_ledger
from aicredits.settings import ModelSpec, Settings
from tests.factories import make_user
from tests.servers import serve_asgi

MODEL = ModelSpec(
    id="demo-model",
    label="Demo",
    input_per_mtok=2_000,
    output_per_mtok=8_000,
    max_output_tokens=64,
    context_tokens=4_096,
)
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something, please."}]


@dataclass
class Rig:
    api: str
    upstream: str
    db: Database
    settings: Settings

    def user(self, credits: int) -> tuple[int, str]:
        """A user with `credits` and a personal API key."""
        user_id = make_user(self.db, credits=credits)
        key = api_keys.create_api_key(self.db, user_id=user_id, name="test").secret
        return user_id, key

    def client(self, key: str, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.api}/v1", api_key=key, max_retries=0, **options)

    def queue(self, **knobs: Any) -> None:
        httpx.post(f"{self.upstream}/_fake/next", json=knobs).raise_for_status()

    def upstream_stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.upstream}/_fake/stats").json()
        return data

    def balance(self, user_id: int) -> ledger.Balance:
        return ledger.get_balance(self.db, user_id=user_id)

    def usage_events(self, user_id: int) -> list[Any]:
        with self.db.read() as conn:
            return list(
                conn.execute(
                    sa.select(usage_events)
                    .where(usage_events.c.user_id == user_id)
                    .order_by(usage_events.c.id)
                )
            )

    def usage_events_all(self) -> list[Any]:
        with self.db.read() as conn:
            return list(conn.execute(sa.select(usage_events).order_by(usage_events.c.id)))

    def pending_holds(self) -> int:
        with self.db.read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(holds).where(holds.c.status == "pending")
                ).scalar_one()
            )

    def wait_settled(self, timeout: float = 10) -> None:
        """Settlement of an abandoned stream finishes just after the client leaves."""
        deadline = time.monotonic() + timeout
        while self.pending_holds() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.pending_holds() == 0, "a hold was left pending"

    def price(self, model: str = MODEL.id) -> pricing.Price:
        return pricing.current_price(self.db, model=model)

    def hold(self, request_id: str) -> Any:
        with self.db.read() as conn:
            return conn.execute(sa.select(holds).where(holds.c.request_id == request_id)).one()

    def unbilled_calls(self) -> list[Any]:
        """Calls whose usage went beyond what was reserved for them: none should."""
        with self.db.read() as conn:
            return list(
                conn.execute(
                    sa.select(usage_events.c.request_id, usage_events.c.unbilled).where(
                        usage_events.c.unbilled > 0
                    )
                )
            )


@contextmanager
def running_rig(
    db_url: str, *, upstream_config: dict[str, Any] | None = None, **overrides: Any
) -> Iterator[Rig]:
    """The API on a fake upstream serving the configured models; `upstream_config` changes
    the fake's FakeUpstreamConfig (a required key, other models)."""
    with ExitStack() as stack:
        models = overrides.get("models", [MODEL])
        embedding_models = overrides.get("embedding_models", [])
        served = [m.upstream_model for m in [*models, *embedding_models]]
        config = FakeUpstreamConfig(
            **{"models": served, "reply_tokens": 20, **(upstream_config or {})}
        )
        upstream = stack.enter_context(
            serve_asgi(build_fake_upstream(config), ready_path="/_fake/stats")
        )
        values: dict[str, Any] = {
            "database_url": db_url,
            "openai_base_url": f"{upstream}/v1",
            "public_url": "http://localhost:3000",
            "models": [MODEL],
            "embedding_models": [],
            "rate_limit_user_per_minute": 0,
            "rate_limit_ip_per_minute": 0,
            "rate_limit_concurrent": 0,
            "upstream_read_timeout": 5.0,
            "upstream_retries": 1,
            **overrides,
        }
        settings = Settings(_env_file=None, **values)
        db = Database(db_url)
        pricing.seed_prices(db, settings.priced_models)
        api = stack.enter_context(serve_asgi(build_api(settings), ready_path="/healthz"))
        rig = Rig(api=api, upstream=upstream, db=db, settings=settings)
        yield rig
        rig.wait_settled()
        assert verify_ledger(db) == []
        # A hold never ends below the usage: the worst case reserved bounded every call.
        assert rig.unbilled_calls() == []
        db.dispose()
        # The app's own Database (one per URL, cached), whose server has stopped: its
        # connections would stay open until the process ends, and the suite's share of
        # Postgres' 100 connections ran out.
        database_for(db_url).dispose()
