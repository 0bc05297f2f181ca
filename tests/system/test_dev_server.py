"""`make run`'s server stays up while it is used, and reloads only for a source edit, paying a
reply cut by that reload exactly.

The dev launcher is started as `make run` starts it (`python -m aicredits migrate`, then
`python -m aicredits dev`, which starts its own Dev sign-in provider and fake upstream), on a
database and ports of its own. Then, in Chromium: 11 s idle, a Dev sign-in, 5 chat turns, an
API key created and its secret shown, an admin adjustment. The backend worker must be the
same process throughout, and the log must show no reload. Finally a source file is written
in the middle of a slow reply: the backend reloads once, and the reply is cut and charged
exactly its delivered tokens.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from playwright.sync_api import Browser, Page, expect, sync_playwright

from aicredits.adapters.db import Database
from aicredits.adapters.tables import chat_messages, holds, usage_events
from aicredits.adapters.tokenizer import count_text_tokens
from aicredits.services.verify import verify_ledger
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, RunningApp, sign_in
from tests.system.harness import ROOT, descendants, free_port, stop_process, wait_until
from tests.system.harness import _socket_inodes as socket_inodes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Lines the dev server writes when its backend restarts (Granian's reloader and supervisor).
RESTART_LINES = re.compile(r"Changes detected|reloading workers|Killing worker|Respawning")
ADMIN = "admin@example.test"
USER = "alice@example.test"


@dataclass
class DevServer:
    proc: subprocess.Popen[bytes]
    app: RunningApp
    backend_port: int

    def log(self) -> str:
        return self.app.log.read_text(errors="replace")

    def restart_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if RESTART_LINES.search(line)]

    def backend_workers(self) -> set[int]:
        """The processes serving the backend: they hold its listening socket, and none of
        their children does (that is Granian's supervisor, which binds it)."""
        inode = _listening_inode(self.backend_port)
        holders = {pid for pid in descendants(self.proc.pid) if inode in socket_inodes(pid)}
        return {pid for pid in holders if not holders & set(descendants(pid))}


def _listening_inode(port: int) -> str:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                return parts[9]
    raise AssertionError(f"nothing listens on port {port}")


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    work = tmp_path_factory.mktemp("dev-server")
    frontend_port, backend_port = free_port(), free_port()
    idp, upstream = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    js_path = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "js_runtime.py")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.strip()  # fmt: skip
    env = {
        key: value
        for key, value in os.environ.items()
        # Whatever the caller configured: `make run` on a fresh machine has none of it.
        if not key.startswith(("REFLEX_HOT_RELOAD", "GOOGLE_", "GITHUB_", "OIDC_", "STRIPE_"))
        and key not in ("OPENAI_API_KEY", "REDIS_URL", "ADMIN_EMAILS", "AICREDITS_ENV")
    }
    env.update(
        {
            # As the Makefile runs it.
            "PATH": f"{js_path}:{env['PATH']}" if js_path else env["PATH"],
            "REFLEX_USE_SYSTEM_BUN": "1",
            "REFLEX_TELEMETRY_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
            # Where, not how: its own database, and free ports for the app and for the
            # stand-ins the launcher starts (it starts them on the ports these URLs name).
            "DATABASE_URL": f"sqlite:///{work / 'dev.db'}",
            "PUBLIC_URL": f"http://localhost:{frontend_port}",
            "API_URL": f"http://localhost:{backend_port}",
            "DEV_OIDC_ISSUER": idp,
            "OPENAI_BASE_URL": f"{upstream}/v1",
        }
    )
    subprocess.run(
        [sys.executable, "-m", "aicredits", "migrate"],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    log = work / "dev.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "aicredits", "dev",
                "--frontend-port", str(frontend_port), "--backend-port", str(backend_port),
            ],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    app = RunningApp(
        frontend=env["PUBLIC_URL"],
        backend=env["API_URL"],
        database_url=env["DATABASE_URL"],
        idp=idp,
        upstream=upstream,
        log=log,
    )
    server = DevServer(proc, app, backend_port)
    try:
        for url in (f"{app.backend}/ping", app.frontend + "/"):
            wait_until(
                lambda url=url: proc.poll() is not None or _answers(url),
                timeout=420,
                interval=1,
                what=url,
            )
            assert proc.poll() is None, f"the dev server exited:\n{server.log()[-3000:]}"
        wait_until(server.backend_workers, timeout=30, what="the backend worker")
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a developer stops it
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        stop_process(proc)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def send(page: Page, text: str) -> None:
    page.locator("#chat-input").fill(text)
    page.locator("#chat-input").press("Enter")


