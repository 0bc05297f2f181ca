"""The pieces of the fault and load suite, also used by bench/scale.py: a private Postgres
cluster and Redis (so stopping them disturbs nobody else), the fake upstream and the real
app in production mode with N workers, started as separate processes.

Nothing here knows about pytest, so a benchmark can use it too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from tests.integration.fake_stripe import FakeStripe
from tests.servers import serve_asgi

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path(os.environ.get("AICREDITS_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT = 180.0

# One model whose prompt is free and whose every output token costs one credit, with an
# output cap equal to the fake's reply: the worst case reserved is exactly what a completed
# call costs (40 credits), and a reply cut after n tokens costs exactly n.
REPLY_TOKENS = 40
CALL_COST = REPLY_TOKENS
MODEL = "demo-model"
MODELS = [
    {
        "id": MODEL,
        "label": "Demo (fake upstream)",
        "input_per_mtok": 0,
        "output_per_mtok": 1_000_000,
        "max_output_tokens": REPLY_TOKENS,
        "context_tokens": 16_384,
    }
]
WEBHOOK_SECRET = "whsec_fake_system_tests_" + "0" * 24
SESSION_SECRET = "fake-system-test-session-secret-" + "0" * 32
PUBLIC_URL = "https://app.example.test"
# Variables of the caller's environment that would change what the app under test does.
_SCRUBBED = (
    "GOOGLE_CLIENT_ID",
    "GOOGLE_CLIENT_SECRET",
    "GITHUB_CLIENT_ID",
    "GITHUB_CLIENT_SECRET",
    "ADMIN_EMAILS",
    "SMTP_HOST",
    "STRIPE_API_BASE",
    "PACKS",
    "REFLEX_HOT_RELOAD_OVERRIDE_PATHS",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Any, *, timeout: float, interval: float = 0.2, what: str = "") -> Any:
    """Poll `check()` until it returns something truthy; return that, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what or check} not true within {timeout:.0f} s")
        time.sleep(interval)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# --- a private Postgres cluster and Redis ---------------------------------------------------


