"""The per-account gate in front of Postgres: mutual exclusion, and first come, first served."""

import threading
import time

from aicredits.adapters.ledger_sql import _FifoLock


def test_only_one_holder_at_a_time() -> None:
    lock = _FifoLock()
    inside = 0
    worst = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, worst
        for _ in range(200):
            with lock:
                with guard:
                    inside += 1
                    worst = max(worst, inside)
                time.sleep(0)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst == 1


def test_waiters_enter_in_arrival_order() -> None:
    lock = _FifoLock()
    order: list[int] = []
    lock.__enter__()  # hold it while the waiters line up
    threads = []
    for i in range(6):
        t = threading.Thread(target=lambda i=i: _enter_and_record(lock, order, i))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while len(lock._waiters) < i + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    lock.__exit__(None, None, None)
    for t in threads:
        t.join()
    assert order == list(range(6))


def _enter_and_record(lock: _FifoLock, order: list[int], i: int) -> None:
    with lock:
        order.append(i)
