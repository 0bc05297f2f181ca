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
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from aicredits.devtools.dev_idp import DEV_USERS
from aicredits.services import auth
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


def start_stand_ins(settings: Settings) -> tuple[list[subprocess.Popen[bytes]], dict[str, str]]:
    """Start what the embedded defaults need. Returns the processes and env additions."""
    procs: list[subprocess.Popen[bytes]] = []
    env: dict[str, str] = {}
    if auth.dev_sign_in(settings):
        discovery = settings.dev_oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
        if not _answers(discovery):
            port = urlsplit(settings.dev_oidc_issuer).port or 9400
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
