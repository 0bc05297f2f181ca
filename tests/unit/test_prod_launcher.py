"""What `python -m aicredits prod` hands to Reflex: the command line and the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicredits import prod_launcher
from aicredits.settings import Settings


def _command(*argv: str) -> list[str]:
    return prod_launcher.reflex_command(prod_launcher._parser().parse_args(list(argv)))


def test_the_full_app_runs_in_prod_mode_on_one_port() -> None:
    command = _command("--port", "8080")
    assert command[1:6] == ["-m", "aicredits.granian_patches", "run", "--env", "prod"]
    assert "--single-port" in command
    assert command[command.index("--frontend-port") + 1] == "8080"
    assert command[command.index("--backend-port") + 1] == "8080"
    assert "--backend-only" not in command


def test_backend_only_runs_on_the_backend_port() -> None:
    command = _command("--backend-only", "--workers", "2", "--backend-port", "18123")
    assert "--backend-only" in command
    assert command[command.index("--backend-port") + 1] == "18123"
    assert "--frontend-port" not in command and "--single-port" not in command


def test_default_ports() -> None:
    assert _command()[_command().index("--backend-port") + 1] == "3000"
    only = _command("--backend-only")
    assert only[only.index("--backend-port") + 1] == "8000"


def test_the_environment_names_redis_the_workers_and_production(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REFLEX_REDIS_URL", raising=False)
    settings = Settings(_env_file=None, redis_url="redis://cache:6379/0")
    env = prod_launcher.reflex_environment(settings, workers=3)
    assert env["AICREDITS_ENV"] == "prod"
    assert env["REFLEX_REDIS_URL"] == "redis://cache:6379/0"
    assert env["GRANIAN_WORKERS"] == "3"
    assert env["REFLEX_USE_GRANIAN"] == "true"
    metrics_dir = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    assert metrics_dir.is_dir() and not any(metrics_dir.iterdir())
    metrics_dir.rmdir()


def test_reflex_default_worker_count_is_kept_without_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GRANIAN_WORKERS", raising=False)
    settings = Settings(_env_file=None, redis_url="redis://cache:6379/0")
    env = prod_launcher.reflex_environment(settings, workers=None)
    assert "GRANIAN_WORKERS" not in env
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).rmdir()


def test_an_explicit_reflex_redis_url_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFLEX_REDIS_URL", "redis://cache:6379/1")
    settings = Settings(_env_file=None, redis_url="redis://cache:6379/0")
    env = prod_launcher.reflex_environment(settings, workers=None)
    assert env["REFLEX_REDIS_URL"] == "redis://cache:6379/1"
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).rmdir()


def test_granian_defaults_are_changed_once_and_can_be_undone() -> None:
    from granian import Granian
    from granian.constants import Interfaces, RuntimeModes

    from aicredits import granian_patches

    before = Granian(target="x:y", interface=Interfaces.ASGI, workers=2)
    assert before.respawn_failed_workers is False  # Granian's own default: the reason for this
    undo = granian_patches.apply(drain_grace=20)
    try:
        assert granian_patches.apply(drain_grace=5)() is None  # not wrapped twice
        server = Granian(target="aicredits.aicredits:app", interface=Interfaces.ASGI, workers=2)
        assert server.respawn_failed_workers is True
        assert server.runtime_mode == RuntimeModes.st
        assert server.workers_kill_timeout == 20 + granian_patches.KILL_MARGIN_SECONDS
        explicit = Granian(
            target="x:y",
            interface=Interfaces.ASGI,
            respawn_failed_workers=False,
            workers_kill_timeout=2,
            runtime_mode=RuntimeModes.mt,
        )
        assert explicit.respawn_failed_workers is False
        assert explicit.workers_kill_timeout == 2
        assert explicit.runtime_mode == RuntimeModes.mt
    finally:
        undo()
    after = Granian(target="x:y", interface=Interfaces.ASGI, workers=2)
    assert after.respawn_failed_workers is False
