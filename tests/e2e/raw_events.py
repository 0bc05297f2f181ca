"""A raw socket.io client for the running backend: one crafted event, sent straight to it
the way an attacker would, and the updates it causes."""

from __future__ import annotations

import time
import uuid
from typing import Any

import socketio

from tests.e2e.conftest import RunningApp

NAMESPACE = "/_event"
# The backend sends the delta and the follow-up events as separate messages; an answer is
# complete once it has been quiet this long.
QUIET_SECONDS = 1.0
ANSWER_TIMEOUT_SECONDS = 20


def send_event(
    app: RunningApp,
    name: str,
    *,
    path: str,
    cookie: str = "",
    origin: str | None = None,
    payload: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Open our own socket.io connection, send the event `name` (a handler's full name) as
    if from the page at `path`, and collect the updates it causes."""
    updates: list[dict[str, Any]] = []
    last_update = [0.0]

    def receive(data: dict[str, Any]) -> None:
        updates.append(data)
        last_update[0] = time.monotonic()

    client = socketio.Client(websocket_extra_options={"origin": origin or app.frontend})
    client.on("event", receive, namespace=NAMESPACE)
    client.connect(
        f"{app.backend}?token={uuid.uuid4()}",
        socketio_path="_event",
        namespaces=[NAMESPACE],
        transports=["websocket"],
        headers={"Cookie": cookie} if cookie else {},
        wait_timeout=15,
    )
    try:
        client.emit(
            "event",
            {
                "name": name,
                "payload": payload or {},
                "router_data": {"pathname": path, "asPath": path},
            },
            namespace=NAMESPACE,
        )
        deadline = time.monotonic() + ANSWER_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if updates and time.monotonic() - last_update[0] > QUIET_SECONDS:
                break
            time.sleep(0.05)
    finally:
        client.disconnect()
    assert updates, "the backend never answered"
    return updates


def changed(updates: list[dict[str, Any]], var: str) -> list[Any]:
    """Every value the backend sent for a state var whose name starts with `var`."""
    return [
        value
        for update in updates
        for substate in update.get("delta", {}).values()
        for name, value in substate.items()
        if name.startswith(var + "_rx_state_")
    ]


def redirects(updates: list[dict[str, Any]]) -> list[str]:
    return [
        str(event.get("payload", {}).get("path"))
        for update in updates
        for event in update.get("events", [])
        if event.get("name") == "_redirect"
    ]
