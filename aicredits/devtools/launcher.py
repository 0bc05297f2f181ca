"""`python -m aicredits dev`: the app with its embedded stand-ins, as `make run` starts it.

Starts, when they are needed and not already running, the local OpenID provider (Dev
sign-in, when no real provider is configured) and the fake OpenAI-compatible upstream (when
there is no OPENAI_API_KEY), then `reflex run`; stops them all when Reflex stops or on Ctrl-C.

Hot reload watches the source only (WATCHED): left to itself, Reflex watches every folder at
the project root, so each write the app makes there (SQLite's -wal and -shm files among them)
restarted the backend and cut every reply in flight. The tests start the app through here too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from aicredits.devtools.dev_idp import DEV_USERS
from aicredits.services import auth, production
from aicredits.settings import Settings, get_settings

DEV_ADMIN = "admin@example.test"
# What a change to restarts the backend: the app's code, its assets and Reflex's config.
# Nothing the app writes lives there (its database and secrets are in .data/).
ROOT = Path(__file__).resolve().parents[2]
WATCHED = ("aicredits", "assets", "rxconfig.py")
RELOAD_PATHS = "REFLEX_HOT_RELOAD_OVERRIDE_PATHS"


def reload_paths(root: Path = ROOT) -> str:
    """The value for Reflex's reload paths: the source folders and files, absolute."""
    return os.pathsep.join(str(root / name) for name in WATCHED if (root / name).exists())


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - local URL
            return bool(response.status == 200)
    except OSError:
        return False


def _wait_for(url: str, proc: subprocess.Popen[bytes], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _answers(url):
            return
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited early (code {proc.returncode})")
        time.sleep(0.2)
    raise SystemExit(f"{what} did not answer at {url} within {seconds:.0f}s")


def in_use(port: int) -> bool:
    """Whether something on this machine listens on `port` (IPv4 or IPv6)."""
    for host in ("127.0.0.1", "::1"):
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            continue
    return False


class PortTaken(SystemExit):
    """A port the app or a stand-in needs is taken: its message is printed, exit status 1."""


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _local_port(url: str) -> int | None:
    parts = urlsplit(url)
    return parts.port if parts.hostname in LOCAL_HOSTS else None


def _option(argv: Sequence[str], name: str) -> int | None:
    for index, arg in enumerate(argv):
        value = None
        if arg == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        if value is not None:
            if not value.isdigit():
                raise SystemExit(f"aicredits: {name} takes a port number, not {value!r}.")
            return int(value)
    return None


def _free_near(port: int, step: int = 100) -> int:
    """A port to suggest instead of `port`: the first free one of port + step, + 2 step..."""
    return next(
        (p for p in range(port + step, port + 10 * step, step) if not in_use(p)), port + step
    )


def app_ports(settings: Settings, argv: Sequence[str]) -> list[str]:
    """`argv` for `reflex run` with the ports PUBLIC_URL and API_URL name (on this machine),
    so Reflex serves where the app's links, sign-in redirects and allowed origins point. Left
    to itself, Reflex moves to the next free port when one is taken (3001, 8001), where sign-in
    and the websocket cannot work. Raises PortTaken when a port is in use."""
    argv = list(argv)
    wanted = []
    if "--backend-only" not in argv:
        wanted.append(("--frontend-port", "PUBLIC_URL", settings.public_url))
    if "--frontend-only" not in argv:
        wanted.append(("--backend-port", "API_URL", settings.api_url))
    taken = []
    for option, name, url in wanted:
        port = _option(argv, option)
        if port is None:
            port = _local_port(url)
            if port is None:
                continue
            argv += [option, str(port)]
        if in_use(port):
            taken.append((port, name, url))
    if taken:
        ports = " and ".join(str(port) for port, _, _ in taken)
        ports = f"ports {ports} are" if len(taken) > 1 else f"port {ports} is"
        named = "; ".join(f"{name} is {url}" for _, name, url in taken)
        frontend = _local_port(settings.public_url) or 3000
        backend = _local_port(settings.api_url) or 8000
        raise PortTaken(
            f"aicredits: {ports} already in use ({named}).\n"
            "  Is `make run` already running in another terminal? Stop that one first "
            "(Ctrl-C there),\n  or start this one on free ports:\n"
            f"    PUBLIC_URL=http://localhost:{_free_near(frontend)} "
            f"API_URL=http://localhost:{_free_near(backend)} make run"
        )
    return argv


def _stand_in_port_taken(port: int, what: str, setting: str, example: str) -> PortTaken:
    return PortTaken(
        f"aicredits: port {port} is in use by something that is not {what}.\n"
        f"  Stop it, or move {what} to a free port: {setting}={example} make run"
    )


def copied_example(settings: Settings) -> str | None:
    """What to say when .env.example was copied to .env for `make run`: its values are
    placeholders for a production server (an example.com address, "replace-with..." keys),
    with which sign-in is refused (the page's origin is not PUBLIC_URL's) and every call goes
    to OpenAI and Stripe with a key that is not one. None when there are none."""
    names = production.placeholder_names(settings)
    host = (urlsplit(settings.public_url).hostname or "").lower()
    if host == "example.com" or host.endswith(".example.com"):
        names.insert(0, "PUBLIC_URL")
    if not names:
        return None
    return (
        f"aicredits: {', '.join(names)} still hold the placeholders of .env.example\n"
        "  (from .env or the environment). `make run` needs none of them: delete .env (or\n"
        "  those lines) to use the embedded defaults (Dev sign-in, the fake model, the\n"
        "  simulated checkout), or set real values. .env.example is for a production server\n"
        "  (docs/deployment.md)."
    )


def start_stand_ins(settings: Settings) -> tuple[list[subprocess.Popen[bytes]], dict[str, str]]:
    """Start what the embedded defaults need. Returns the processes and env additions."""
    procs: list[subprocess.Popen[bytes]] = []
    env: dict[str, str] = {}
    if auth.dev_sign_in(settings):
        discovery = settings.dev_oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
        if not _answers(discovery):
            port = urlsplit(settings.dev_oidc_issuer).port or 9400
            if in_use(port):
                free = _free_near(port, step=1)
                raise _stand_in_port_taken(
                    port, "the Dev sign-in provider", "DEV_OIDC_ISSUER", f"http://127.0.0.1:{free}"
                )
            proc = subprocess.Popen(
                [sys.executable, "-m", "aicredits", "dev-idp", "--port", str(port)]
            )
            procs.append(proc)
            _wait_for(discovery, proc, "the dev sign-in provider")
        if not settings.admin_emails:
            env["ADMIN_EMAILS"] = DEV_ADMIN
    if settings.uses_fake_upstream:
        models_url = settings.upstream_base_url + "/models"
        if not _answers(models_url):
            port = urlsplit(settings.upstream_base_url).port or 9500
            if in_use(port):
                free = _free_near(port, step=1)
                stop(procs)  # the sign-in provider, just started
                raise _stand_in_port_taken(
                    port, "the fake upstream", "OPENAI_BASE_URL", f"http://127.0.0.1:{free}/v1"
                )
            models = ",".join(m.upstream_model for m in settings.priced_models)
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "aicredits", "fake-upstream",
                    "--port", str(port), "--models", models, "--tokens-per-second", "40",
                ]
            )  # fmt: skip
            procs.append(proc)
            _wait_for(models_url, proc, "the fake upstream")
    return procs, env


