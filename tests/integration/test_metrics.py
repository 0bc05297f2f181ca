"""/metrics for real: calls through the gateway and webhooks move the counters, the guard
refuses strangers, and several worker processes add up into one scrape."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from aicredits.adapters import metrics
from aicredits.adapters.db import Database
from aicredits.adapters.logs import JsonFormatter
from aicredits.adapters.tokenizer import count_message_tokens
from aicredits.api.routes import api_transformers
from aicredits.domain.pricing import usage_cost
from aicredits.settings import Settings
from tests.factories import make_user
from tests.integration import fake_stripe as fs
from tests.integration.fake_stripe import make_shop
from tests.integration.gateway_fixtures import MESSAGES, MODEL, running_rig
from tests.servers import serve_asgi

REPO = Path(__file__).resolve().parents[2]
TOKEN = "metrics-test-token-0123456789"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(base_url: str, **headers: str) -> Samples:
    response = httpx.get(f"{base_url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@contextmanager
def serve_app(settings: Settings) -> Iterator[str]:
    """The app's routes behind its middleware (no Reflex), on a real socket."""
    api, wrap = api_transformers(settings)
    assert isinstance(api, Starlette) and not isinstance(wrap, Starlette)
    with serve_asgi(wrap(api), ready_path="/healthz") as base_url:
        yield base_url


@pytest.fixture(autouse=True)
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test process keeps its metrics in memory; only the last test names a directory."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def test_calls_through_the_gateway_move_the_upstream_and_credit_counters(db_url: str) -> None:
    with running_rig(db_url) as rig:
        user, key = rig.user(credits=100_000)
        m = MODEL.id
        before = scrape(rig.api)
        reply = rig.client(key).chat.completions.create(model=m, messages=MESSAGES)
        assert reply.usage is not None
        rig.queue(fault="500", count=5)
        with pytest.raises(openai.APIStatusError):
            rig.client(key).chat.completions.create(model=m, messages=MESSAGES)
        rig.wait_settled()
        after = scrape(rig.api)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        (event,) = rig.usage_events(user)
        assert delta("aicredits_upstream_calls_total", model=m, outcome="completed") == 1
        assert delta("aicredits_upstream_calls_total", model=m, outcome="failed") == 1
        assert delta("aicredits_upstream_errors_total", model=m, kind="status") == 1
        assert delta("aicredits_upstream_tokens_total", model=m, direction="input") == (
            event.input_tokens
        )
        assert delta("aicredits_upstream_tokens_total", model=m, direction="output") == 20
        reserved = delta("aicredits_credits_reserved_total", model=m)
        settled = delta("aicredits_credits_settled_total", model=m)
        released = delta("aicredits_credits_released_total", model=m)
        worst_case = usage_cost(
            rig.price(),
            input_tokens=count_message_tokens(MESSAGES),
            output_tokens=MODEL.max_output_tokens,
        )
        assert settled == event.charged > 0
        # Two holds of the worst case: one charged its usage, the rest of both given back.
        assert reserved == 2 * worst_case
        assert released == 2 * worst_case - event.charged
        assert rig.balance(user).balance == 100_000 - event.charged


