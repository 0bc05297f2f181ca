"""The fake upstream's prompt markers (`[fake fault=cut:3]`): per-request faults for callers
that cannot set headers, such as the chat page or the app's own /v1 API in front of it."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.test_fake_upstream import (
    MODEL,
    Upstream,
    content_of,
    serve,  # noqa: F401 - the fixture `upstream` needs
    stream_chunks,
    the_request,
    upstream,  # noqa: F401 - a fixture
)


def said(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def test_a_fault_marker_fails_only_its_own_request(upstream: Upstream) -> None:  # noqa: F811
    client = upstream.client()
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=said("hello [fake fault=500]"))
    ok = client.chat.completions.create(model=MODEL, messages=said("hello"))
    assert ok.usage is not None and ok.usage.completion_tokens == 12


def test_a_cut_marker_cuts_the_stream_after_that_many_tokens(
    upstream: Upstream,  # noqa: F811
) -> None:
    client = upstream.client()
    with pytest.raises(openai.APIError):
        stream_chunks(client, extra_body={"messages": said("go [fake fault=cut:4]")})
    record = the_request(upstream)
    assert (record["fault"], record["tokens_sent"], record["completed"]) == ("cut:4", 4, False)


def test_markers_set_reply_tokens_and_headers_still_win(upstream: Upstream) -> None:  # noqa: F811
    client = upstream.client()
    chunks = stream_chunks(client, extra_body={"messages": said("[fake reply-tokens=5] hi")})
    assert len(content_of(chunks)) == 5
    completion = client.chat.completions.create(
        model=MODEL,
        messages=said("[fake reply-tokens=5] [fake fault=500]"),
        extra_headers={"X-Fake-Fault": "none", "X-Fake-Reply-Tokens": "7"},
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 7


@pytest.mark.parametrize(
    "marker", ["[fake fault=explode]", "[fake colour=red]", "[fake latency-ms=x]"]
)
def test_a_bad_marker_is_refused_with_400(upstream: Upstream, marker: str) -> None:  # noqa: F811
    with pytest.raises(openai.BadRequestError):
        upstream.client().chat.completions.create(model=MODEL, messages=said(marker))


def test_only_the_last_message_s_markers_count(upstream: Upstream) -> None:  # noqa: F811
    # A conversation sends its history again: an earlier turn's fault must not recur.
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "first [fake fault=cut:2]"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "second"},
    ]
    completion = upstream.client().chat.completions.create(model=MODEL, messages=messages)
    assert completion.usage is not None and completion.usage.completion_tokens == 12
