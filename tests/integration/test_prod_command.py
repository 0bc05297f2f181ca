"""`check-config` and `prod` as an operator runs them: refusals with exit 2, and a real
production backend with several workers on Postgres and Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Every variable production checks, so the caller's own environment changes nothing.
PROD_ENV = {
    "SESSION_SECRET": "fake-session-secret-for-tests-" + "0" * 34,
    "OIDC_ISSUER": "https://idp.example.test",
    "OIDC_CLIENT_ID": "aicredits-tests",
    "OIDC_CLIENT_SECRET": "fake-oidc-secret",
    "OPENAI_API_KEY": "sk-fake-tests",
    "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
    "STRIPE_SECRET_KEY": "sk_test_fake_tests",
    "STRIPE_WEBHOOK_SECRET": "whsec_fake_tests",
    "PUBLIC_URL": "https://app.example.test",
    "API_URL": "",
    "ALLOW_SQLITE_IN_PROD": "false",
    "GOOGLE_CLIENT_ID": "",
    "GITHUB_CLIENT_ID": "",
    "REFLEX_REDIS_URL": "",
    "GRANIAN_WORKERS": "",
}


def _env(**values: str) -> dict[str, str]:
    env = {**os.environ, **PROD_ENV, **values}
    return {k: v for k, v in env.items() if v != ""}


def _aicredits(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aicredits", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_check_config_passes_a_production_configuration(pg_url: str, redis_url: str) -> None:
    result = _aicredits("check-config", env=_env(DATABASE_URL=pg_url, REDIS_URL=redis_url))
    assert result.returncode == 0, result.stderr
    assert "ready for production" in result.stdout


def test_check_config_names_each_problem_and_exits_2(pg_url: str) -> None:
    env = _env(DATABASE_URL=pg_url, STRIPE_WEBHOOK_SECRET="", SESSION_SECRET="")
    env.pop("REDIS_URL", None)
    result = _aicredits("check-config", env=env)
    assert result.returncode == 2
    for variable in ("STRIPE_WEBHOOK_SECRET", "SESSION_SECRET", "REDIS_URL"):
        assert variable in result.stderr
    assert "3 problem(s)" in result.stderr


def test_prod_refuses_sqlite_before_migrating_or_starting(tmp_path: Path, redis_url: str) -> None:
    database = tmp_path / "never.db"
    result = _aicredits(
        "prod", "--backend-only", "--workers", "2",
        env=_env(DATABASE_URL=f"sqlite:///{database}", REDIS_URL=redis_url),
    )  # fmt: skip
    assert result.returncode == 2
    assert "DATABASE_URL is SQLite" in result.stderr
    assert not database.exists()  # nothing was migrated


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


@pytest.mark.slow
def test_prod_backend_only_serves_with_several_workers(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = _free_port()
    log = tmp_path / "prod.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "aicredits", "prod", "--backend-only",
                "--workers", "2", "--backend-port", str(port), "--host", "127.0.0.1",
            ],
            cwd=ROOT, env=_env(DATABASE_URL=pg_url, REDIS_URL=redis_url),
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=5)
                if ready.status_code == 200 and len(_children(proc.pid)) >= 2:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert ready is not None and ready.status_code == 200, log.read_text()[-3000:]
        assert ready.json()["checks"] == {"database": "ok", "redis": "ok"}
        assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
        # exec: the launcher's pid is Reflex's, and Granian runs two workers under it.
        assert len(_children(proc.pid)) >= 2
        assert "database at head (postgresql)" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
