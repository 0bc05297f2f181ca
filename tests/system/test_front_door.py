"""The production app sends its OpenAI-compatible API past Reflex's outer layer
(api/front_door.py), and the API answers as it did through it: the same CORS answers to a
page of the site and to a stranger, the request id, the one access line per call. Everything
else (Reflex's own endpoints, our other routes) still goes Reflex's way."""

from __future__ import annotations

import httpx
import pytest

from tests.system.harness import MODEL, PUBLIC_URL, RunningApp, provision, wait_until

WORKERS = 1
STRANGER = "https://evil.example"


@pytest.fixture(scope="module")
def api_key(system_app: RunningApp) -> str:
    return provision(system_app.env, [10_000], label="front")[0].api_key


def vary(response: httpx.Response) -> list[str]:
    return [v.strip() for v in response.headers.get("vary", "").split(",") if v.strip()]


def test_the_api_answers_a_page_of_the_site_with_cors_once(
    system_app: RunningApp, api_key: str
) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    url = f"{system_app.base_url}/v1/models"
    ours = httpx.get(url, headers={**auth, "Origin": PUBLIC_URL})
    assert ours.status_code == 200
    assert MODEL in {m["id"] for m in ours.json()["data"]}
    assert ours.headers["access-control-allow-origin"] == PUBLIC_URL
    assert ours.headers["access-control-allow-credentials"] == "true"
    assert ours.headers["x-request-id"].startswith("req_")
    assert ours.headers["strict-transport-security"].startswith("max-age=")
    # One CORS layer answered (through Reflex's outer layer too, Vary said Origin twice).
    assert vary(ours) == ["Origin"]
    stranger = httpx.get(url, headers={**auth, "Origin": STRANGER})
    assert stranger.status_code == 200
    assert "access-control-allow-origin" not in stranger.headers


def test_a_preflight_of_the_api_is_answered_for_the_site_and_refused_for_a_stranger(
    system_app: RunningApp,
) -> None:
    url = f"{system_app.base_url}/v1/chat/completions"
    asks = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    ours = httpx.options(url, headers={**asks, "Origin": PUBLIC_URL})
    assert ours.status_code == 200
    assert ours.headers["access-control-allow-origin"] == PUBLIC_URL
    assert "POST" in ours.headers["access-control-allow-methods"]
    stranger = httpx.options(url, headers={**asks, "Origin": STRANGER})
    assert stranger.status_code == 400
    assert stranger.text == "Disallowed CORS origin"


def test_a_call_is_metered_and_logged_once_through_the_front_door(
    system_app: RunningApp, api_key: str
) -> None:
    reply = httpx.post(
        f"{system_app.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert int(reply.headers["x-aicredits-charged"]) > 0
    request_id = reply.headers["x-request-id"]

    def access_lines() -> list[str]:
        return [
            line
            for line in system_app.log_tail(200_000).splitlines()
            if request_id in line and "POST /v1/chat/completions 200 " in line
        ]

    wait_until(lambda: access_lines(), timeout=10, what="the call's access line")
    (line,) = access_lines()
    assert f"model {MODEL}" in line


def test_everything_else_still_goes_reflexs_way(system_app: RunningApp) -> None:
    base = system_app.base_url
    assert httpx.get(f"{base}/ping").status_code == 200  # Reflex's own endpoint
    health = httpx.get(f"{base}/healthz")
    assert health.status_code == 200 and health.headers["x-request-id"].startswith("req_")
    # Not one of the API's routes: Reflex's 404, through both layers as before.
    assert httpx.get(f"{base}/v1/nothing").status_code == 404
