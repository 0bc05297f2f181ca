"""What makes two API requests the same request, for an Idempotency-Key: the SHA-256 of the
request as parsed (every field, the messages or inputs and the parameters passed on), in
JSON with sorted keys, so the same body sent again matches whatever its key order or
spacing, and a body differing in anything does not."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def request_digest(request: Any) -> str:
    """The digest of a parsed request (a dataclass: domain.chat.ChatRequest,
    domain.embeddings.EmbeddingRequest), 64 hex characters."""
    canonical = json.dumps(
        dataclasses.asdict(request),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=repr,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
