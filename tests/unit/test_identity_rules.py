"""Where a sign-in may land, who is an admin, what is stored of a token, cookie parsing."""

import pytest

from aicredits.domain.identity import is_admin, safe_next_path, token_hash
from aicredits.services.cookies import read_cookie


@pytest.mark.parametrize(
    "evil",
    [
        "//evil.example",
        "https://evil.example",
        "http://evil.example/chat",
        "/\\evil.example",
        "\\\\evil.example",
        "/\\/evil.example",
        "javascript:alert(1)",
        "chat",
        "/chat\r\nSet-Cookie: x=1",
        "/chat\x00",
        "//evil.example/%2F..",
        "/" + "a" * 600,
        "",
        None,
    ],
)
def test_next_never_leaves_the_site(evil: str | None) -> None:
    assert safe_next_path(evil) == "/chat"


@pytest.mark.parametrize("good", ["/chat", "/credits?tab=history", "/admin#users", "/"])
def test_next_keeps_relative_paths_on_this_site(good: str) -> None:
    assert safe_next_path(good) == good


def test_admins_come_from_the_list_and_need_a_verified_email() -> None:
    admins = ["Boss@Example.com", " ops@example.com "]
    assert is_admin("boss@example.com", email_verified=True, admin_emails=admins)
    assert is_admin("OPS@example.com", email_verified=True, admin_emails=admins)
    assert not is_admin("boss@example.com", email_verified=False, admin_emails=admins)
    assert not is_admin("someone@example.com", email_verified=True, admin_emails=admins)
    assert not is_admin(None, email_verified=True, admin_emails=admins)
    assert not is_admin("boss@example.com", email_verified=True, admin_emails=[])


def test_only_a_hash_of_a_token_is_stored() -> None:
    token = "secret-token-value"
    key = b"k" * 32
    stored = token_hash(token, key=key)
    assert token not in stored
    assert len(stored) == 64
    assert stored == token_hash(token, key=key)
    assert stored != token_hash(token + "x", key=key)


def test_the_stored_hash_depends_on_the_deployment_key() -> None:
    token = "secret-token-value"
    assert token_hash(token, key=b"one" * 11) != token_hash(token, key=b"two" * 11)
    with pytest.raises(ValueError, match="non-empty key"):
        token_hash(token, key=b"")


def test_cookie_header_parsing_survives_junk_from_other_cookies() -> None:
    header = 'junk; other="a b"; aicredits_session=abc123; x=; =y'
    assert read_cookie(header, "aicredits_session") == "abc123"
    assert read_cookie(header, "missing") is None
    assert read_cookie("", "aicredits_session") is None
    assert read_cookie(None, "aicredits_session") is None
    assert read_cookie("aicredits_session=", "aicredits_session") is None
