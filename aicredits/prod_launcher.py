"""`python -m aicredits prod`: check the config, migrate, then become `reflex run --env prod`.

Reflex 0.10 serves the production backend with Granian (gunicorn is not installed, and
REFLEX_USE_GRANIAN pins the choice) with GRANIAN_WORKERS worker processes; unset, Reflex
picks cpu*2+1 when a Redis state manager is configured. The frontend and the backend share
one port in production. With --backend-only nothing is compiled and no Node.js is needed.

The launcher replaces itself with Reflex (exec), so signals sent to its pid (Ctrl-C, a
container stop, a test tearing it down) reach the server directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from aicredits.adapters import metrics
from aicredits.adapters.db import Database
from aicredits.services import schema
from aicredits.services.production import production_problems, refusal_message
from aicredits.settings import Settings, get_settings

EXIT_BAD_CONFIG = 2
DEFAULT_PORT = 3000
DEFAULT_BACKEND_ONLY_PORT = 8000
PRODUCTION = {"AICREDITS_ENV": "prod"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aicredits prod",
        description="Check the production settings, apply migrations, run `reflex run --env "
        "prod` with several workers, Postgres and the Redis state manager.",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="backend worker processes (default: Reflex's own, cpu*2+1 with Redis)",
    )
    parser.add_argument(
        "--backend-only",
        action="store_true",
        help="serve only the backend (HTTP routes and the websocket); no frontend build",
    )
    parser.add_argument(
        "--port", type=int, help=f"the one port of the full app (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--backend-port",
        type=int,
        help=f"the backend's port (default {DEFAULT_BACKEND_ONLY_PORT} with --backend-only; "
        "otherwise the same as --port)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")  # noqa: S104
    return parser


def load_production_settings() -> Settings | str:
    """The settings as production sees them (AICREDITS_ENV=prod whatever the environment
    says), or why they cannot be read."""
    try:
        return Settings(environment="prod")
    except ValidationError as exc:
        return f"the settings are invalid:\n{exc}"


def reflex_command(args: argparse.Namespace) -> list[str]:
    # Reflex's command line, with Granian's defaults changed (granian_patches).
    command = [sys.executable, "-m", "aicredits.granian_patches", "run", "--env", "prod"]
    if args.backend_only:
        port = args.backend_port or args.port or DEFAULT_BACKEND_ONLY_PORT
        command += ["--backend-only", "--backend-port", str(port)]
    else:
        port = args.port or args.backend_port or DEFAULT_PORT
        command += ["--single-port", "--frontend-port", str(port), "--backend-port", str(port)]
    return [*command, "--backend-host", args.host]


def reflex_environment(settings: Settings, workers: int | None) -> dict[str, str]:
    env = {
        **os.environ,
        "AICREDITS_ENV": "prod",
        # Reflex keeps each browser tab's state in Redis, shared by every worker: in
        # REDIS_URL's database unless REFLEX_REDIS_URL names another.
        "REFLEX_REDIS_URL": os.environ.get("REFLEX_REDIS_URL") or settings.redis_url,
        "REFLEX_USE_GRANIAN": "true",
        "REFLEX_TELEMETRY_ENABLED": "false",
        "REFLEX_USE_SYSTEM_BUN": "1",
    }
    if workers is not None:
        env["GRANIAN_WORKERS"] = str(workers)
    # Every worker writes its metrics there and /metrics adds them up; a fresh directory per
    # start, so a previous run's counts are never added in.
    env[metrics.MULTIPROC_ENV] = metrics.fresh_multiprocess_dir()
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv or []))
    if args.workers is not None and args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return EXIT_BAD_CONFIG
    # Everything below, `migrate` and Reflex's workers included, runs as production.
    os.environ.update(PRODUCTION)
    get_settings.cache_clear()
    settings = load_production_settings()
    if isinstance(settings, str):
        print(f"refusing to start: {settings}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    problems = production_problems(settings)
    if problems:
        print(refusal_message(problems), file=sys.stderr)
        return EXIT_BAD_CONFIG
    db = Database(settings.database_url)
    try:
        for line in schema.migrate(db, settings):
            print(line, flush=True)
    finally:
        db.dispose()
    command = reflex_command(args)
    print(f"aicredits: starting {' '.join(command[1:])}", flush=True)
    os.execve(command[0], command, reflex_environment(settings, args.workers))  # noqa: S606
    return 0  # pragma: no cover - execve does not return
