"""The chat client's proxy: HTTP_PROXY, HTTPS_PROXY and NO_PROXY, read once, as the SDK and
httpx honour them (aiohttp's own trust_env would read them again on every call)."""

from __future__ import annotations

import pytest

from aicredits.adapters.upstream import env_proxy

OPENAI = "https://api.openai.com/v1/chat/completions"


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_no_proxy_configured_means_a_direct_connection() -> None:
    assert env_proxy(OPENAI) is None


def test_the_proxy_of_the_upstreams_scheme_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain.internal:3128")
    assert env_proxy(OPENAI) == "http://proxy.internal:3128"
    assert env_proxy("http://vllm.internal:8000/v1/chat/completions") == (
        "http://plain.internal:3128"
    )


def test_no_proxy_exempts_its_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.openai.com")
    assert env_proxy(OPENAI) is None
    assert env_proxy("https://example.com/v1/chat/completions") == "http://proxy.internal:3128"
