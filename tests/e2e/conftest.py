"""Start the real app as `make run` does (`python -m aicredits migrate`, then the dev launcher
`python -m aicredits dev`) and drive it with Debian's Chromium."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import werkzeug.serving
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from aicredits.adapters.db import Database
from aicredits.devtools import dev_idp
from aicredits.devtools.fake_upstream import FakeUpstreamConfig
from aicredits.devtools.fake_upstream import build_app as build_fake_upstream
from tests.servers import serve_asgi

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("AICREDITS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
START_TIMEOUT = 420
# CI machines have two cores shared with Postgres, Redis, the app and Chromium.
expect.set_options(timeout=15_000)
TRIAL_CREDITS = 1000


@dataclass(frozen=True)
class RunningApp:
    frontend: str
    backend: str
    database_url: str
    idp: str
    upstream: str
    log: Path

    def db(self) -> Database:
        return Database(self.database_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited early:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (local URL)
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer in time:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def idp() -> Iterator[str]:
    """The Dev sign-in provider as `make run` serves it (oidc-provider-mock with our pages),
    with the same test users."""
    server = werkzeug.serving.make_server("127.0.0.1", 0, dev_idp.build_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def upstream() -> Iterator[str]:
    """The fake OpenAI-compatible upstream the app's model calls go to (its base URL)."""
    app = build_fake_upstream(FakeUpstreamConfig(models=["demo-model"], reply_tokens=40))
    with serve_asgi(app, ready_path="/_fake/stats") as base:
        yield base


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory, idp: str, upstream: str) -> Iterator[RunningApp]:
    work = tmp_path_factory.mktemp("app")
    database_url = f"sqlite:///{work / 'e2e.db'}"
    frontend_port, backend_port = free_port(), free_port()
    frontend = f"http://localhost:{frontend_port}"
    backend = f"http://localhost:{backend_port}"
    env = {
        **os.environ,
        # Where, not how: a database of its own, free ports (so a developer's `make run` can
        # keep running), and the stand-ins this session started (the launcher starts its own
        # only when none answers at the configured address).
        "DATABASE_URL": database_url,
        "PUBLIC_URL": frontend,
        "API_URL": backend,
        "DEV_OIDC_ISSUER": idp,
        "OPENAI_BASE_URL": f"{upstream}/v1",
        # The launcher's own defaults, spelled out because the tests rely on them.
        "ADMIN_EMAILS": "admin@example.test",
        "FREE_TRIAL_CREDITS": str(TRIAL_CREDITS),
        "REFLEX_USE_SYSTEM_BUN": "1",
        "REFLEX_TELEMETRY_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    for key in (
        "GOOGLE_CLIENT_ID",
        "GITHUB_CLIENT_ID",
        "OIDC_ISSUER",
        "OPENAI_API_KEY",
        "REDIS_URL",
        # The launcher sets which files hot reload watches; a caller's value would change it.
        "REFLEX_HOT_RELOAD_OVERRIDE_PATHS",
    ):
        env.pop(key, None)  # Dev sign-in is what the browser tests use
    subprocess.run(
        [sys.executable, "-m", "aicredits", "migrate"], cwd=ROOT, env=env, check=True, timeout=120
    )
    log = work / "reflex.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "aicredits", "dev", "--loglevel", "info",
                "--frontend-port", str(frontend_port), "--backend-port", str(backend_port),
            ],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    running = RunningApp(
        frontend=frontend,
        backend=backend,
        database_url=database_url,
        idp=idp,
        upstream=upstream,
        log=log,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        wait_for(f"{running.backend}/ping", proc, log, deadline)
        wait_for(running.frontend + "/", proc, log, deadline)
        yield running
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process and everything it started (Reflex runs node and bun)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium", pytrace=False)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile: no cookies from other tests."""
    ctx = browser.new_context()
    ctx.set_default_timeout(60_000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def sign_in(page: Page, app: RunningApp, email: str, start: str = "/chat") -> None:
    """Sign in through Dev sign-in (the real OpenID provider), starting at `start`."""
    page.goto(app.frontend + start)
    page.wait_for_url(f"**/login?next={start}")
    page.get_by_role("button", name="Sign in with Dev sign-in").click()
    page.wait_for_url("**/oauth2/authorize**")
    page.get_by_role("textbox", name="Email").fill(email)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(app.frontend + start)
    expect(page.locator("#header-balance")).to_be_visible()
