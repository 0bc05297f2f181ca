"""Logging: one JSON object per line in production, and who/what each line is about.

Every line carries the request id, the user id, the route and the client's address of the
request (or Reflex event) it was written in. They live in context variables, so they follow
the work across `await`s and into `run_blocking` threads (which copy the context) without
being passed around: the HTTP middleware sets the request id, route and client, and whoever
resolves the user (API key, session cookie, the Reflex state) adds the user id. A log call
can also name them itself with `extra={"user_id": ...}` (the periodic jobs do, having no
request).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from aicredits.settings import Settings

CONTEXT_FIELDS = ("request_id", "user_id", "route", "client_ip")
CHATTY_LOGGERS = ("httpx", "httpx2", "httpcore")
# A client's X-Request-ID is kept only when it is short and plain: it goes into every log
# line and back out in a header, so nothing that could forge a line or a header passes.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+=/-]{0,127}$")

_request_id: ContextVar[str | None] = ContextVar("aicredits_request_id", default=None)
_route: ContextVar[str | None] = ContextVar("aicredits_route", default=None)
_user_id: ContextVar[int | None] = ContextVar("aicredits_user_id", default=None)
# The client's address as the app sees it: behind a trusted proxy, the forwarded one.
_client_ip: ContextVar[str | None] = ContextVar("aicredits_client_ip", default=None)
# True when the request id was made here (so it is unique and safe to reuse as a key).
_generated: ContextVar[bool] = ContextVar("aicredits_request_id_generated", default=False)
# What a route adds to its request's access line ("model demo-model").
_detail: ContextVar[str | None] = ContextVar("aicredits_request_detail", default=None)
# One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def sane_request_id(value: str | None) -> str | None:
    """The client's request id if it is safe to log and echo, else None."""
    if value is None:
        return None
    value = value.strip()
    return value if _SANE_REQUEST_ID.match(value) else None


def current_request_id() -> str | None:
    return _request_id.get()


def generated_request_id() -> str | None:
    """This request's id when it was made here rather than taken from the client."""
    return _request_id.get() if _generated.get() else None


def current_route() -> str | None:
    return _route.get()


def current_user_id() -> int | None:
    return _user_id.get()


def current_client_ip() -> str | None:
    return _client_ip.get()


def set_user_id(user_id: int | None) -> None:
    """The signed-in user, once known, for the rest of this request or event."""
    _user_id.set(user_id)


def set_detail(detail: str) -> None:
    """What this request's access line adds after its status and time ("model demo-model"):
    one line per API call says who called which model, how it ended and how long it took."""
    _detail.set(detail)


def current_detail() -> str | None:
    return _detail.get()


def set_request_id(request_id: str, *, generated: bool = True) -> None:
    _request_id.set(request_id)
    _generated.set(generated)


def start_event(*, route: str, user_id: int | None, client_ip: str | None = None) -> None:
    """A Reflex event: no HTTP request, so a fresh request id, the page as the route, the
    user and the websocket's client. Each event runs in its own asyncio task, so this ends
    with the event."""
    set_request_id(new_request_id())
    _route.set(route)
    _user_id.set(user_id)
    _client_ip.set(client_ip or None)


@contextmanager
def request_scope(
    *,
    request_id: str,
    route: str,
    generated: bool,
    user_id: int | None = None,
    client_ip: str | None = None,
) -> Iterator[None]:
    """Bind a request's context for the duration of the block, then restore the old one."""
    tokens = (
        _request_id.set(request_id),
        _route.set(route),
        _user_id.set(user_id),
        _generated.set(generated),
        _client_ip.set(client_ip),
        _detail.set(None),
    )
    try:
        yield
    finally:
        _detail.reset(tokens[5])
        _client_ip.reset(tokens[4])
        _generated.reset(tokens[3])
        _user_id.reset(tokens[2])
        _route.reset(tokens[1])
        _request_id.reset(tokens[0])


def _context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record's own fields (given with `extra=`) win over the ambient context."""
    ambient = {
        "request_id": _request_id.get(),
        "user_id": _user_id.get(),
        "route": _route.get(),
        "client_ip": _client_ip.get(),
    }
    return {name: getattr(record, name, ambient[name]) for name in CONTEXT_FIELDS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, user_id, route,
    client_ip, and the exception's traceback as text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_context_of(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _ENCODER.encode(entry)


class TextFormatter(logging.Formatter):
    """For a developer's terminal: the usual line, with the context in brackets when set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        context = " ".join(f"{k}={v}" for k, v in _context_of(record).items() if v is not None)
        return f"{line} [{context}]" if context else line


class _OurHandler(logging.StreamHandler):
    """Marks the handler configure_logging installed, so calling it again replaces it."""


def configure_logging(settings: Settings) -> None:
    """Send the root logger to stderr, as JSON lines or plain text. Safe to call again."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(handler)
    handler = _OurHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.json_logs else TextFormatter())
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # No formatter here shows the caller's file and line, the thread or the process, and
    # finding them is most of the cost of a record (every API call writes one): Python's
    # logging HOWTO, "Optimization", turns them off like this.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # HTTP clients log every request they make at INFO: the upstream and Redis calls would
    # drown the app's own lines. Their warnings still come through.
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING
        )
