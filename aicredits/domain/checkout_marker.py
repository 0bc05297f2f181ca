"""The keyed marker the app writes into each Checkout Session it creates: who it is for,
which pack, a one-off nonce, and an HMAC of the three under a key only this app holds.

Anyone with access to the Stripe account (a payment link, the dashboard, a leaked API key)
can create a session and write any metadata into it; nobody without the key can write a
marker that checks out. Pure: the key is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

VERSION = "ac1"
# The metadata key the marker is written under.
METADATA_KEY = "aicredits_ref"
_MARKER = re.compile(r"^ac1\.([0-9]{1,18})\.([a-z0-9_-]{1,40})\.([0-9a-f]{32})\.([0-9a-f]{64})$")


@dataclass(frozen=True, slots=True)
class MarkerClaims:
    user_id: int
    pack_id: str
    nonce: str


def _mac(key: bytes, user_id: int, pack_id: str, nonce: str) -> str:
    message = f"{VERSION}.{user_id}.{pack_id}.{nonce}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def make_marker(key: bytes, *, user_id: int, pack_id: str, nonce: str) -> str:
    """The marker for one new session (`nonce`: 32 hex digits, fresh per session)."""
    return f"{VERSION}.{user_id}.{pack_id}.{nonce}.{_mac(key, user_id, pack_id, nonce)}"


def read_marker(key: bytes, text: str | None) -> MarkerClaims | None:
    """What a marker vouches for, or None when it is missing, malformed or forged. The MAC
    is compared in constant time."""
    found = _MARKER.match(text or "")
    if found is None:
        return None
    user_id, pack_id, nonce, mac = int(found[1]), found[2], found[3], found[4]
    if not hmac.compare_digest(mac, _mac(key, user_id, pack_id, nonce)):
        return None
    return MarkerClaims(user_id=user_id, pack_id=pack_id, nonce=nonce)