def test_the_dev_server_does_not_restart_while_it_is_used(
    dev_server: DevServer, browser: Browser
) -> None:
    app = dev_server.app
    (worker,) = dev_server.backend_workers()
    # Idle through two runs of the 5-second jobs (the sweeper, auto top-up); they keep
    # running through the 20 s or so of use below.
    time.sleep(11)
    assert dev_server.backend_workers() == {worker}

    context = browser.new_context()
    context.set_default_timeout(60_000)
    page = context.new_page()
    sign_in(page, app, USER)
    for n in range(1, 6):
        send(page, f"Question number {n}")
        expect(page.locator(".reply-cost")).to_have_count(n)
        expect(page.locator(".message-assistant").nth(n - 1)).to_contain_text("lorem")
    expect(page.locator("#conversation-list")).to_contain_text("Question number 1")

    page.goto(app.frontend + "/keys")
    page.locator("#key-name-input").fill("laptop")
    page.locator("#create-key").click()
    expect(page.locator("#new-key-secret")).to_contain_text("aic_")

    admin = browser.new_context()
    admin.set_default_timeout(60_000)
    console = admin.new_page()
    sign_in(console, app, ADMIN, start="/admin/users")
    console.locator("#admin-user-search").fill(USER)
    console.locator("#admin-user-search-submit").click()
    console.get_by_role("link", name=USER).click()
    console.wait_for_url("**/admin/user?id=*")
    console.locator("#adjust-credits").fill("250")
    console.locator("#adjust-reason").fill("Thanks for testing")
    console.locator("#adjust-submit").click()
    expect(console.locator("#admin-notice")).to_contain_text("Done")
    expect(console.locator("#admin-ledger")).to_contain_text("Thanks for testing")
    admin.close()
    context.close()

    assert dev_server.restart_lines() == []
    assert dev_server.backend_workers() == {worker}, "the backend restarted"
    db = Database(app.database_url)
    try:
        assert verify_ledger(db) == []
    finally:
        db.dispose()


def test_a_source_edit_reloads_once_and_a_reply_it_cuts_is_paid_exactly(
    dev_server: DevServer, browser: Browser
) -> None:
    app = dev_server.app
    (worker,) = dev_server.backend_workers()
    context = browser.new_context()
    context.set_default_timeout(60_000)
    page = context.new_page()
    sign_in(page, app, USER)
    page.locator("#new-chat").click()
    expect(page.locator("#empty-chat")).to_be_visible()
    send(page, "A long story, slowly [fake tokens-per-second=8] [fake reply-tokens=400]")
    reply = page.locator(".message-assistant").last
    expect(reply).to_contain_text("dolor")

    # A developer saves a file.
    source = ROOT / "aicredits" / "pages" / "__init__.py"
    source.write_bytes(source.read_bytes())

    expect(page.locator(".reply-note").last).to_contain_text("server restart", timeout=90_000)
    wait_until(
        lambda: (workers := dev_server.backend_workers()) and worker not in workers,
        timeout=120,
        what="a new backend worker",
    )
    assert len(dev_server.backend_workers()) == 1

    db = Database(app.database_url)
    try:
        with db.read() as conn:
            message = conn.execute(
                sa.select(chat_messages).order_by(chat_messages.c.id.desc()).limit(1)
            ).one()
            event = conn.execute(
                sa.select(usage_events).where(usage_events.c.request_id == message.request_id)
            ).one()
            pending = conn.execute(
                sa.select(sa.func.count()).select_from(holds).where(holds.c.status == "pending")
            ).scalar_one()
        assert message.outcome == event.outcome == "interrupted"
        # Paid exactly what was delivered: the tokens of the text shown and kept.
        delivered = count_text_tokens(message.content)
        assert 0 < delivered < 400
        assert event.output_tokens == message.output_tokens == delivered
        assert message.credits_charged == event.charged > 0
        assert pending == 0
        assert verify_ledger(db) == []
    finally:
        db.dispose()

    # The page carries on with the new worker.
    expect(page.locator(".reply-cost").last).to_contain_text(f"{delivered} out")
    send(page, "Still there?")
    expect(page.locator(".message-user").last).to_have_text("Still there?")
    expect(page.locator(".reply-cost")).to_have_count(2, timeout=90_000)
    context.close()
