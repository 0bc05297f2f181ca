"""Prometheus metrics: what the app counts, and the text a scraper reads at /metrics.

Production runs several worker processes, each with its own memory. When the environment
names a `PROMETHEUS_MULTIPROC_DIR` (the prod launcher sets it to a fresh, empty directory
before the workers start), prometheus_client keeps every value in a file there and
`render()` adds up all the workers' files, so one scrape sees the whole app. The variable
must be set before this module is first imported: prometheus_client picks its storage then.

Labels are bounded sets (route templates, model ids from the settings, outcomes, Stripe
event types): never a user id, a raw path or anything else a client can vary at will.
"""

from __future__ import annotations

import os
import tempfile

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUESTS = Counter(
    "aicredits_http_requests_total",
    "HTTP requests answered, by route template, method and status class.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "aicredits_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response body, by route template.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
UPSTREAM_CALLS = Counter(
    "aicredits_upstream_calls_total",
    "Calls to the model provider, by model and outcome (completed, stopped, cut, failed).",
    ["model", "outcome"],
)
UPSTREAM_TOKENS = Counter(
    "aicredits_upstream_tokens_total",
    "Tokens of finished calls, by model and direction (input, output).",
    ["model", "direction"],
)
UPSTREAM_ERRORS = Counter(
    "aicredits_upstream_errors_total",
    "Model provider failures, by model and kind (status, timeout, connection, malformed, "
    "deadline).",
    ["model", "kind"],
)
CREDITS_RESERVED = Counter(
    "aicredits_credits_reserved_total", "Credits reserved (held) before calls.", ["model"]
)
CREDITS_SETTLED = Counter(
    "aicredits_credits_settled_total", "Credits charged when calls were settled.", ["model"]
)
CREDITS_RELEASED = Counter(
    "aicredits_credits_released_total",
    "Reserved credits given back: failed calls' holds and the unused rest of settled ones.",
    ["model"],
)
CREDITS_UNBILLED = Counter(
    "aicredits_credits_unbilled_total",
    "Usage above a call's reservation, recorded but never charged.",
    ["model"],
)
WEBHOOK_EVENTS = Counter(
    "aicredits_webhook_events_total",
    "Stripe webhook deliveries, by event type and outcome.",
    ["type", "outcome"],
)
UNMATCHED_PAYMENTS = Counter(
    "aicredits_unmatched_payments_total",
    "Payments refused because they match no Checkout Session the app created, by reason "
    "and where they were seen (webhook, success_page, reconcile). Each credited nothing.",
    ["reason", "source"],
)
RECONCILIATION_DISCREPANCIES = Counter(
    "aicredits_reconciliation_discrepancies_total",
    "Discrepancies reconciliation found against Stripe, by kind.",
    ["kind"],
)
RATE_LIMIT_REFUSALS = Counter(
    "aicredits_rate_limit_refusals_total",
    "Calls refused by a rate limit, by limit (user, ip, concurrent, unavailable).",
    ["limit"],
)
JOB_RUNS = Counter(
    "aicredits_job_runs_total",
    "Periodic job runs, by job and outcome (ran, skipped: another worker had it, failed).",
    ["job", "outcome"],
)
JOB_ITEMS = Counter(
    "aicredits_job_items_total", "Pieces of work the periodic jobs did, by job.", ["job"]
)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


def observe_http(*, route: str, method: str, status: int, seconds: float) -> None:
    method = method if method in KNOWN_METHODS else "other"
    HTTP_REQUESTS.labels(route=route, method=method, status=status_class(status)).inc()
    HTTP_LATENCY.labels(route=route).observe(seconds)


def upstream_call(*, model: str, outcome: str, error_kind: str | None = None) -> None:
    UPSTREAM_CALLS.labels(model=model, outcome=outcome).inc()
    if error_kind is not None:
        UPSTREAM_ERRORS.labels(model=model, kind=error_kind).inc()


def upstream_tokens(*, model: str, input_tokens: int, output_tokens: int) -> None:
    if input_tokens > 0:
        UPSTREAM_TOKENS.labels(model=model, direction="input").inc(input_tokens)
    if output_tokens > 0:
        UPSTREAM_TOKENS.labels(model=model, direction="output").inc(output_tokens)


def credits_reserved(*, model: str, credits: int) -> None:
    CREDITS_RESERVED.labels(model=model).inc(max(credits, 0))


def credits_settled(*, model: str, charged: int, released: int, unbilled: int) -> None:
    CREDITS_SETTLED.labels(model=model).inc(max(charged, 0))
    CREDITS_RELEASED.labels(model=model).inc(max(released, 0))
    if unbilled > 0:
        CREDITS_UNBILLED.labels(model=model).inc(unbilled)


def credits_released(*, model: str, credits: int) -> None:
    CREDITS_RELEASED.labels(model=model).inc(max(credits, 0))


def webhook_event(*, event_type: str, outcome: str) -> None:
    WEBHOOK_EVENTS.labels(type=event_type[:100], outcome=outcome).inc()


def unmatched_payment(*, reason: str, source: str) -> None:
    UNMATCHED_PAYMENTS.labels(reason=reason, source=source).inc()


def reconciliation_discrepancy(*, kind: str) -> None:
    RECONCILIATION_DISCREPANCIES.labels(kind=kind).inc()


def rate_limit_refused(*, limit: str) -> None:
    RATE_LIMIT_REFUSALS.labels(limit=limit).inc()


def job_run(*, job: str, outcome: str, items: int = 0) -> None:
    JOB_RUNS.labels(job=job, outcome=outcome).inc()
    if items > 0:
        JOB_ITEMS.labels(job=job).inc(items)


def fresh_multiprocess_dir() -> str:
    """A new, empty directory for PROMETHEUS_MULTIPROC_DIR. For the prod launcher: call it
    once, before the workers start, and put the path in their environment. Old workers'
    files must not be reused: their counts would be added to the new ones."""
    return tempfile.mkdtemp(prefix="aicredits-metrics-")


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def render() -> tuple[bytes, str]:
    """The exposition text and its content type: every worker's values when running in
    multiprocess mode, this process's otherwise."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry), CONTENT_TYPE_LATEST
