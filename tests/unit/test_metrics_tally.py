"""The calls' own metrics are tallied in the process and handed to prometheus_client in
batches (adapters/metrics.py): what a scrape reads must be what writing each one through
would have given."""

from __future__ import annotations

import os
import time
import uuid

from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from aicredits.adapters import metrics


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_latencies_land_in_the_buckets_a_histogram_would_put_them_in() -> None:
    route = f"/test/{uuid.uuid4().hex}"
    seconds = [0.0, 0.004, 0.005, 0.0051, 0.3, 2.5, 299.0, 300.0, 301.0, 0.005]
    reference = Histogram(
        "reference_seconds", "", ["route"], buckets=metrics._LATENCY_BOUNDS[:-1],
        registry=CollectorRegistry(),
    )  # fmt: skip
    for s in seconds:
        metrics.observe_http(route=route, method="GET", status=200, seconds=s)
        reference.labels(route).observe(s)
    metrics.flush()
    expected = {
        (s.name.removeprefix("reference_seconds"), tuple(sorted(s.labels.items()))): s.value
        for family in reference.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }
    got = {
        (suffix, labels): sample(f"aicredits_http_request_duration_seconds{suffix}", **dict(labels))
        for suffix, labels in expected
    }
    assert got == expected
    assert sample("aicredits_http_requests_total", route=route, method="GET", status="2xx") == 10


def test_counters_add_up_and_a_scrape_includes_what_was_not_handed_over_yet() -> None:
    model = f"model-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        metrics.upstream_call(model=model, outcome="completed")
        metrics.upstream_tokens(model=model, input_tokens=10, output_tokens=0)
        metrics.credits_settled(model=model, charged=4, released=6, unbilled=1)
    metrics.upstream_call(model=model, outcome="failed", error_kind="timeout")
    metrics.credits_reserved(model=model, credits=-5)  # never below zero
    text = metrics.render()[0].decode()  # renders what was tallied, without a flush first
    assert f'aicredits_upstream_calls_total{{model="{model}",outcome="completed"}} 3.0' in text
    assert sample("aicredits_upstream_tokens_total", model=model, direction="input") == 30
    assert sample("aicredits_upstream_tokens_total", model=model, direction="output") is None
    assert sample("aicredits_upstream_errors_total", model=model, kind="timeout") == 1
    assert sample("aicredits_credits_settled_total", model=model) == 12
    assert sample("aicredits_credits_released_total", model=model) == 18
    assert sample("aicredits_credits_unbilled_total", model=model) == 3
    assert sample("aicredits_credits_reserved_total", model=model) == 0


def test_the_process_hands_its_tallies_over_by_itself_within_a_second_or_so() -> None:
    model = f"model-{uuid.uuid4().hex[:8]}"
    metrics.upstream_call(model=model, outcome="completed")
    deadline = time.monotonic() + 3 * metrics.FLUSH_SECONDS + 1
    while sample("aicredits_upstream_calls_total", model=model, outcome="completed") is None:
        assert time.monotonic() < deadline, "nothing handed over"
        time.sleep(0.05)


def test_a_forked_child_does_not_hand_over_its_parents_tallies() -> None:
    model = f"model-{uuid.uuid4().hex[:8]}"
    metrics.upstream_call(model=model, outcome="completed")
    pid = os.fork()
    if pid == 0:  # the child: nothing of the parent's to hand over, and it can tally anew
        ok = not metrics._tally._counts and metrics._tally._flusher is None
        metrics.upstream_call(model=model, outcome="stopped")
        os._exit(0 if ok and metrics._tally._flusher is not None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    metrics.flush()
    assert sample("aicredits_upstream_calls_total", model=model, outcome="completed") == 1
