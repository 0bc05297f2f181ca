"""Workers that keep dying stop the server with a failure status, so whatever supervises
`prod` (compose's `restart: unless-stopped`, systemd's `Restart=on-failure`) restarts it and
shows the failure: docs/deployment.md tells operators to rely on that. One death is survived
(test_worker_kill.py); a replacement dying again within Granian's crash-loop window is not
respawned forever."""

from __future__ import annotations

import os
import signal

import pytest

from tests.system.harness import RunningApp, wait_until

WORKERS = 1


@pytest.mark.timeout(120)
def test_a_worker_dying_again_at_once_stops_the_server_with_status_1(
    system_app: RunningApp,
) -> None:
    (first,) = system_app.worker_pids()
    os.kill(first, signal.SIGKILL)
    replacement = wait_until(
        lambda: [p for p in system_app.worker_pids() if p != first],
        timeout=60,
        what="a replacement worker",
    )
    assert system_app.proc.poll() is None, "one death stopped the server"

    os.kill(replacement[0], signal.SIGKILL)
    wait_until(lambda: system_app.proc.poll() is not None, timeout=60, what="the server to stop")
    assert system_app.proc.returncode == 1
    assert "Worker crash loop detected" in system_app.log_tail(20_000)