class PrivatePostgres:
    """A throwaway cluster on its own port. Postgres refuses to run as root, so when we are
    root its files belong to the `postgres` user and its commands run as that user."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "pg"
        self.port = free_port()
        self.log = base / "postgres.log"
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_postgres, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                "--no-sync", "-E", "UTF8",
            )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log),
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class PrivateRedis:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=2)

    def start(self) -> None:
        log = (self.base / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.base),
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

        def up() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(self.client().ping())
            return False

        wait_until(up, timeout=20, what="redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


@dataclass
class Services:
    """What the app under test talks to: all private to this run."""

    base: Path
    postgres: PrivatePostgres
    redis: PrivateRedis
    upstream_url: str  # the fake upstream's base, without /v1
    idp_url: str
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # A fake of Stripe's API (tests/integration/fake_stripe.py): the app's daily
    # reconciliation asks it, never api.stripe.com.
    stripe_url: str = ""

    def upstream_stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.upstream_url}/_fake/stats", timeout=10)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def reset_upstream(self) -> None:
        httpx.post(f"{self.upstream_url}/_fake/reset", timeout=10).raise_for_status()


def _python_server(args: list[str], log: Path, ready: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aicredits", *args],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: _answers(ready) or proc.poll() is not None, timeout=60, what=ready)
    except TimeoutError:
        stop_process(proc)
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"{args[0]} exited early:\n{log.read_text()[-3000:]}")
    return proc


@contextlib.contextmanager
def private_services() -> Iterator[Services]:
    """Start Postgres, Redis, the fake upstream, the Dev sign-in issuer and a fake of
    Stripe's API; stop them after."""
    base = Path(tempfile.mkdtemp(prefix="aicredits-system-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    postgres, cache = PrivatePostgres(base), PrivateRedis(base)
    procs: list[subprocess.Popen[bytes]] = []
    stack = contextlib.ExitStack()
    try:
        stripe_url = stack.enter_context(serve_asgi(FakeStripe().app, ready_path="/health"))
        postgres.start()
        cache.start()
        upstream_port, idp_port = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        upstream_args = ["fake-upstream", "--port", str(upstream_port), "--models", MODEL]
        upstream_args += ["--reply-tokens", str(REPLY_TOKENS)]
        procs.append(
            _python_server(upstream_args, base / "upstream.log", f"{upstream_url}/_fake/stats")
        )
        idp_url = f"http://127.0.0.1:{idp_port}"
        procs.append(
            _python_server(
                ["dev-idp", "--port", str(idp_port)],
                base / "idp.log",
                f"{idp_url}/.well-known/openid-configuration",
            )
        )
        yield Services(base, postgres, cache, upstream_url, idp_url, procs, stripe_url)
    finally:
        stack.close()
        for proc in procs:
            stop_process(proc)
        cache.stop()
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            postgres.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


# --- the app in production mode -------------------------------------------------------------


def app_env(services: Services, database_url: str, **overrides: str) -> dict[str, str]:
    """The environment of the app under test (and of anything that must agree with it,
    such as the provisioning subprocess that makes sessions and API keys)."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    js_path = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "js_runtime.py")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.strip()  # fmt: skip
    env.update(
        {
            "PATH": f"{js_path}:{env.get('PATH', '')}" if js_path else env.get("PATH", ""),
            "REFLEX_USE_SYSTEM_BUN": "1",
            "REFLEX_TELEMETRY_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
            "AICREDITS_ENV": "prod",
            "DATABASE_URL": database_url,
            "REDIS_URL": services.redis.url,
            "REFLEX_REDIS_URL": services.redis.url.rsplit("/", 1)[0] + "/1",
            "SESSION_SECRET": SESSION_SECRET,
            "PUBLIC_URL": PUBLIC_URL,
            "API_URL": PUBLIC_URL,
            "OPENAI_API_KEY": "sk-fake-system-tests",
            "OPENAI_BASE_URL": f"{services.upstream_url}/v1",
            "MODELS": json.dumps(MODELS),
            "OIDC_ISSUER": services.idp_url,
            "OIDC_CLIENT_ID": "aicredits-system-tests",
            "OIDC_CLIENT_SECRET": "fake-oidc-secret",
            "STRIPE_SECRET_KEY": "sk_test_fake_system_tests",
            "STRIPE_API_BASE": services.stripe_url,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "FREE_TRIAL_CREDITS": "0",
            # Short leases and sweeps, so a killed worker's holds are settled within seconds
            # of the test killing it (production: 30 s and 5 s).
            "HOLD_LEASE_SECONDS": "4",
            "STREAM_CHECKPOINT_SECONDS": "1",
            "HOLD_SWEEP_INTERVAL_SECONDS": "1",
            "UPSTREAM_MAX_SECONDS": "4",
            "UPSTREAM_RETRIES": "1",
            "JOBS_INTERVAL_SECONDS": "1",
            # Per-minute limits would only add 429s to count; the in-flight cap stays on, so
            # every call still goes through the Redis limiter.
            "RATE_LIMIT_USER_PER_MINUTE": "0",
            "RATE_LIMIT_IP_PER_MINUTE": "0",
            "RATE_LIMIT_CONCURRENT": "4",
        }
    )
    env.update(overrides)
    return env


def prod_command_available() -> bool:
    """Whether the tree at ROOT has `python -m aicredits prod` (an earlier revision run by
    `bench/gateway.py --against` may not); asked once per tree, since it costs a process."""
    return _has_prod_command(ROOT)


@functools.cache
def _has_prod_command(root: Path) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "aicredits", "--help"],
        cwd=root, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return any(line.split()[:1] == ["prod"] for line in result.stdout.splitlines())


# granian.server.common: a worker replaced this recently that exits again is a crash loop,
# and Granian stops the whole server.
GRANIAN_CRASH_LOOP_SECONDS = 5.5


@dataclass
class RunningApp:
    proc: subprocess.Popen[bytes]
    base_url: str
    port: int
    workers: int
    env: dict[str, str]
    log: Path

    @property
    def database_url(self) -> str:
        return self.env["DATABASE_URL"]

    def worker_pids(self) -> list[int]:
        """Processes under the app that listen on its port or serve its connections."""
        return sorted(pid for pid in descendants(self.proc.pid) if _socket_inodes(pid))

    def pid_serving(self, client_port: int) -> int | None:
        """The process holding the server side of the connection from `client_port`."""
        inode = _server_side_inode(self.port, client_port)
        if inode is None:
            return None
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            if inode in _socket_inodes(pid):
                return pid
        return None

    def wait_until_settled_in(self, pid: int) -> None:
        """Wait until worker `pid` is older than Granian's crash-loop window. Granian stops the
        whole server when a worker it replaced less than 5.5 s ago exits again (a crash loop);
        a test that stops a worker must not stop a replacement that young."""
        ticks = os.sysconf("SC_CLK_TCK")
        started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        time.sleep(max(0.0, GRANIAN_CRASH_LOOP_SECONDS + 0.5 - (uptime - started)))

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def log_about(self, request_id: str | None) -> str:
        """The app's log lines that name `request_id` (for an assertion's message: what the
        app said about the call that went wrong); the log's tail when there is no id."""
        if not request_id:
            return "(no request id) log tail:\n" + self.log_tail(2000)
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if request_id in line) or "(no log line)"


