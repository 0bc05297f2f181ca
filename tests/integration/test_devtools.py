"""The development commands `make run` relies on: they start and answer."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aicredits.devtools import launcher
from aicredits.settings import Settings
from tests.e2e.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_for_json(url: str, seconds: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                data: dict[str, object] = response.json()
                return data
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer in {seconds}s")
        time.sleep(0.2)


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    launcher.stop(procs)


def test_the_launcher_starts_dev_sign_in_and_the_fake_upstream(
    running: list[subprocess.Popen[bytes]],
) -> None:
    issuer = f"http://127.0.0.1:{free_port()}"
    upstream = f"http://127.0.0.1:{free_port()}/v1"
    settings = Settings(
        _env_file=None, dev_oidc_issuer=issuer, openai_base_url=upstream, admin_emails=[]
    )
    procs, env = launcher.start_stand_ins(settings)
    running.extend(procs)
    assert len(procs) == 2
    discovery = wait_for_json(f"{issuer}/.well-known/openid-configuration")
    assert discovery["issuer"] == issuer
    models = wait_for_json(f"{upstream}/models")
    data = models["data"]
    # The chat model and the embedding model, so `make run` serves /v1/embeddings too.
    assert isinstance(data, list) and [m["id"] for m in data] == ["demo-model", "demo-embedding"]
    assert env == {"ADMIN_EMAILS": launcher.DEV_ADMIN}


# The launcher's own main(), with Reflex replaced by a child that only waits, and no stand-ins.
LAUNCHER_WITH_A_WAITING_CHILD = textwrap.dedent(
    """
    import sys
    from aicredits.devtools import launcher

    child = "import os, time; print('child', os.getpid(), flush=True); time.sleep(120)"
    launcher.start_stand_ins = lambda settings: ([], {})
    launcher.reflex_command = lambda argv: [sys.executable, "-c", child]
    raise SystemExit(launcher.main([]))
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_launcher_stops_its_children_at_once_on_a_stop_signal(signum: int) -> None:
    """`kill` (or a process manager) and Ctrl-C stop `make run` in moments: a SIGTERM used to
    wait 10 s for the child whose wait it had interrupted."""
    # On free ports: the launcher refuses to start where something listens already.
    ports = {
        "PUBLIC_URL": f"http://localhost:{free_port()}",
        "API_URL": f"http://localhost:{free_port()}",
    }
    launched = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER_WITH_A_WAITING_CHILD],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **ports},
    )  # fmt: skip
    try:
        assert launched.stdout is not None
        child = 0
        for line in launched.stdout:
            if line.startswith("child "):
                child = int(line.split()[1])
                break
        assert child, "the child never started"
        began = time.monotonic()
        launched.send_signal(signum)  # the launcher alone, as `kill <pid>` does
        code = launched.wait(timeout=30)
        took = time.monotonic() - began
        assert code == 128 + signum if signum == signal.SIGTERM else code == 130
        assert took < 5, f"the launcher took {took:.1f} s to stop"
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # stopped with it, not left behind
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
            launched.wait()


def test_the_launcher_starts_nothing_when_real_services_are_configured() -> None:
    settings = Settings(
        _env_file=None,
        github_client_id="id",
        github_client_secret="secret",
        openai_api_key="sk-test",
    )
    assert launcher.start_stand_ins(settings) == ([], {})


@pytest.mark.parametrize(
    ("command", "path"),
    [("dev-idp", "/.well-known/openid-configuration"), ("fake-upstream", "/v1/models")],
)
def test_the_dev_servers_run_from_the_command_line(
    running: list[subprocess.Popen[bytes]], command: str, path: str
) -> None:
    port = free_port()
    running.append(
        subprocess.Popen(
            [sys.executable, "-m", "aicredits", command, "--port", str(port)], cwd=ROOT
        )
    )
    assert wait_for_json(f"http://127.0.0.1:{port}{path}")


def test_the_dev_sign_in_page_asks_for_an_email_and_loads_nothing_from_elsewhere() -> None:
    from flask.testing import FlaskClient

    from aicredits.devtools import dev_idp

    client: FlaskClient = dev_idp.build_app().test_client()
    page = client.get(
        "/oauth2/authorize",
        query_string={
            "response_type": "code",
            "client_id": "aicredits-dev",
            "redirect_uri": "http://localhost:8000/auth/callback/dev",
            "scope": "openid email",
            "nonce": "n",
            "state": "s",
        },
    )
    html = page.get_data(as_text=True)
    assert page.status_code == 200, html
    assert '<label for="dev-email">Email</label>' in html
    assert 'type="email" name="sub"' in html
    assert "alice@example.test" in html  # the test users, one press each
    # Every stylesheet, script and icon is inline: nothing comes from a CDN, or from anywhere
    # (the browser does not even ask this provider for /favicon.ico).
    links = re.findall(r"<link[^>]*>", html)
    assert links == [links[0]] and 'rel="icon" href="data:' in links[0], links
    assert "src=" not in html
    assert "cdn." not in html and "jsdelivr" not in html


def test_make_run_where_a_port_is_taken_says_so_and_starts_nothing() -> None:
    """A second `make run`, or another program on the app's port: Reflex would move to the
    next free port (3001), where sign-in and the websocket cannot work, and the stand-ins
    would start. Instead the launcher says which port and what to do, and exits 1 at once."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    issuer_port, upstream_port = free_port(), free_port()
    env = {
        **os.environ,
        "PUBLIC_URL": f"http://localhost:{port}",
        "API_URL": f"http://localhost:{free_port()}",
        "DEV_OIDC_ISSUER": f"http://127.0.0.1:{issuer_port}",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        # Not the checkout's .data: the launcher must stop before it opens any database.
        "DATABASE_URL": "sqlite:///:memory:",
    }
    for name in ("OPENAI_API_KEY", "GITHUB_CLIENT_ID", "GOOGLE_CLIENT_ID", "OIDC_ISSUER"):
        env.pop(name, None)
    try:
        began = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "aicredits", "dev"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        taken.close()
    assert result.returncode == 1, result
    assert time.monotonic() - began < 20
    assert f"port {port} is already in use" in result.stderr
    assert "PUBLIC_URL=http://localhost:" in result.stderr and "make run" in result.stderr
    assert not launcher.in_use(issuer_port) and not launcher.in_use(upstream_port)
    assert "Starting Reflex App" not in result.stdout + result.stderr


def test_make_run_with_the_placeholders_of_env_example_says_so_and_starts_nothing() -> None:
    issuer_port, upstream_port = free_port(), free_port()
    env = {
        **os.environ,
        "PUBLIC_URL": "https://credits.example.com",
        "SESSION_SECRET": "replace-with-output-of-openssl-rand-hex-32",
        "DEV_OIDC_ISSUER": f"http://127.0.0.1:{issuer_port}",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        # Not the checkout's .data: the launcher must stop before it opens any database.
        "DATABASE_URL": "sqlite:///:memory:",
    }
    result = subprocess.run(
        [sys.executable, "-m", "aicredits", "dev"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result
    assert result.stderr.startswith(
        "aicredits: PUBLIC_URL, SESSION_SECRET still hold the placeholders of .env.example"
    ), result.stderr
    assert not launcher.in_use(issuer_port) and not launcher.in_use(upstream_port)
