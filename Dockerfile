# aicredits container image. Linted with hadolint (`make lint`) and checked by
# tests/unit/test_container_files.py; `make image` builds it with podman and `make image-check`
# starts it and waits for /healthz (docs/deployment.md, "Building the image without Docker Hub").
#
# The base comes in through BASE_IMAGE: python:3.11-slim from Docker Hub by default, or a
# plain Debian bookworm (scripts/build_image.sh makes one from the Debian mirror), which gets
# Debian's Python 3.11 from apt below. Both stages start from that base.
ARG BASE_IMAGE=python:3.11-slim

# Base: Python >= 3.11 with venv, and the CA certificates (node and bun come over https).
# Nothing to do on python:3.11-slim. Debian's packages are not pinned: they come from the
# base's own release, which is where its security updates arrive.
FROM ${BASE_IMAGE} AS base
# hadolint ignore=DL3008
RUN if python3 -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        && [ -f /etc/ssl/certs/ca-certificates.crt ]; then exit 0; fi \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Build stage: Python deps, Node.js and bun from the npm registry, the compiled frontend.
# REFLEX_DIR is Reflex's own folder (its registry choice, an install id). It lives in /app so
# that the runtime gets the one the export made: when it is missing, Reflex re-initialises
# .web at every start and downloads every frontend package from npm again.
FROM base AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REFLEX_DIR=/app/.reflex \
    REFLEX_USE_SYSTEM_BUN=1 \
    REFLEX_TELEMETRY_ENABLED=false
WORKDIR /app
RUN python3 -m venv /opt/venv
COPY requirements.txt ./
# Behind a TLS-intercepting proxy, pass its CA bundle as the build secret `build_ca`
# (`--secret id=build_ca,src=/etc/ssl/certs/ca-certificates.crt`): pip, the npm downloads and
# bun then trust it. It is mounted for these two steps only and never stored in the image.
RUN --mount=type=secret,id=build_ca \
    if [ -f /run/secrets/build_ca ]; then \
        export PIP_CERT=/run/secrets/build_ca SSL_CERT_FILE=/run/secrets/build_ca \
            NODE_EXTRA_CA_CERTS=/run/secrets/build_ca; \
    fi \
    && /opt/venv/bin/pip install -r requirements.txt
COPY . .
# js_runtime.py fetches node and bun from the npm registry into .tools/ (no npm needed in
# this image; each tarball's sha512 is checked). The export compiles the pages and installs
# and builds the frontend, so the runtime's start only rebuilds the bundle.
RUN --mount=type=secret,id=build_ca \
    if [ -f /run/secrets/build_ca ]; then \
        export PIP_CERT=/run/secrets/build_ca SSL_CERT_FILE=/run/secrets/build_ca \
            NODE_EXTRA_CA_CERTS=/run/secrets/build_ca; \
    fi \
    && PATH="$(/opt/venv/bin/python scripts/js_runtime.py):$PATH" \
    && export PATH \
    && /opt/venv/bin/reflex export --frontend-only --no-zip --env prod

# Runtime stage: no compilers or caches, a non-root user. `python -m aicredits prod` refuses
# to start while a development default is configured, applies the migrations, then runs
# `reflex run --env prod`: frontend and backend on port 3000, several Granian workers, the
# Redis state manager. Reflex 0.10 rebuilds the frontend bundle at every production start
# (offline: the packages are in .web/node_modules), so node and bun (.tools/) come along; the
# first answer took 18-32 s on 2 cores.
FROM base AS runtime
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    AICREDITS_ENV=prod \
    REFLEX_DIR=/app/.reflex \
    REFLEX_USE_SYSTEM_BUN=1 \
    REFLEX_TELEMETRY_ENABLED=false
# /app itself belongs to the user too: the app creates files there at run time (.data/ for a
# SQLite database, Reflex's .states/), and COPY --chown changes only what it copies.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --create-home --shell /usr/sbin/nologin app \
    && install -d -o app -g app /app
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /app /app
USER 10001:10001
EXPOSE 3000
# Liveness only; /readyz (database and Redis) is for the load balancer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/healthz', timeout=4)"]
CMD ["sh", "-c", "PATH=\"$(python scripts/js_runtime.py):$PATH\" exec python -m aicredits prod --port 3000"]
