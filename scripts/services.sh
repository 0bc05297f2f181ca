#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis the tests use are up; start them when they are down.
# The commands are the machine's own (see ../shared/ENVIRONMENT.md). Point the tests elsewhere
# with AICREDITS_TEST_PG_URL and AICREDITS_TEST_REDIS_URL.
set -euo pipefail

pg_host=127.0.0.1
pg_port=5432

pg_up() { pg_isready -q -h "$pg_host" -p "$pg_port" 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if [ -n "${AICREDITS_TEST_PG_URL:-}" ]; then
  echo "[services] using PostgreSQL at AICREDITS_TEST_PG_URL"
elif pg_up; then
  echo "[services] PostgreSQL is up"
else
  echo "[services] starting PostgreSQL"
  if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    echo "[services] PostgreSQL is not installed here; install it or set AICREDITS_TEST_PG_URL" >&2
    exit 1
  fi
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  pg_up || { echo "[services] PostgreSQL did not come up" >&2; exit 1; }
fi

if [ -n "${AICREDITS_TEST_REDIS_URL:-}" ]; then
  echo "[services] using Redis at AICREDITS_TEST_REDIS_URL"
elif redis_up; then
  echo "[services] Redis is up"
else
  echo "[services] starting Redis"
  if ! command -v redis-server >/dev/null; then
    echo "[services] redis-server is not installed here; install it or set AICREDITS_TEST_REDIS_URL" >&2
    exit 1
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 1 40); do redis_up && break; sleep 0.25; done
  redis_up || { echo "[services] Redis did not come up" >&2; exit 1; }
fi
