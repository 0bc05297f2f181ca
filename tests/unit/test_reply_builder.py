"""A reply as delivered: the pieces of every choice merged, and what of it is billable."""

from __future__ import annotations

from aicredits.adapters.upstream import normalise_usage
from aicredits.domain.reply import ReplyBuilder


def test_tool_call_pieces_merge_into_whole_calls() -> None:
    reply = ReplyBuilder()
    head = {"index": 0, "id": "call_1", "type": "function"}
    reply.add(index=0, tool_calls=[{**head, "function": {"name": "get", "arguments": ""}}])
    reply.add(index=0, tool_calls=[{"index": 0, "function": {"arguments": '{"city"'}}])
    reply.add(index=0, tool_calls=[{"index": 1, "id": "call_2", "function": {"name": "put"}}])
    reply.add(index=0, tool_calls=[{"index": 0, "function": {"arguments": ': "Oslo"}'}}])
    (choice,) = reply.choices({0: "tool_calls"})
    assert choice.content == ""
    assert choice.finish_reason == "tool_calls"
    assert [c["function"] for c in choice.tool_calls] == [
        {"name": "get", "arguments": '{"city": "Oslo"}'},
        {"name": "put", "arguments": ""},
    ]
    assert [c["id"] for c in choice.tool_calls] == ["call_1", "call_2"]
    assert reply.billable_texts() == ["get", '{"city": "Oslo"}', "put"]
    assert reply.delivered and reply.text == ""


def test_every_choice_counts_and_the_first_is_the_text() -> None:
    reply = ReplyBuilder(3)
    reply.add(index=0, text="a b")
    reply.add(index=2, text="c")
    reply.add(index=1, refusal="no")
    reply.add(index=0, text=" d")
    assert reply.text == "a b d"
    assert reply.billable_texts() == ["a b d", "no", "c"]
    choices = reply.choices({0: "stop", 1: "stop", 2: "length"})
    assert [(c.index, c.content, c.refusal, c.finish_reason) for c in choices] == [
        (0, "a b d", None, "stop"),
        (1, "", "no", "stop"),
        (2, "c", None, "length"),
    ]
    assert reply.chars == len("a b") + len("c") + len("no") + len(" d")


def test_log_probabilities_are_gathered_per_choice() -> None:
    reply = ReplyBuilder()
    first = {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}
    second = {"token": "b", "logprob": -0.2, "bytes": [98], "top_logprobs": []}
    reply.add(index=0, text="a", logprobs={"content": [first]})
    reply.add(index=0, text="b", logprobs={"content": [second]})
    (choice,) = reply.choices()
    assert choice.logprobs == {"content": [first, second], "refusal": None}
    assert ReplyBuilder().choices()[0].logprobs is None


def test_reasoning_tokens_are_output_whichever_way_the_provider_counts_them() -> None:
    openai_style = normalise_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 50,
            "total_tokens": 60,
            "completion_tokens_details": {"reasoning_tokens": 30},
        }
    )
    assert openai_style is not None
    assert (openai_style.output_tokens, openai_style.reasoning_tokens) == (50, 30)
    # A provider that leaves reasoning out of completion_tokens still counts it in the total.
    apart = normalise_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "total_tokens": 60,
            "completion_tokens_details": {"reasoning_tokens": 30},
        }
    )
    assert apart is not None and apart.output_tokens == 50
