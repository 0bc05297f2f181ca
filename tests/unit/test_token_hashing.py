"""The key behind stored token hashes: SESSION_SECRET, or a development secret made once."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aicredits.adapters.local_secret import load_or_create_secret
from aicredits.domain.identity import token_hash
from aicredits.services import token_hashing
from aicredits.settings import Settings, get_settings


@pytest.fixture
def dev_secret_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "data" / "session_secret"
    monkeypatch.setattr(token_hashing, "DEV_SESSION_SECRET_PATH", path)
    token_hashing._dev_key.cache_clear()
    yield path
    token_hashing._dev_key.cache_clear()


def test_session_secret_is_the_key() -> None:
    settings = Settings(_env_file=None, session_secret="s" * 40)
    assert token_hashing.hashing_key(settings) == b"s" * 40


def test_development_makes_a_private_secret_once_and_reuses_it(dev_secret_path: Path) -> None:
    settings = Settings(_env_file=None, AICREDITS_ENV="dev", session_secret="")
    first = token_hashing.hashing_key(settings)
    assert dev_secret_path.read_text().strip().encode() == first
    assert len(first) == 64
    assert stat.S_IMODE(dev_secret_path.stat().st_mode) == 0o600
    token_hashing._dev_key.cache_clear()  # as a new process would
    assert token_hashing.hashing_key(settings) == first


def test_production_without_a_session_secret_has_no_key(dev_secret_path: Path) -> None:
    settings = Settings(_env_file=None, AICREDITS_ENV="prod", session_secret="")
    with pytest.raises(RuntimeError, match="SESSION_SECRET"):
        token_hashing.hashing_key(settings)
    assert not dev_secret_path.exists()


def test_processes_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "session_secret"
    with ThreadPoolExecutor(max_workers=16) as pool:
        made = set(pool.map(lambda _: load_or_create_secret(path), range(64)))
    assert made == {path.read_text().strip()}
    assert [p.name for p in tmp_path.iterdir()] == ["session_secret"]  # no staging files left


def test_stored_hashes_follow_the_configured_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        monkeypatch.setenv("SESSION_SECRET", "a" * 40)
        get_settings.cache_clear()
        under_a = token_hashing.hash_token("tok")
        monkeypatch.setenv("SESSION_SECRET", "b" * 40)
        get_settings.cache_clear()
        under_b = token_hashing.hash_token("tok")
    finally:
        get_settings.cache_clear()
    assert under_a == token_hash("tok", key=b"a" * 40)
    assert under_b == token_hash("tok", key=b"b" * 40)
    assert under_a != under_b
