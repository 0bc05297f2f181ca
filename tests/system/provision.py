"""Make users with balances, API keys and sessions through the app's own services.

Run by tests/system/harness.py as `python -m tests.system.provision LABEL '[credits, ...]'`
with the app's environment, so keys and session tokens are hashed exactly as the app under
test hashes them. Prints one JSON object per user.
"""

from __future__ import annotations

import json
import sys
import uuid

from aicredits.adapters.db import Database
from aicredits.services import api_keys, auth, ledger, users
from aicredits.settings import get_settings


def main(argv: list[str]) -> int:
    label, credits_json = argv
    credits: list[int] = json.loads(credits_json)
    settings = get_settings()
    db = Database(settings.database_url)
    made = []
    try:
        for i, amount in enumerate(credits):
            email = f"{label}-{i}-{uuid.uuid4().hex[:6]}@example.test"
            user = users.create_user(db, email=email, name=f"{label} {i}", email_verified=True)
            if amount:
                ledger.grant(
                    db,
                    user_id=user.id,
                    credits=amount,
                    key=f"system-test:{label}:{user.id}",
                    reason="system test balance",
                    actor="system-test",
                )
            key = api_keys.create_api_key(db, user_id=user.id, name=label)
            session = auth.create_session(db, user_id=user.id, days=1)
            made.append(
                {
                    "user_id": user.id,
                    "email": email,
                    "api_key": key.secret,
                    "session": session,
                    "credits": amount,
                }
            )
    finally:
        db.dispose()
    print(json.dumps(made))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