def _banner(settings: Settings, env: dict[str, str]) -> str:
    lines = [f"aicredits: open {settings.public_url}"]
    if auth.dev_sign_in(settings):
        users = ", ".join(email for email, _ in DEV_USERS)
        lines.append(f"  Dev sign-in: pick a test user ({users}) or type any email.")
        if "ADMIN_EMAILS" in env:
            lines.append(f"  {env['ADMIN_EMAILS']} is an admin (set ADMIN_EMAILS to change).")
    if settings.uses_fake_upstream:
        lines.append(
            f"  Model: the local fake upstream at {settings.upstream_base_url} (a demo that "
            "answers with placeholder text; set OPENAI_API_KEY for a real model)."
        )
    return "\n".join(lines)


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def reflex_command(argv: Sequence[str] | None) -> list[str]:
    """Reflex's command line, with Granian's defaults changed as in production
    (granian_patches)."""
    return [sys.executable, "-m", "aicredits.granian_patches", "run", *(argv or [])]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-ins and Reflex; extra arguments go to `reflex run`."""
    settings = get_settings()
    copied = copied_example(settings)
    if copied:
        raise SystemExit(copied)
    argv = app_ports(settings, argv or [])
    procs, env = start_stand_ins(settings)
    env.setdefault(RELOAD_PATHS, os.environ.get(RELOAD_PATHS) or reload_paths())
    print(_banner(settings, env), flush=True)
    reflex = subprocess.Popen(reflex_command(argv), env={**os.environ, **env})
    procs.append(reflex)

    def forward(signum: int, _frame: object) -> None:
        # Only leave reflex.wait() here; `finally` stops everything. Waiting for a child
        # inside the handler, while the wait it interrupted still holds that child's lock,
        # blocked for stop()'s whole timeout (a SIGTERM took 12 s, a Ctrl-C 2 s).
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    try:
        return reflex.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop(procs)
