# aicredits container image. Written and reviewed, not built on the project's machines
# (no Docker engine there): see README, "Running in a container".
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
# js_runtime.py fetches node and bun from the npm registry (no npm needed in this image).
RUN PATH="$(/opt/venv/bin/python scripts/js_runtime.py):$PATH" \
    /opt/venv/bin/reflex export --frontend-only --no-zip --env prod

# Runtime stage: no compilers, a non-root user, migrations applied on start.
FROM python:3.11-slim AS runtime
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    REFLEX_USE_SYSTEM_BUN=1 \
    REFLEX_TELEMETRY_ENABLED=false
RUN useradd --create-home --uid 10001 app
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=app:app /app /app
USER app
EXPOSE 3000
CMD ["sh", "-c", "python -m aicredits migrate && PATH=\"$(python scripts/js_runtime.py):$PATH\" exec reflex run --env prod --single-port --backend-host 0.0.0.0"]
