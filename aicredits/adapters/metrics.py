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

import atexit
import bisect
import logging
import os
import tempfile
import threading
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger(__name__)

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


# --- the calls' own metrics: tallied here, handed to prometheus_client once a second --------
#
# prometheus_client writes every increment through to its value: in production a memory-
# mapped file the workers share, behind a lock and a check of the process id. A metered call
# made about a dozen such writes, 180 us of a busy worker's time per call, most of it while
# the next call waited. The metrics every call moves (below, up to webhook_event) are added
# up in plain dicts instead and handed over by a thread of this process every FLUSH_SECONDS,
# a handful of writes however many calls there were. `render()` hands over first, so this
# process's own scrape is exact; another worker's counts are at most FLUSH_SECONDS behind,
# far less than any scrape interval. A process that exits normally hands over what is left.

FLUSH_SECONDS = 1.0
_LATENCY_BOUNDS = (*HTTP_LATENCY._upper_bounds,)  # the buckets' upper bounds, +Inf last


class _Tally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[Counter, tuple[str, ...]], float] = {}
        # Per histogram child: the sum of its observations and a count per bucket.
        self._latency: dict[tuple[str, ...], list[float]] = {}
        self._flusher: threading.Thread | None = None

    def add(self, counter: Counter, labels: tuple[str, ...], amount: float) -> None:
        key = (counter, labels)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount
            if self._flusher is None:
                self._start()

    def observe_latency(self, labels: tuple[str, ...], seconds: float) -> None:
        bucket = bisect.bisect_left(_LATENCY_BOUNDS, seconds)  # the first bound >= seconds
        with self._lock:
            tally = self._latency.get(labels)
            if tally is None:
                tally = self._latency[labels] = [0.0] * (len(_LATENCY_BOUNDS) + 1)
            tally[0] += seconds
            tally[1 + bucket] += 1
            if self._flusher is None:
                self._start()

    def flush(self) -> None:
        """Hand everything tallied so far to prometheus_client."""
        with self._lock:
            counts, self._counts = self._counts, {}
            latency, self._latency = self._latency, {}
        for (counter, labels), amount in counts.items():
            counter.labels(*labels).inc(amount)
        for labels, (total, *buckets) in latency.items():
            # What Histogram.observe does for each observation, once per bucket.
            child = HTTP_LATENCY.labels(*labels)
            child._sum.inc(total)
            for index, count in enumerate(buckets):
                if count:
                    child._buckets[index].inc(count)

    def _start(self) -> None:
        self._flusher = threading.Thread(
            target=self._flush_forever, name="metrics-flush", daemon=True
        )
        self._flusher.start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:  # a bug here must not stop the counting for good
                logger.exception("handing the metrics over to prometheus_client failed")

    def _forked(self) -> None:
        # A forked child has none of the parent's threads, and the parent's tallies are the
        # parent's to hand over.
        self._lock = threading.Lock()
        self._counts, self._latency, self._flusher = {}, {}, None


_tally = _Tally()
os.register_at_fork(after_in_child=_tally._forked)
atexit.register(_tally.flush)
flush = _tally.flush


def observe_http(*, route: str, method: str, status: int, seconds: float) -> None:
    method = method if method in KNOWN_METHODS else "other"
    _tally.add(HTTP_REQUESTS, (route, method, status_class(status)), 1)
    _tally.observe_latency((route,), seconds)


def upstream_call(*, model: str, outcome: str, error_kind: str | None = None) -> None:
    _tally.add(UPSTREAM_CALLS, (model, outcome), 1)
    if error_kind is not None:
        _tally.add(UPSTREAM_ERRORS, (model, error_kind), 1)


def upstream_tokens(*, model: str, input_tokens: int, output_tokens: int) -> None:
    if input_tokens > 0:
        _tally.add(UPSTREAM_TOKENS, (model, "input"), input_tokens)
    if output_tokens > 0:
        _tally.add(UPSTREAM_TOKENS, (model, "output"), output_tokens)


def credits_reserved(*, model: str, credits: int) -> None:
    _tally.add(CREDITS_RESERVED, (model,), max(credits, 0))


def credits_settled(*, model: str, charged: int, released: int, unbilled: int) -> None:
    _tally.add(CREDITS_SETTLED, (model,), max(charged, 0))
    _tally.add(CREDITS_RELEASED, (model,), max(released, 0))
    if unbilled > 0:
        _tally.add(CREDITS_UNBILLED, (model,), unbilled)


def credits_released(*, model: str, credits: int) -> None:
    _tally.add(CREDITS_RELEASED, (model,), max(credits, 0))


# --- the rest: rare, written through -------------------------------------------------------


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
    flush()
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry), CONTENT_TYPE_LATEST