def test_a_webhook_moves_the_webhook_counter(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    shop = make_shop(db, monkeypatch, METRICS_TOKEN=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def webhook_count(event_type: str, outcome: str) -> float:
        response = shop.client.get("/metrics", headers=auth)
        assert response.status_code == 200
        samples = parse(response.text)
        return value(samples, "aicredits_webhook_events_total", type=event_type, outcome=outcome)

    kind = "checkout.session.completed"
    before = webhook_count(kind, "credited"), webhook_count(kind, "replayed")
    refused_before = webhook_count("unverified", "invalid_signature")
    uid = make_user(db)
    sid = shop.start(uid)
    body = fs.event(kind, fs.checkout_session(sid, user_id=uid))
    assert shop.deliver(body).json()["outcome"] == "credited"
    assert shop.deliver(body).status_code == 200  # Stripe's retry of the same event
    assert shop.post_event(body, "t=1,v1=forged").status_code == 400
    assert webhook_count(kind, "credited") == before[0] + 1
    assert webhook_count(kind, "replayed") == before[1] + 1
    assert webhook_count("unverified", "invalid_signature") == refused_before + 1


@pytest.fixture
def guarded_app(sqlite_url: str) -> Iterator[str]:
    """The app's routes behind its middleware, scraped over a real socket from 127.0.0.1,
    which these settings do not allow."""
    settings = Settings(
        _env_file=None,
        database_url=sqlite_url,
        metrics_token=TOKEN,
        metrics_allow_networks="10.0.0.0/8,192.168.0.0/16",
    )
    with serve_app(settings) as base_url:
        yield base_url


def test_the_guard_refuses_strangers_and_wrong_tokens(guarded_app: str) -> None:
    url = f"{guarded_app}/metrics"
    labels = {"route": "/metrics", "method": "GET", "status": "4xx"}
    metrics.flush()  # what earlier tests tallied is in the registry before it is read
    refusals_before = REGISTRY.get_sample_value("aicredits_http_requests_total", labels) or 0
    refused = httpx.get(url)
    assert refused.status_code == 403
    assert "aicredits_" not in refused.text
    wrong = httpx.get(url, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    ok = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert "aicredits_http_requests_total" in ok.text
    # The refusals themselves were counted, under the route's template.
    samples = parse(ok.text)
    assert value(samples, "aicredits_http_requests_total", **labels) == refusals_before + 3
    assert ok.headers["x-request-id"].startswith("req_")


def test_the_default_guard_lets_the_local_machine_in(sqlite_url: str) -> None:
    settings = Settings(_env_file=None, database_url=sqlite_url)
    assert settings.metrics_allow_networks == ["127.0.0.1/32", "::1/128"]
    with serve_app(settings) as base_url:
        assert httpx.get(f"{base_url}/metrics").status_code == 200
        # With no token configured, any token is a wrong one.
        wrong = httpx.get(f"{base_url}/metrics", headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401


def test_a_scrape_through_an_untrusted_proxy_needs_the_token(sqlite_url: str) -> None:
    """A proxy on this machine makes every visitor 127.0.0.1: without TRUSTED_PROXIES, a
    request that says it was forwarded is not let in by that address."""
    settings = Settings(_env_file=None, database_url=sqlite_url, metrics_token=TOKEN)
    with serve_app(settings) as base_url:
        url = f"{base_url}/metrics"
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            proxied = httpx.get(url, headers={header: "for=203.0.113.9"})
            assert proxied.status_code == 403, header
            assert "TRUSTED_PROXIES" in proxied.text and "aicredits_" not in proxied.text
        token = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "203.0.113.9"}
        assert httpx.get(url, headers=token).status_code == 200
        assert httpx.get(url).status_code == 200  # a scraper on this machine, straight in


def test_behind_a_trusted_proxy_the_forwarded_client_decides(sqlite_url: str) -> None:
    settings = Settings(_env_file=None, database_url=sqlite_url, trusted_proxies="127.0.0.1")
    with serve_app(settings) as base_url:
        url = f"{base_url}/metrics"
        assert httpx.get(url, headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 403
        # A scraper on the proxy's machine, through the proxy.
        assert httpx.get(url, headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200


def test_bad_networks_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="not-a-network"):
        Settings(_env_file=None, metrics_allow_networks="10.0.0.0/8,not-a-network")


WORKER = textwrap.dedent(
    """
    import sys
    from aicredits.adapters import metrics

    for _ in range(int(sys.argv[1])):
        metrics.webhook_event(event_type="test.multiprocess", outcome="ok")
    metrics.job_run(job="test-multiprocess", outcome="ran", items=int(sys.argv[1]))
    metrics.observe_http(route="/healthz", method="GET", status=200, seconds=0.01)
    """
)


def test_worker_processes_add_up_in_one_scrape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(REPO)}
    for count in (2, 5):  # two worker processes, one after the other, each with its own pid
        subprocess.run([sys.executable, "-c", WORKER, str(count)], env=env, check=True, cwd=REPO)
    assert len(list(directory.glob("counter_*.db"))) == 2
    # The scrape (here, in a third process) reads every worker's file, not its own memory.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    settings = Settings(_env_file=None, database_url=sqlite_url)
    with serve_app(settings) as base_url:
        samples = scrape(base_url)
    assert (
        value(samples, "aicredits_webhook_events_total", type="test.multiprocess", outcome="ok")
        == 7
    )
    assert value(samples, "aicredits_job_items_total", job="test-multiprocess") == 7
    assert value(samples, "aicredits_job_runs_total", job="test-multiprocess", outcome="ran") == 2
    assert value(samples, "aicredits_http_request_duration_seconds_count", route="/healthz") == 2
    # This process's own counts (its /healthz and /metrics requests) are not in it: only the
    # workers' files are read.
    assert not [key for key in samples if ("route", "/metrics") in key[1]]


def test_the_api_answers_with_one_request_id_the_one_its_hold_and_logs_carry(
    db_url: str,
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # formats as each line is written, in its context
    handler.setFormatter(JsonFormatter())
    watched = logging.getLogger("aicredits")
    old_level = watched.level
    with running_rig(db_url) as rig, serve_app(rig.settings) as base_url:
        user, key = rig.user(credits=100_000)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
        watched.addHandler(handler)
        watched.setLevel(logging.INFO)
        try:
            plain = client.chat.completions.with_raw_response.create(
                model=MODEL.id, messages=MESSAGES
            )
            # A client's own X-Request-ID may repeat: it is logged, but never keys a hold.
            traced = [
                client.chat.completions.with_raw_response.create(
                    model=MODEL.id, messages=MESSAGES, extra_headers={"X-Request-ID": "trace-1"}
                )
                for _ in range(2)
            ]
        finally:
            watched.removeHandler(handler)
            watched.setLevel(old_level)
        ids = [r.headers.get_list("x-request-id") for r in (plain, *traced)]
        assert all(len(one) == 1 and one[0].startswith("req_") for one in ids)
        request_ids = [one[0] for one in ids]
        assert len(set(request_ids)) == 3
        assert [e.request_id for e in rig.usage_events(user)] == request_ids
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    # One line per call, written when it ends: who, which model, how it ended, how long.
    access = [x for x in lines if x["message"].startswith("POST /v1/chat/completions 200")]
    assert [(x["request_id"], x["user_id"], x["route"]) for x in access] == [
        (rid, user, "/v1/chat/completions") for rid in request_ids
    ]
    assert all(x["message"].endswith(f" ms model {MODEL.id}") for x in access)
    assert not [x for x in lines if x["message"].startswith("chat ")]
    linked = [x["message"] for x in lines if x["message"].startswith("client request id")]
    assert linked == [f"client request id trace-1 is {rid}" for rid in request_ids[1:]]
