"""The keyed marker in each Checkout Session the app creates: only the key makes one that
checks, and no part of it can be changed."""

from __future__ import annotations

import pytest

from aicredits.domain.checkout_marker import MarkerClaims, make_marker, read_marker

KEY = b"k" * 32
NONCE = "0123456789abcdef" * 2


def test_a_marker_vouches_for_its_user_and_pack() -> None:
    marker = make_marker(KEY, user_id=42, pack_id="starter", nonce=NONCE)
    assert read_marker(KEY, marker) == MarkerClaims(user_id=42, pack_id="starter", nonce=NONCE)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.replace("ac1.42.", "ac1.43.", 1),  # another user
        lambda m: m.replace(".starter.", ".plus.", 1),  # another pack
        lambda m: m[:-1] + ("0" if m[-1] != "0" else "1"),  # the MAC
        lambda m: m.replace(NONCE, "f" * 32, 1),  # the nonce
        lambda m: m.upper(),
        lambda m: m + "0",
        lambda m: "",
    ],
)
def test_a_changed_marker_does_not_check(change: object) -> None:
    marker = make_marker(KEY, user_id=42, pack_id="starter", nonce=NONCE)
    assert callable(change)
    assert read_marker(KEY, change(marker)) is None


def test_a_marker_made_with_another_key_does_not_check() -> None:
    forged = make_marker(b"x" * 32, user_id=42, pack_id="starter", nonce=NONCE)
    assert read_marker(KEY, forged) is None
    assert read_marker(KEY, None) is None