def launch_app(env: Mapping[str, str], *, workers: int, log: Path) -> RunningApp:
    """Start the app in production mode, backend only, with `workers` workers, the way
    `make prod` does (the command migrates first); return once /healthz answers."""
    port = free_port()
    env = {**env, "GRANIAN_WORKERS": str(workers)}
    if prod_command_available():
        command = [
            sys.executable, "-m", "aicredits", "prod", "--backend-only",
            "--workers", str(workers), "--backend-port", str(port),
        ]  # fmt: skip
    else:
        subprocess.run(
            [sys.executable, "-m", "aicredits", "migrate"],
            cwd=ROOT, env=env, check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        command = [
            sys.executable, "-m", "reflex", "run", "--env", "prod", "--backend-only",
            "--backend-port", str(port),
        ]  # fmt: skip
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    app = RunningApp(proc, f"http://127.0.0.1:{port}", port, workers, dict(env), log)
    try:
        wait_until(
            lambda: proc.poll() is not None or _answers(f"{app.base_url}/healthz"),
            timeout=START_TIMEOUT,
            interval=0.5,
            what="the app's /healthz",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited early:\n{app.log_tail()}")
        # Every worker must be up, not only the first to answer.
        wait_until(lambda: len(app.worker_pids()) >= workers, timeout=60, what="all workers")
    except BaseException:
        stop_process(proc)
        raise
    return app


@contextlib.contextmanager
def running_app(env: Mapping[str, str], *, workers: int, log: Path) -> Iterator[RunningApp]:
    app = launch_app(env, workers=workers, log=log)
    try:
        yield app
    finally:
        stop_process(app.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started in its own session, and everything it started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- processes and sockets, from /proc ------------------------------------------------------


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    return inodes


def _server_side_inode(server_port: int, client_port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                local, remote, inode = parts[1], parts[2], parts[9]
                if (
                    int(local.rsplit(":", 1)[1], 16) == server_port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port
                    and inode != "0"
                ):
                    return inode
    return None


# --- users, keys and sessions, made the way the app makes them -------------------------------


@dataclass(frozen=True)
class Account:
    user_id: int
    email: str
    api_key: str
    session: str  # the session token; the cookie's name depends on PUBLIC_URL
    credits: int


def provision(env: Mapping[str, str], credits: list[int], *, label: str) -> list[Account]:
    """Users with these balances, each with an API key and a session, made through the
    services in a subprocess with the app's own environment, so token hashing agrees with
    the app's whatever secret it uses."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.system.provision", label, json.dumps(credits)],
        cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"provisioning failed:\n{result.stderr[-3000:]}")
    return [Account(**row) for row in json.loads(result.stdout)]
