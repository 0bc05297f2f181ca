"""Small factories: a user with a balance, a priced model."""

from __future__ import annotations

import itertools
import uuid

from aicredits.adapters.db import Database
from aicredits.services import ledger, users

_counter = itertools.count(1)


def make_user(db: Database, *, credits: int = 0, email: str | None = None) -> int:
    n = next(_counter)
    user = users.create_user(db, email=email or f"user{n}-{uuid.uuid4().hex[:6]}@example.test")
    if credits:
        ledger.grant(
            db, user_id=user.id, credits=credits, key=f"test-grant:{uuid.uuid4()}", reason="test"
        )
    return user.id


def new_key(prefix: str = "k") -> str:
    return f"{prefix}:{uuid.uuid4()}"
