"""The log format: one JSON object per line, with the request context; text in development."""

from __future__ import annotations

import contextvars
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from aicredits.adapters import logs
from aicredits.settings import Settings


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("aicredits.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


RECORD_FLAGS = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_every_field(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    with logs.request_scope(request_id="req_abc", route="/v1/models", generated=True):
        logs.set_user_id(42)
        logger.info("hello %s", "world")
    logger.warning("outside")
    inside, outside = lines(stream)
    assert inside["message"] == "hello world"
    assert inside["level"] == "INFO"
    assert inside["logger"] == "aicredits.test.logs"
    assert (inside["request_id"], inside["user_id"], inside["route"]) == (
        "req_abc",
        42,
        "/v1/models",
    )
    assert inside["time"].endswith("+00:00") and "T" in inside["time"]
    # The scope ended: nothing of that request leaks into later lines.
    assert (outside["request_id"], outside["user_id"], outside["route"]) == (None, None, None)
    assert "exception" not in outside


def test_a_routes_detail_belongs_to_its_request(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    with logs.request_scope(request_id="req_1", route="/v1/chat/completions", generated=True):
        assert logs.current_detail() is None
        logs.set_detail("model demo-model")
        assert logs.current_detail() == "model demo-model"
        with logs.request_scope(request_id="req_2", route="/v1/models", generated=True):
            assert logs.current_detail() is None
        assert logs.current_detail() == "model demo-model"
    assert logs.current_detail() is None


def test_an_exception_is_in_the_line_as_text(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        logger.exception("it failed")
    (line,) = lines(stream)  # a multi-line traceback is still one line of JSON
    assert line["message"] == "it failed"
    assert line["level"] == "ERROR"
    assert "Traceback" in line["exception"] and "ValueError: bad value" in line["exception"]


def test_fields_given_to_the_call_win_over_the_context(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    with logs.request_scope(request_id="req_1", route="/x", generated=True, user_id=1):
        logger.warning("about someone else", extra={"user_id": 7})
    (line,) = lines(stream)
    assert (line["user_id"], line["request_id"]) == (7, "req_1")


def test_a_client_request_id_is_kept_only_when_it_is_plain() -> None:
    assert logs.sane_request_id("3f2b8c1e-7a4d-4b0e-9d55-0c1f2a3b4c5d") == (
        "3f2b8c1e-7a4d-4b0e-9d55-0c1f2a3b4c5d"
    )
    assert logs.sane_request_id("  abc.DEF_1:2  ") == "abc.DEF_1:2"
    for bad in ("", "a" * 129, "line\nbreak", 'quote"', "spa ce", "-leading", "é", None):
        assert logs.sane_request_id(bad) is None
    made = logs.new_request_id()
    assert made.startswith("req_") and logs.sane_request_id(made) == made
    assert made != logs.new_request_id()


def test_a_reflex_event_gets_a_fresh_id_each_time() -> None:
    def two_events() -> None:
        logs.start_event(route="event:/chat", user_id=3)
        first = logs.current_request_id()
        assert (logs.current_route(), logs.current_user_id()) == ("event:/chat", 3)
        logs.start_event(route="event:/chat", user_id=None)
        assert logs.current_request_id() not in (None, first)
        assert logs.current_user_id() is None

    # Run in a copy of the context, as Reflex runs each event in its own task.
    contextvars.copy_context().run(two_events)
    assert logs.current_request_id() is None


def test_a_reflex_event_carries_the_websockets_client() -> None:
    def events() -> None:
        logs.start_event(route="event:/chat", user_id=3, client_ip="203.0.113.7")
        assert logs.current_client_ip() == "203.0.113.7"
        logs.start_event(route="event:/chat", user_id=3, client_ip="")
        assert logs.current_client_ip() is None

    contextvars.copy_context().run(events)
    assert logs.current_client_ip() is None


def test_text_lines_carry_the_context_in_brackets() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain %d", (1,), None)
    with logs.request_scope(request_id="req_9", route="/healthz", generated=True, user_id=5):
        text = logs.TextFormatter().format(record)
    assert text.endswith("plain 1 [request_id=req_9 user_id=5 route=/healthz]")
    with logs.request_scope(
        request_id="req_9", route="/healthz", generated=True, client_ip="203.0.113.7"
    ):
        text = logs.TextFormatter().format(record)
    assert text.endswith("[request_id=req_9 route=/healthz client_ip=203.0.113.7]")
    assert logs.TextFormatter().format(record).endswith("plain 1")


@pytest.mark.parametrize(
    ("env", "fmt", "json_lines"),
    [("prod", None, True), ("dev", None, False), ("dev", "json", True), ("prod", "text", False)],
)
def test_configure_logging_picks_the_format(
    env: str, fmt: str | None, json_lines: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    chatty = {name: logging.getLogger(name).level for name in logs.CHATTY_LOGGERS}
    record_flags = {name: getattr(logging, name) for name in RECORD_FLAGS}
    settings = Settings(_env_file=None, AICREDITS_ENV=env, log_format=fmt, log_level="warning")
    try:
        logs.configure_logging(settings)
        logs.configure_logging(settings)  # again: replaces its handler, never doubles lines
        logging.getLogger("aicredits.test.configure").warning("configured")
        logging.getLogger("aicredits.test.configure").info("below the level")
        logging.getLogger("httpx").warning("configure: a client's warning still shows")
        logging.getLogger("httpx").info("configure: its per-request line does not")
    finally:
        for handler in root.handlers[:]:
            if handler not in before[0]:
                root.removeHandler(handler)
        root.setLevel(before[1])
        for name, level in chatty.items():
            logging.getLogger(name).setLevel(level)
        configured = {name: getattr(logging, name) for name in RECORD_FLAGS}
        for name, value in record_flags.items():
            setattr(logging, name, value)
    # What no formatter of ours shows is not looked up for every record.
    assert configured == dict.fromkeys(RECORD_FLAGS, None) | {
        "logThreads": False, "logProcesses": False, "logMultiprocessing": False,
    }  # fmt: skip
    written = [line for line in capsys.readouterr().err.splitlines() if "configure" in line]
    assert len(written) == 2
    if json_lines:
        assert [json.loads(line)["message"] for line in written] == [
            "configured",
            "configure: a client's warning still shows",
        ]
    else:
        assert written[0].endswith("aicredits.test.configure: configured")
        assert written[1].endswith("httpx: configure: a client's warning still shows")
