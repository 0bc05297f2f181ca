"""The container files, checked statically: no Docker engine runs here to build or start them.

hadolint lints the Dockerfile in `make lint`; these tests pin what the deployment relies on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from aicredits.services.production import production_problems
from aicredits.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
# A value that comes from the environment / .env at run time, not from the file.
INTERPOLATED = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|_KEY$|TOKEN")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the `- KEY=value` spelling
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_runs_the_app_with_postgres_16_and_redis_7(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"app", "postgres", "redis"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["app"]["build"] in (".", {"context": "."})


def test_the_app_waits_for_healthy_postgres_and_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    depends = services["app"]["depends_on"]
    for name in ("postgres", "redis"):
        assert depends[name]["condition"] == "service_healthy"
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"


def test_postgres_keeps_its_data_in_a_volume(compose: dict[str, Any]) -> None:
    mounts = compose["services"]["postgres"]["volumes"]
    named = [m.split(":", 1)[0] for m in mounts if m.endswith(":/var/lib/postgresql/data")]
    assert named and named[0] in compose["volumes"]


def test_the_app_gets_its_settings_from_the_env_file(compose: dict[str, Any]) -> None:
    app = compose["services"]["app"]
    assert app["env_file"] in (".env", [".env"])
    env = _environment(app)
    assert {"DATABASE_URL", "REDIS_URL", "SESSION_SECRET"} <= set(env)
    assert env["AICREDITS_ENV"] == "prod"
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["REDIS_URL"].startswith("redis://redis:6379")


def test_compose_holds_no_literal_secret(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert INTERPOLATED.match(value), f"{name}.{key} is a literal: use ${{{key}}}"
    # The password inside the database URL comes from .env as well.
    url = _environment(compose["services"]["app"])["DATABASE_URL"]
    shape = re.sub(r"\$\{[^}]*\}", "${}", url)  # each interpolation, whatever its default
    assert shape == "postgresql://${}:${}@postgres:5432/${}", shape
    assert "${POSTGRES_PASSWORD:?" in url, "the database password must come from .env"


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split into its stages."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        assert stages, "an instruction before the first FROM"
        stages[-1].append(line)
    return stages


def test_the_dockerfile_builds_in_one_stage_and_runs_in_another() -> None:
    stages = _stages()
    assert len(stages) == 2
    build, runtime = stages
    assert " AS build" in build[0]
    assert any("js_runtime.py" in ln and "reflex export" in ln for ln in build)
    assert any(ln.startswith("COPY --from=build") for ln in runtime)


def test_the_runtime_stage_runs_as_a_non_root_user() -> None:
    users = [ln.split(None, 1)[1] for ln in _stages()[-1] if ln.upper().startswith("USER ")]
    assert users, "the runtime stage has no USER"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0")


def test_the_runtime_runs_the_production_command_with_a_healthcheck() -> None:
    runtime = _stages()[-1]
    cmd = [ln for ln in runtime if ln.startswith("CMD ")]
    assert len(cmd) == 1
    assert "python -m aicredits prod" in cmd[0]
    healthcheck = [ln for ln in runtime if ln.startswith("HEALTHCHECK ")]
    assert healthcheck and "/healthz" in healthcheck[0] and "urllib" in healthcheck[0]


def test_env_example_is_refused_until_its_placeholders_are_replaced() -> None:
    settings = Settings(
        _env_file=ENV_EXAMPLE,
        AICREDITS_ENV="prod",
        database_url="postgresql://aicredits@postgres/aicredits",
        redis_url="redis://redis:6379/0",
    )
    named = " ".join(production_problems(settings))
    for variable in ("SESSION_SECRET", "OPENAI_API_KEY", "STRIPE_SECRET_KEY"):
        assert f"{variable} is still the placeholder" in named
