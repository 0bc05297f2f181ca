"""Clients of the app under test: the OpenAI-compatible API over plain HTTP, and the chat page
driven over Reflex's websocket the way the browser drives it (load, then send)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import socketio

from aicredits.state.chat import ChatState
from tests.system.harness import MODEL, PUBLIC_URL

NAMESPACE = "/_event"
SESSION_COOKIE = "__Host-aicredits_session"  # PUBLIC_URL is https


@dataclass
class CallResult:
    kind: str  # "api", "stream" or "chat"
    status: int  # HTTP status; for chat 200 when a reply was shown, else 0
    request_id: str | None = None
    error_code: str | None = None
    charged: int | None = None  # as the app reported it, when it did
    tokens: int = 0  # reply pieces the client received
    cut: bool = False  # the reply ended without its proper end

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.cut and self.error_code is None


def _error_code(response: httpx.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def api_call(
    client: httpx.Client, base_url: str, api_key: str, prompt: str, *, stream: bool = False
) -> CallResult:
    """One POST /v1/chat/completions; a dropped connection counts as a cut, not an error."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"}
    url = f"{base_url}/v1/chat/completions"
    if not stream:
        try:
            response = client.post(url, json=body, headers=headers)
        except httpx.TransportError:
            return CallResult("api", 0, cut=True)
        result = CallResult("api", response.status_code, response.headers.get("x-request-id"))
        if response.status_code == 200:
            result.charged = response.json()["aicredits"]["credits_charged"]
            result.tokens = response.json()["usage"]["completion_tokens"]
        else:
            result.error_code = _error_code(response)
        return result
    result = CallResult("stream", 0)
    try:
        with client.stream("POST", url, json=body, headers=headers) as response:
            result.status = response.status_code
            result.request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                response.read()
                result.error_code = _error_code(response)
                return result
            _read_events(response, result)
    except httpx.TransportError:
        result.cut = True
    return result


def _read_events(response: httpx.Response, result: CallResult) -> None:
    done = False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            result.error_code = event["error"].get("code")
            result.cut = True
            return
        for choice in event.get("choices", []):
            if choice.get("delta", {}).get("content"):
                result.tokens += 1
        if "aicredits" in event:
            result.charged = event["aicredits"]["credits_charged"]
    result.cut = not done


def _var(update: dict[str, Any], name: str) -> list[Any]:
    return [
        value
        for substate in update.get("delta", {}).values()
        for key, value in substate.items()
        if key.startswith(name + "_rx_state_")
    ]


@dataclass
class ChatClient:
    """One browser tab on /chat, signed in with a session token."""

    base_url: str
    session: str
    _updates: list[dict[str, Any]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _sio: socketio.Client | None = None
    _connects: int = 0

    def __enter__(self) -> ChatClient:
        sio = socketio.Client(websocket_extra_options={"origin": PUBLIC_URL})
        sio.on("event", self._receive, namespace=NAMESPACE)
        sio.on("connect", self._connected, namespace=NAMESPACE)
        sio.connect(
            f"{self.base_url}?token={uuid.uuid4()}",
            socketio_path="_event",
            namespaces=[NAMESPACE],
            transports=["websocket"],
            headers={"Cookie": f"{SESSION_COOKIE}={self.session}"},
            wait_timeout=20,
        )
        self._sio = sio
        self._emit("load", {})
        self._wait_for(lambda u: bool(_var(u, "models")), timeout=30, what="the chat page load")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._sio is not None:
            self._sio.disconnect()

    def _connected(self) -> None:
        # As the browser does: a tab that reconnects (its worker stopped) loads the page
        # again, on whichever worker it reached.
        self._connects += 1
        if self._connects > 1 and self._sio is not None:
            self._sio.emit("event", self._event("load", {}), namespace=NAMESPACE)

    def _event(self, handler: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": f"{ChatState.get_full_name()}.{handler}",
            "payload": payload,
            "router_data": {"pathname": "/chat", "asPath": "/chat"},
        }

    def _receive(self, data: dict[str, Any]) -> None:
        with self._changed:
            self._updates.append(data)
            self._changed.notify_all()

    def _emit(self, handler: str, payload: dict[str, Any]) -> None:
        assert self._sio is not None
        with self._changed:
            self._updates.clear()
        self._sio.emit("event", self._event(handler, payload), namespace=NAMESPACE)

    def _wait_for(self, done: Any, *, timeout: float, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(done(u) for u in self._updates):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what}: no answer within {timeout:.0f} s")
                self._changed.wait(left)
            return list(self._updates)

    def local_port(self) -> int:
        """The client side port of the websocket: finds the worker serving this tab."""
        assert self._sio is not None
        return int(self._sio.eio.ws.sock.getsockname()[1])

    def start_send(self, text: str) -> None:
        self._emit("send", {"form_data": {"message": text}})

    def _last_message(self) -> dict[str, Any]:
        rows = [m for u in self._updates for m in _var(u, "messages")]
        return dict(rows[-1][-1]) if rows and rows[-1] else {}

    def wait_for_reply_text(self, *, min_words: int, timeout: float = 30) -> None:
        self._wait_for(
            lambda u: any(
                len(str(rows[-1].get("content", "")).split()) >= min_words
                for rows in _var(u, "messages")
                if rows and rows[-1].get("role") == "assistant"
            ),
            timeout=timeout,
            what=f"a reply of {min_words} words",
        )

    def wait_for_reply_end(self, *, timeout: float) -> dict[str, Any]:
        """The reply as the page shows it once it has ended."""
        self._wait_for(lambda u: False in _var(u, "streaming"), timeout=timeout, what="the end")
        with self._changed:
            return self._last_message()

    def send(self, text: str, *, timeout: float = 60) -> CallResult:
        """Send a message; wait until the reply has finished (or was refused)."""
        self._emit("send", {"form_data": {"message": text}})
        updates = self._wait_for(
            lambda u: False in _var(u, "streaming"), timeout=timeout, what="a chat reply"
        )
        errors = [e for u in updates for e in _var(u, "error_kind") if e]
        messages = [m for u in updates for m in _var(u, "messages")]
        if errors:
            return CallResult("chat", 0, error_code=errors[-1])
        last = messages[-1][-1] if messages and messages[-1] else {}
        note = str(last.get("note", ""))
        return CallResult(
            "chat",
            200,
            tokens=len(str(last.get("content", "")).split()),
            cut="broke off" in note,
        )
