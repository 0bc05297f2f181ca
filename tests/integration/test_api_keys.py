"""Personal API keys on SQLite and Postgres: made, listed, revoked, resolved, and what is kept
of them (only a hash and a prefix)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import api_keys, users, utcnow
from aicredits.domain.errors import InvalidRequest
from aicredits.services import api_keys as keys
from aicredits.services import users as users_service
from aicredits.services.api_keys import UnknownApiKey
from aicredits.services.auth import LAST_USED_GRANULARITY, create_session, resolve_session
from aicredits.services.token_hashing import hash_token
from aicredits.settings import get_settings
from tests.factories import make_user


def _rows(db: Database) -> list[dict[str, object]]:
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(api_keys)).all()]


def _resolve(db: Database, secret: str | None) -> int | None:
    user = keys.resolve_api_key(db, get_settings(), secret)
    return None if user is None else user.id


def test_a_new_key_resolves_to_its_user(db: Database) -> None:
    email = "keys-owner@example.test"
    user_id = make_user(db, email=email)
    new = keys.create_api_key(db, user_id=user_id, name="  laptop script  ")
    assert new.secret.startswith("aic_")
    assert len(new.secret) == keys.KEY_LENGTH
    assert new.key.name == "laptop script"
    assert new.key.prefix == new.secret[:12]
    assert new.key.created_at.tzinfo is not None
    assert new.key.last_used_at is None and new.key.revoked_at is None
    assert new.secret not in repr(new)

    user = keys.resolve_api_key(db, get_settings(), new.secret)
    assert user is not None
    assert (user.id, user.email, user.is_admin) == (user_id, email, False)


def test_an_admin_key_resolves_as_admin(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_EMAILS", "keys-admin@example.test")
    get_settings.cache_clear()
    try:
        admin = users_service.create_user(db, email="keys-admin@example.test", email_verified=True)
        unverified = users_service.create_user(db, email="keys-admin@example.test")
        for user_id, expected in ((admin.id, True), (unverified.id, False)):
            secret = keys.create_api_key(db, user_id=user_id, name="k").secret
            user = keys.resolve_api_key(db, get_settings(), secret)
            assert user is not None and user.is_admin is expected
    finally:
        get_settings.cache_clear()


def test_only_the_hash_and_the_prefix_are_stored(db: Database) -> None:
    user_id = make_user(db)
    secret = keys.create_api_key(db, user_id=user_id, name="ci").secret
    (row,) = _rows(db)
    assert row["key_hash"] == hash_token(secret)
    assert row["prefix"] == secret[:12]
    for value in row.values():
        assert secret not in str(value)
        assert secret[12:] not in str(value)  # no part of the secret beyond the prefix


def test_keys_are_listed_per_user_newest_first(db: Database) -> None:
    alice, bob = make_user(db), make_user(db)
    start = utcnow()
    made = [
        keys.create_api_key(db, user_id=alice, name=f"a{i}", now=start + timedelta(seconds=i))
        for i in range(3)
    ]
    keys.create_api_key(db, user_id=bob, name="b0")
    keys.revoke_api_key(db, user_id=alice, key_id=made[0].key.id)

    listed = keys.list_api_keys(db, user_id=alice)
    assert [k.name for k in listed] == ["a2", "a1", "a0"]
    assert listed[2].revoked_at is not None  # revoked keys are still listed
    assert [k.name for k in keys.list_api_keys(db, user_id=bob)] == ["b0"]
    assert keys.list_api_keys(db, user_id=make_user(db)) == []


def test_revoking_stops_resolution_at_once_and_is_idempotent(db: Database) -> None:
    user_id = make_user(db)
    new = keys.create_api_key(db, user_id=user_id, name="k")
    other = keys.create_api_key(db, user_id=user_id, name="other")
    assert _resolve(db, new.secret) == user_id

    revoked = keys.revoke_api_key(db, user_id=user_id, key_id=new.key.id)
    assert revoked.revoked_at is not None
    assert _resolve(db, new.secret) is None
    assert _resolve(db, other.secret) == user_id  # only that key

    again = keys.revoke_api_key(db, user_id=user_id, key_id=new.key.id)
    assert again == revoked  # the first revocation time stands
    assert _resolve(db, new.secret) is None


def test_another_users_key_cannot_be_revoked(db: Database) -> None:
    owner, intruder = make_user(db), make_user(db)
    new = keys.create_api_key(db, user_id=owner, name="mine")
    before = _rows(db)
    with pytest.raises(UnknownApiKey):
        keys.revoke_api_key(db, user_id=intruder, key_id=new.key.id)
    assert _rows(db) == before
    assert _resolve(db, new.secret) == owner


@pytest.mark.parametrize("key_id", [0, -1, 999_999, 2**31, 2**63])
def test_revoking_a_key_that_does_not_exist_is_unknown(db: Database, key_id: int) -> None:
    user_id = make_user(db)
    with pytest.raises(UnknownApiKey):
        keys.revoke_api_key(db, user_id=user_id, key_id=key_id)


@pytest.mark.parametrize("name", ["", "   ", "\t\n", "x" * 61, "two\nlines"])
def test_blank_long_or_multiline_names_are_refused(db: Database, name: str) -> None:
    user_id = make_user(db)
    with pytest.raises(InvalidRequest) as refused:
        keys.create_api_key(db, user_id=user_id, name=name)
    assert "name" in str(refused.value)
    assert _rows(db) == []


def test_a_sixty_character_name_is_accepted(db: Database) -> None:
    user_id = make_user(db)
    new = keys.create_api_key(db, user_id=user_id, name=" " + "x" * 60 + " ")
    assert new.key.name == "x" * 60


def test_the_twenty_first_active_key_is_refused(db: Database) -> None:
    user_id = make_user(db)
    made = [
        keys.create_api_key(db, user_id=user_id, name=f"k{i}") for i in range(keys.MAX_ACTIVE_KEYS)
    ]
    with pytest.raises(InvalidRequest, match="20 active keys"):
        keys.create_api_key(db, user_id=user_id, name="one too many")
    assert len(_rows(db)) == keys.MAX_ACTIVE_KEYS
    # Another user is not limited by this one's keys.
    keys.create_api_key(db, user_id=make_user(db), name="elsewhere")
    # Revoking one frees a place.
    keys.revoke_api_key(db, user_id=user_id, key_id=made[0].key.id)
    keys.create_api_key(db, user_id=user_id, name="replacement")


def test_malformed_unknown_and_tampered_keys_resolve_to_nothing(db: Database) -> None:
    user_id = make_user(db)
    secret = keys.create_api_key(db, user_id=user_id, name="k").secret
    last = "A" if secret[-1] != "A" else "B"
    body = secret.removeprefix("aic_")
    candidates = [
        None,
        "",
        "aic_",
        body,  # no prefix
        "sk-" + body,  # another prefix
        "AIC_" + body,
        secret[:-1],  # too short
        secret + "A",  # too long
        secret + "x" * 200,
        "aic_" + "x" * 300,
        secret[:-1] + last,  # tampered
        " " + secret,
        secret + "\n",
        "aic_" + body[:-1] + "=",  # outside the alphabet
        keys.KEY_PREFIX + "A" * 43,  # well formed, unknown
    ]
    for candidate in candidates:
        assert _resolve(db, candidate) is None, candidate
    assert _resolve(db, secret) == user_id  # the control


def test_suspending_a_user_revokes_their_keys(db: Database) -> None:
    user_id, other = make_user(db), make_user(db)
    secrets_ = [keys.create_api_key(db, user_id=user_id, name=f"k{i}").secret for i in range(2)]
    kept = keys.create_api_key(db, user_id=other, name="other").secret
    users_service.set_suspended(db, user_id=user_id, suspended=True)
    assert [_resolve(db, s) for s in secrets_] == [None, None]
    assert all(k.revoked_at is not None for k in keys.list_api_keys(db, user_id=user_id))
    assert _resolve(db, kept) == other

    # Restoring the user does not bring the keys back; new ones work.
    users_service.set_suspended(db, user_id=user_id, suspended=False)
    assert [_resolve(db, s) for s in secrets_] == [None, None]
    assert _resolve(db, keys.create_api_key(db, user_id=user_id, name="new").secret) == user_id


def test_a_suspended_users_keys_do_not_resolve_even_if_unrevoked(db: Database) -> None:
    # Suspension by a direct UPDATE (not set_suspended): resolution still checks the user.
    user_id = make_user(db)
    secret = keys.create_api_key(db, user_id=user_id, name="k").secret
    with db.transaction() as conn:
        conn.execute(sa.update(users).where(users.c.id == user_id).values(is_suspended=True))
    assert _resolve(db, secret) is None
    with pytest.raises(InvalidRequest, match="suspended"):
        keys.create_api_key(db, user_id=user_id, name="k2")


def test_suspension_revokes_keys_in_the_same_transaction_as_the_sessions(db: Database) -> None:
    user_id = make_user(db)
    secret = keys.create_api_key(db, user_id=user_id, name="k").secret
    token = create_session(db, user_id=user_id, days=1)
    users_service.set_suspended(db, user_id=user_id, suspended=True)
    assert resolve_session(db, get_settings(), token) is None
    with db.read() as conn:
        key_revoked = conn.execute(sa.select(api_keys.c.revoked_at)).scalar_one()
    assert key_revoked is not None
    assert _resolve(db, secret) is None


def test_revoke_all(db: Database) -> None:
    user_id, other = make_user(db), make_user(db)
    made = [keys.create_api_key(db, user_id=user_id, name=f"k{i}") for i in range(3)]
    kept = keys.create_api_key(db, user_id=other, name="other")
    keys.revoke_api_key(db, user_id=user_id, key_id=made[0].key.id)
    assert keys.revoke_all_api_keys(db, user_id=user_id) == 2
    assert keys.revoke_all_api_keys(db, user_id=user_id) == 0
    assert all(_resolve(db, m.secret) is None for m in made)
    assert _resolve(db, kept.secret) == other


def test_last_used_is_recorded_at_most_every_few_minutes(db: Database) -> None:
    user_id = make_user(db)
    new = keys.create_api_key(db, user_id=user_id, name="k")
    settings = get_settings()

    def last_used() -> object:
        (view,) = keys.list_api_keys(db, user_id=user_id)
        return view.last_used_at

    t0 = utcnow()
    assert keys.resolve_api_key(db, settings, new.secret, now=t0) is not None
    assert last_used() == t0
    soon = t0 + LAST_USED_GRANULARITY - timedelta(seconds=1)
    assert keys.resolve_api_key(db, settings, new.secret, now=soon) is not None
    assert last_used() == t0  # not written again so soon
    later = t0 + LAST_USED_GRANULARITY + timedelta(seconds=1)
    assert keys.resolve_api_key(db, settings, new.secret, now=later) is not None
    assert last_used() == later
    with db.read() as conn:
        seen = conn.execute(sa.select(users.c.last_seen_at).where(users.c.id == user_id))
        assert seen.scalar_one() == later
