"""domain.digest: what makes two requests under one Idempotency-Key the same request."""

from __future__ import annotations

from aicredits.domain.chat import ChatRequest
from aicredits.domain.digest import request_digest

HELLO = [{"role": "user", "content": "Hello"}]


def test_the_same_request_has_the_same_digest_whatever_its_key_order() -> None:
    one = ChatRequest(model="m", messages=HELLO, params={"temperature": 0.2, "top_p": 1})
    two = ChatRequest(model="m", messages=HELLO, params={"top_p": 1, "temperature": 0.2})
    assert request_digest(one) == request_digest(two)
    assert len(request_digest(one)) == 64


def test_any_field_that_differs_makes_another_request() -> None:
    base = ChatRequest(model="m", messages=HELLO)
    others = [
        ChatRequest(model="n", messages=HELLO),
        ChatRequest(model="m", messages=[{"role": "user", "content": "Hellp"}]),
        ChatRequest(model="m", messages=HELLO, max_tokens=5),
        ChatRequest(model="m", messages=HELLO, stream=True),
        ChatRequest(model="m", messages=HELLO, n=2),
        ChatRequest(model="m", messages=HELLO, params={"temperature": 0}),
    ]
    digests = {request_digest(r) for r in [base, *others]}
    assert len(digests) == len(others) + 1
