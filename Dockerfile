# aicredits container image. Linted with hadolint (`make lint`) and checked by
# tests/unit/test_container_files.py, but never built on the project's machines: they have no
# Docker engine (see README, "Deployment").
#
# Build stage: Python deps, Node.js and bun from the npm registry, the compiled frontend.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REFLEX_USE_SYSTEM_BUN=1 \
    REFLEX_TELEMETRY_ENABLED=false
WORKDIR /app
RUN python -m venv /opt/venv
COPY requirements.txt ./
RUN /opt/venv/bin/pip install -r requirements.txt
COPY . .
# js_runtime.py fetches node and bun from the npm registry into .tools/ (no npm needed in
# this image; each tarball's sha512 is checked). The export compiles the pages and installs
# and builds the frontend, so the runtime's start only rebuilds the bundle.
RUN PATH="$(/opt/venv/bin/python scripts/js_runtime.py):$PATH" \
    /opt/venv/bin/reflex export --frontend-only --no-zip --env prod

# Runtime stage: no compilers or caches, a non-root user. `python -m aicredits prod` refuses
# to start while a development default is configured, applies the migrations, then runs
# `reflex run --env prod`: frontend and backend on port 3000, several Granian workers, the
# Redis state manager. Reflex 0.10 rebuilds the frontend bundle at every production start,
# so node and bun (.tools/) come along and the first answer takes a minute or two.
FROM python:3.11-slim AS runtime
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    AICREDITS_ENV=prod \
    REFLEX_USE_SYSTEM_BUN=1 \
    REFLEX_TELEMETRY_ENABLED=false
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --create-home --shell /usr/sbin/nologin app
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /app /app
USER 10001:10001
EXPOSE 3000
# Liveness only; /readyz (database and Redis) is for the load balancer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/healthz', timeout=4)"]
CMD ["sh", "-c", "PATH=\"$(python scripts/js_runtime.py):$PATH\" exec python -m aicredits prod --port 3000"]
