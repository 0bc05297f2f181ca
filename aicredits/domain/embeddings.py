"""What an embeddings request may ask for, checked before anything is reserved.

Every field of OpenAI's embeddings request is supported: `input`, `model`, `dimensions`,
`encoding_format`, `user`; any other field is refused with UnsupportedParameter. Pure: the
input's tokens are counted by the caller, which knows the tokenizer and the model's limits.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from aicredits.domain.errors import (
    InvalidParameter,
    InvalidRequest,
    UnknownModel,
    UnsupportedParameter,
)

FIELDS = frozenset({"input", "model", "dimensions", "encoding_format", "user"})
ENCODING_FORMATS = ("float", "base64")
MAX_DIMENSIONS = 65_536
MAX_USER_CHARS = 512


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    # Each input: a text, or the token ids of one.
    inputs: list[str] | list[list[int]]
    # Whether `input` was a list (one input is sent, and answered, as it was given).
    batched: bool = False
    encoding_format: str = "float"
    # Forwarded as they are: dimensions, user.
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def upstream_input(self) -> str | list[str] | list[int] | list[list[int]]:
        if self.batched:
            return self.inputs
        return self.inputs[0]


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _inputs(raw: Any) -> tuple[list[str] | list[list[int]], bool]:
    if isinstance(raw, str):
        if not raw:
            raise InvalidParameter("input must not be an empty string", param="input")
        return [raw], False
    if _is_token_ids(raw):
        return [raw], False
    if isinstance(raw, list) and raw:
        if all(isinstance(item, str) and item for item in raw):
            return list(raw), True
        if all(_is_token_ids(item) for item in raw):
            return [list(item) for item in raw], True
    raise InvalidParameter(
        "input must be a non-empty string, a list of non-empty strings, a list of token ids, "
        "or a list of lists of token ids",
        param="input",
    )


def parse_embedding_request(body: Any, *, models: Collection[str]) -> EmbeddingRequest:
    """Validate an OpenAI-style embeddings body."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required")
    if model not in models:
        raise UnknownModel(
            f"embedding model {model!r} is not offered here; available: "
            f"{', '.join(sorted(models)) or 'none'}"
        )
    for name, value in body.items():
        if name not in FIELDS and value is not None:
            raise UnsupportedParameter(
                f"{name} is not an embeddings parameter this service supports", param=name
            )
    inputs, batched = _inputs(body.get("input"))
    params: dict[str, Any] = {}
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if (
            not isinstance(dimensions, int)
            or isinstance(dimensions, bool)
            or not 1 <= dimensions <= MAX_DIMENSIONS
        ):
            raise InvalidParameter(
                f"dimensions must be a whole number from 1 to {MAX_DIMENSIONS}",
                param="dimensions",
            )
        params["dimensions"] = dimensions
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str) or len(user) > MAX_USER_CHARS:
            raise InvalidParameter(
                f"user must be a string of at most {MAX_USER_CHARS} characters", param="user"
            )
        params["user"] = user
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise InvalidParameter("encoding_format must be float or base64", param="encoding_format")
    return EmbeddingRequest(
        model=model,
        inputs=inputs,
        batched=batched,
        encoding_format=encoding_format,
        params=params,
    )
