"""Which ports `make run` asks Reflex for, and what it says when one is taken (the launcher's
port logic, with what listens on this machine made up)."""

from __future__ import annotations

import pytest

from aicredits.devtools import launcher
from aicredits.settings import Settings


def settings(**values: str) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.fixture
def listening(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    ports: set[int] = set()
    monkeypatch.setattr(launcher, "in_use", lambda port: port in ports)
    return ports


def test_reflex_serves_where_public_url_and_api_url_point(listening: set[int]) -> None:
    assert launcher.app_ports(settings(), []) == [
        "--frontend-port",
        "3000",
        "--backend-port",
        "8000",
    ]
    moved = settings(public_url="http://localhost:3100", api_url="http://127.0.0.1:8100")
    assert launcher.app_ports(moved, ["--loglevel", "info"]) == [
        "--loglevel", "info", "--frontend-port", "3100", "--backend-port", "8100",
    ]  # fmt: skip


def test_ports_given_on_the_command_line_are_kept(listening: set[int]) -> None:
    argv = ["--frontend-port", "4000", "--backend-port=4001"]
    assert launcher.app_ports(settings(), argv) == argv


def test_a_port_that_is_not_a_number_is_said_so(listening: set[int]) -> None:
    with pytest.raises(SystemExit, match=r"--frontend-port takes a port number, not 'abc'"):
        launcher.app_ports(settings(), ["--frontend-port", "abc"])


def test_an_address_elsewhere_names_no_port_here(listening: set[int]) -> None:
    tunnel = settings(public_url="https://chat.example.com", api_url="https://api.example.com")
    assert launcher.app_ports(tunnel, []) == []
    assert launcher.app_ports(settings(), ["--backend-only"]) == [
        "--backend-only", "--backend-port", "8000",
    ]  # fmt: skip


def test_a_taken_port_stops_the_start_with_what_to_do(listening: set[int]) -> None:
    listening.update({3000, 3100})
    with pytest.raises(launcher.PortTaken) as stopped:
        launcher.app_ports(settings(), [])
    assert stopped.value.code == (
        "aicredits: port 3000 is already in use (PUBLIC_URL is http://localhost:3000).\n"
        "  Is `make run` already running in another terminal? Stop that one first "
        "(Ctrl-C there),\n  or start this one on free ports:\n"
        "    PUBLIC_URL=http://localhost:3200 API_URL=http://localhost:8100 make run"
    )
    listening.add(8000)
    with pytest.raises(launcher.PortTaken, match=r"ports 3000 and 8000 are already in use"):
        launcher.app_ports(settings(), [])


def test_a_stand_ins_port_taken_by_something_else_names_the_setting(
    listening: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "_answers", lambda url: False)
    listening.add(9400)
    with pytest.raises(launcher.PortTaken) as stopped:
        launcher.start_stand_ins(settings())
    assert stopped.value.code == (
        "aicredits: port 9400 is in use by something that is not the Dev sign-in provider.\n"
        "  Stop it, or move the Dev sign-in provider to a free port: "
        "DEV_OIDC_ISSUER=http://127.0.0.1:9401 make run"
    )


def test_the_placeholders_of_env_example_stop_make_run_with_what_to_do() -> None:
    """`cp .env.example .env` before `make run` (a common habit) gave an app whose sign-in
    was refused (PUBLIC_URL https://credits.example.com) and whose every call went to OpenAI
    and Stripe with keys that are not keys."""
    copied = settings(
        public_url="https://credits.example.com",
        openai_api_key="replace-with-your-provider-key",
        stripe_secret_key="replace-with-sk_live-or-sk_test-key",
    )
    message = launcher.copied_example(copied)
    assert message is not None
    assert message.startswith(
        "aicredits: PUBLIC_URL, OPENAI_API_KEY, STRIPE_SECRET_KEY still hold the placeholders "
        "of .env.example\n"
    )
    assert "delete .env" in message and "docs/deployment.md" in message


def test_real_values_and_the_embedded_defaults_are_not_placeholders() -> None:
    assert launcher.copied_example(settings()) is None
    tunnel = settings(public_url="https://dev-box.example.org", openai_api_key="sk-real")
    assert launcher.copied_example(tunnel) is None
