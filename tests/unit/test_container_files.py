"""The container files, checked statically.

hadolint lints the Dockerfile in `make lint`; these tests pin what the deployment relies on.
Building and starting the image is `make image` / `make image-check` (podman), outside
`make test`: it needs root and takes minutes.
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


def _instructions() -> list[str]:
    """The Dockerfile's instructions, continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _stages() -> list[list[str]]:
    """The instructions split into stages; only ARGs may come before the first FROM."""
    stages: list[list[str]] = []
    for line in _instructions():
        if line.upper().startswith("FROM "):
            stages.append([])
        if not stages:
            assert line.upper().startswith("ARG "), f"{line!r} before the first FROM"
            continue
        stages[-1].append(line)
    return stages


def test_the_base_image_is_a_build_argument_defaulting_to_python_slim() -> None:
    # The default keeps `docker build .` working from Docker Hub; scripts/build_image.sh
    # passes a Debian bookworm made from the Debian mirror instead.
    lines = _instructions()
    first_from = next(i for i, ln in enumerate(lines) if ln.startswith("FROM "))
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines[:first_from]
    base = _stages()[0]
    assert base[0] == "FROM ${BASE_IMAGE} AS base"
    # A plain Debian base has no Python: the base stage installs Debian's 3.11 with venv.
    install = [ln for ln in base if ln.startswith("RUN ") and "apt-get install" in ln]
    assert install and "python3-venv" in install[0] and "ca-certificates" in install[0]
    assert "version_info < (3, 11)" in install[0]


def test_the_dockerfile_builds_in_one_stage_and_runs_in_another() -> None:
    stages = _stages()
    assert len(stages) == 3
    base, build, runtime = stages
    assert build[0] == "FROM base AS build" and runtime[0] == "FROM base AS runtime"
    assert any("js_runtime.py" in ln and "reflex export" in ln for ln in build)
    assert any(ln.startswith("COPY --from=build") for ln in runtime)
    assert not any(ln.startswith("COPY") for ln in base)


def test_reflex_keeps_its_folder_from_the_build_so_a_start_downloads_nothing() -> None:
    # Without the export's REFLEX_DIR, Reflex re-initialises .web at every start and fetches
    # all frontend packages from npm again (seen in the podman check).
    build, runtime = _stages()[1:]
    for stage in (build, runtime):
        env = " ".join(ln for ln in stage if ln.startswith("ENV "))
        assert "REFLEX_DIR=/app/.reflex" in env


def test_a_build_ca_is_a_secret_mount_never_a_layer() -> None:
    lines = _instructions()
    assert not any("build_ca" in ln for ln in lines if ln.startswith(("COPY", "ADD", "ENV")))
    users = [ln for ln in lines if "/run/secrets/build_ca" in ln]
    assert users and all(ln.startswith("RUN --mount=type=secret,id=build_ca ") for ln in users)


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
