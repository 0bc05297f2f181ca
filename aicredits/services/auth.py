"""Sign-in and sessions: the OAuth code flow's two ends, accounts, and server-side sessions.

* A sign-in starts with a LoginAttempt row: the state (stored hashed), a PKCE verifier, a
  nonce and the destination, bound to the starting browser by a cookie whose hash is stored.
  The callback claims the row with one conditional UPDATE, so a state works once, only in
  that browser, only for that provider, and only for ten minutes.
* The first sign-in creates the user, their credit account and their free trial, unless
  the client's address already had its trials for the day (TRIALS_PER_ADDRESS_PER_DAY; see
  services/trials.py): then the account is created without it, for good. Another provider
  with the same verified email signs in as the same user. Unverified emails are refused
  outright, so they can never link to anyone.
* A session is a random token in a cookie; the database keeps its SHA-256, expiry and last
  use. Every request resolves it again, so sign-out and suspension apply at once.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters import oauth
from aicredits.adapters.db import Database
from aicredits.adapters.oauth import Provider, ProviderIdentity
from aicredits.adapters.tables import (
    auth_sessions,
    credit_accounts,
    identities,
    ledger_entries,
    login_attempts,
    users,
    utcnow,
)
from aicredits.domain.errors import AICreditsError, IdempotencyConflict
from aicredits.domain.identity import is_admin, normalise_email, safe_next_path
from aicredits.domain.trials import is_loopback
from aicredits.services import ledger, trials
from aicredits.services.token_hashing import hash_token
from aicredits.settings import Settings

logger = logging.getLogger(__name__)

LOGIN_TTL = timedelta(minutes=10)
# Writing last_used_at on every request would turn every read into a write.
LAST_USED_GRANULARITY = timedelta(minutes=5)


class SignInError(AICreditsError):
    """A sign-in that cannot complete. `message` is safe to show."""

    code = "sign_in_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownProvider(SignInError):
    code = "unknown_provider"


class InvalidLoginState(SignInError):
    code = "invalid_state"


class ProviderDenied(SignInError):
    code = "provider_denied"


class ProviderRejected(SignInError):
    code = "provider_rejected"


class InvalidIdentityToken(SignInError):
    code = "invalid_id_token"


class EmailNotVerified(SignInError):
    code = "email_not_verified"


class AccountSuspended(SignInError):
    code = "account_suspended"


@dataclass(frozen=True, slots=True)
class CurrentUser:
    id: int
    email: str | None
    name: str
    avatar_url: str | None
    is_admin: bool


@dataclass(frozen=True, slots=True)
class LoginStart:
    authorization_url: str
    binder: str  # goes into a cookie; binds the attempt to this browser


@dataclass(frozen=True, slots=True)
class SignedIn:
    session_token: str
    next_path: str
    user: CurrentUser
    created: bool


def sign_in_providers(settings: Settings) -> list[Provider]:
    """Who a visitor can sign in with here: the configured providers, or Dev sign-in."""
    return oauth.sign_in_providers(settings)


def dev_sign_in(settings: Settings) -> bool:
    """Whether the local Dev sign-in is offered (development with no real provider)."""
    return any(p.name == "dev" for p in oauth.sign_in_providers(settings))


def find_provider(settings: Settings, name: str) -> Provider:
    for provider in oauth.sign_in_providers(settings):
        if provider.name == name:
            return provider
    raise UnknownProvider(f"There is no sign-in provider called {name!r} here.")


def redirect_uri(settings: Settings, provider: Provider) -> str:
    # Exactly this URL is registered with the provider and sent in both legs of the flow.
    return f"{settings.api_url}/auth/callback/{provider.name}"


async def start_login(
    db: Database, settings: Settings, *, provider_name: str, next_path: str | None
) -> LoginStart:
    provider = find_provider(settings, provider_name)
    now = utcnow()
    state, nonce, binder = (secrets.token_urlsafe(32) for _ in range(3))
    verifier = secrets.token_urlsafe(64)  # 86 characters, within PKCE's 43..128
    try:
        url = await oauth.authorization_url(
            provider,
            redirect_uri=redirect_uri(settings, provider),
            state=state,
            nonce=nonce,
            code_verifier=verifier,
        )
    except oauth.ProviderFailure as exc:
        raise ProviderRejected(
            f"{provider.label} cannot be reached right now. Please try again in a moment."
        ) from exc
    with db.transaction() as conn:
        conn.execute(
            sa.insert(login_attempts).values(
                state_hash=hash_token(state),
                binder_hash=hash_token(binder),
                provider=provider.name,
                code_verifier=verifier,
                nonce=nonce,
                next_path=safe_next_path(next_path),
                created_at=now,
                expires_at=now + LOGIN_TTL,
            )
        )
    return LoginStart(authorization_url=url, binder=binder)


async def finish_login(
    db: Database,
    settings: Settings,
    *,
    provider_name: str,
    state: str | None,
    code: str | None,
    error: str | None,
    binder: str | None,
    user_agent: str = "",
    client_address: str | None = None,
) -> SignedIn:
    provider = find_provider(settings, provider_name)
    now = utcnow()
    if error:
        # An error answer creates nothing, so it needs no valid state (some providers omit
        # it); a state it does carry is spent so it cannot be used afterwards.
        if state and binder:
            with contextlib.suppress(InvalidLoginState):
                _claim_attempt(db, provider.name, state, binder, now)
        raise ProviderDenied(
            f"{provider.label} did not sign you in ({error[:100]}). Nothing was changed."
        )
    attempt = _claim_attempt(db, provider.name, state, binder, now)
    if not code:
        raise ProviderRejected(f"{provider.label} sent no authorization code.")
    try:
        identity = await oauth.fetch_identity(
            provider,
            redirect_uri=redirect_uri(settings, provider),
            code=code,
            code_verifier=attempt.code_verifier,
            nonce=attempt.nonce,
        )
    except oauth.InvalidIdToken as exc:
        raise InvalidIdentityToken(
            f"{provider.label}'s answer could not be verified, so you were not signed in."
        ) from exc
    except oauth.ProviderFailure as exc:
        raise ProviderRejected(
            f"{provider.label} did not accept this sign-in (the code was invalid, expired "
            "or already used). Please start again."
        ) from exc
    if not identity.email or not identity.email_verified:
        raise EmailNotVerified(
            f"Your {provider.label} account has no verified email address. Verify it with "
            f"{provider.label}, then sign in again."
        )
    user_id, created = sign_in_identity(
        db,
        provider=provider.name,
        identity=identity,
        now=now,
        client_address=client_address,
        trial_limit=trial_limit(settings, client_address),
    )
    ensure_trial_grant(db, settings, user_id=user_id, now=now)
    token = create_session(
        db, user_id=user_id, days=settings.session_days, user_agent=user_agent, now=now
    )
    user = _current_user(db, settings, user_id)
    return SignedIn(session_token=token, next_path=attempt.next_path, user=user, created=created)


_STALE_LOGIN = (
    "This sign-in link was already used, has expired, or was started in another browser. "
    "Please start again."
)


@dataclass(frozen=True, slots=True)
class _Attempt:
    code_verifier: str
    nonce: str
    next_path: str


def _claim_attempt(
    db: Database, provider: str, state: str | None, binder: str | None, now: datetime
) -> _Attempt:
    """Use a login attempt exactly once, from the browser that started it, before it expires."""
    if not state or not binder:
        raise InvalidLoginState(_STALE_LOGIN)
    with db.transaction() as conn:
        row = conn.execute(
            sa.update(login_attempts)
            .where(
                login_attempts.c.state_hash == hash_token(state),
                login_attempts.c.binder_hash == hash_token(binder),
                login_attempts.c.provider == provider,
                login_attempts.c.used_at.is_(None),
                login_attempts.c.expires_at > now,
            )
            .values(used_at=now)
            .returning(
                login_attempts.c.code_verifier, login_attempts.c.nonce, login_attempts.c.next_path
            )
        ).first()
    if row is None:
        raise InvalidLoginState(_STALE_LOGIN)
    return _Attempt(code_verifier=row.code_verifier, nonce=row.nonce, next_path=row.next_path)


# --- accounts -------------------------------------------------------------------------------


def trial_limit(settings: Settings, client_address: str | None = None) -> int:
    """New accounts with a trial per address per day; 0 when nothing is limited (no limit
    set, no trial to give, or in development a sign-up from this machine itself: there every
    account a developer makes comes from 127.0.0.1)."""
    if settings.free_trial_credits <= 0:
        return 0
    if settings.environment == "dev" and is_loopback(client_address):
        return 0
    return settings.trials_per_address_per_day


def sign_in_identity(
    db: Database,
    *,
    provider: str,
    identity: ProviderIdentity,
    now: datetime | None = None,
    client_address: str | None = None,
    trial_limit: int = 0,
) -> tuple[int, bool]:
    """The user this provider identity signs in as: known, linked by verified email, or new.

    A new user counts against `client_address`'s free trials for the day when `trial_limit`
    is set (in the same transaction), and past it is created without the trial.
    Returns (user id, created). Refuses unverified emails and suspended users.
    """
    now = now or utcnow()
    email = normalise_email(identity.email)
    if not email or not identity.email_verified:
        raise EmailNotVerified("A verified email address is required to sign in.")
    for attempt in range(2):
        try:
            with db.transaction() as conn:
                user_id, created = _find_or_create(
                    db, conn, provider, identity, email, now, client_address, trial_limit
                )
                suspended = conn.execute(
                    sa.select(users.c.is_suspended).where(users.c.id == user_id)
                ).scalar_one()
                if suspended:
                    raise AccountSuspended(
                        "This account is suspended. Contact the operator of this site."
                    )
                return user_id, created
        except sa.exc.IntegrityError:
            # Another sign-in with the same identity or email won a race; the second pass
            # finds what it created.
            if attempt == 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _find_or_create(
    db: Database,
    conn: Connection,
    provider: str,
    identity: ProviderIdentity,
    email: str,
    now: datetime,
    client_address: str | None,
    trial_limit: int,
) -> tuple[int, bool]:
    known = conn.execute(
        sa.select(identities.c.id, identities.c.user_id).where(
            identities.c.provider == provider, identities.c.subject == identity.subject
        )
    ).first()
    if known is not None:
        conn.execute(
            sa.update(identities)
            .where(identities.c.id == known.id)
            .values(email=email, email_verified=True, last_sign_in_at=now)
        )
        _refresh_profile(conn, known.user_id, identity)
        return known.user_id, False

    linked = conn.execute(
        sa.select(users.c.id).where(users.c.email == email, users.c.email_verified.is_(True))
    ).first()
    created = linked is None
    if linked is None:
        withheld: dict[str, object] = {}
        if trial_limit > 0:
            claim = trials.claim_trial(
                db, conn, client_address=client_address, limit=trial_limit, now=now
            )
            if not claim.granted:
                withheld = {"trial_withheld_at": now, "trial_withheld_others": claim.others}
                logger.info(
                    "new account without the free trial: %d accounts from %s got one today",
                    claim.others,
                    claim.address,
                )
        user_id = conn.execute(
            sa.insert(users)
            .values(
                email=email,
                email_verified=True,
                name=identity.name or email,
                avatar_url=identity.picture,
                is_suspended=False,
                created_at=now,
                last_seen_at=now,
                **withheld,
            )
            .returning(users.c.id)
        ).scalar_one()
        conn.execute(
            sa.insert(credit_accounts).values(user_id=user_id, balance=0, held=0, created_at=now)
        )
    else:
        user_id = linked.id
        _refresh_profile(conn, user_id, identity)
    conn.execute(
        sa.insert(identities).values(
            user_id=user_id,
            provider=provider,
            subject=identity.subject,
            email=email,
            email_verified=True,
            created_at=now,
            last_sign_in_at=now,
        )
    )
    return user_id, created


def _refresh_profile(conn: Connection, user_id: int, identity: ProviderIdentity) -> None:
    values: dict[str, object] = {}
    if identity.name:
        values["name"] = identity.name
    if identity.picture:
        values["avatar_url"] = identity.picture
    if values:
        conn.execute(sa.update(users).where(users.c.id == user_id).values(**values))


def trial_key(user_id: int) -> str:
    return f"trial:{user_id}"


def ensure_trial_grant(
    db: Database, settings: Settings, *, user_id: int, now: datetime | None = None
) -> bool:
    """Give the free trial once per user, ever. Returns whether it was given now.

    Called at every sign-in, so a trial lost to a crash between creating the user and
    granting is still given next time; the ledger's unique key makes it at most once. A
    user created past their address's trial limit never gets it.
    """
    if settings.free_trial_credits <= 0:
        return False
    key = trial_key(user_id)
    given = sa.exists().where(ledger_entries.c.idempotency_key == key)
    with db.read() as conn:
        row = conn.execute(
            sa.select(users.c.trial_withheld_at, given.label("given")).where(users.c.id == user_id)
        ).first()
    if row is None or row.given or row.trial_withheld_at is not None:
        return False
    now = now or utcnow()
    try:
        result = ledger.grant(
            db,
            user_id=user_id,
            credits=settings.free_trial_credits,
            key=key,
            reason="free trial",
            expires_at=now + timedelta(days=settings.free_trial_days),
            now=now,
        )
    except IdempotencyConflict:
        return False  # granted concurrently with a different configured amount
    return not result.replayed


# --- sessions -------------------------------------------------------------------------------


def create_session(
    db: Database, *, user_id: int, days: int, user_agent: str = "", now: datetime | None = None
) -> str:
    """A new session (a new token at every sign-in: no fixation). Returns the token."""
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    with db.transaction() as conn:
        conn.execute(
            sa.insert(auth_sessions).values(
                user_id=user_id,
                token_hash=hash_token(token),
                created_at=now,
                expires_at=now + timedelta(days=days),
                last_used_at=now,
                user_agent=user_agent[:300],
            )
        )
        conn.execute(sa.update(users).where(users.c.id == user_id).values(last_seen_at=now))
    return token


def resolve_session(
    db: Database, settings: Settings, token: str | None, *, now: datetime | None = None
) -> CurrentUser | None:
    """The signed-in user for a session token, or None if it is unknown, expired, revoked,
    or its user is suspended."""
    if not token or len(token) > 200:
        return None
    now = now or utcnow()
    with db.read() as conn:
        row = conn.execute(
            sa.select(
                auth_sessions.c.id,
                auth_sessions.c.last_used_at,
                users.c.id.label("user_id"),
                users.c.email,
                users.c.email_verified,
                users.c.name,
                users.c.avatar_url,
            )
            .select_from(auth_sessions.join(users, users.c.id == auth_sessions.c.user_id))
            .where(
                auth_sessions.c.token_hash == hash_token(token),
                auth_sessions.c.revoked_at.is_(None),
                auth_sessions.c.expires_at > now,
                users.c.is_suspended.is_(False),
            )
        ).first()
    if row is None:
        return None
    if now - row.last_used_at > LAST_USED_GRANULARITY:
        with db.transaction() as conn:
            conn.execute(
                sa.update(auth_sessions)
                .where(auth_sessions.c.id == row.id)
                .values(last_used_at=now)
            )
            conn.execute(sa.update(users).where(users.c.id == row.user_id).values(last_seen_at=now))
    return CurrentUser(
        id=row.user_id,
        email=row.email,
        name=row.name,
        avatar_url=row.avatar_url,
        is_admin=is_admin(
            row.email, email_verified=row.email_verified, admin_emails=settings.admin_emails
        ),
    )


def _current_user(db: Database, settings: Settings, user_id: int) -> CurrentUser:
    with db.read() as conn:
        row = conn.execute(sa.select(users).where(users.c.id == user_id)).one()
    return CurrentUser(
        id=row.id,
        email=row.email,
        name=row.name,
        avatar_url=row.avatar_url,
        is_admin=is_admin(
            row.email, email_verified=row.email_verified, admin_emails=settings.admin_emails
        ),
    )


def revoke_session(db: Database, token: str | None, *, now: datetime | None = None) -> bool:
    if not token:
        return False
    with db.transaction() as conn:
        result = conn.execute(
            sa.update(auth_sessions)
            .where(
                auth_sessions.c.token_hash == hash_token(token),
                auth_sessions.c.revoked_at.is_(None),
            )
            .values(revoked_at=now or utcnow())
        )
    return result.rowcount == 1


def forget_old_login_attempts(db: Database, *, now: datetime | None = None) -> int:
    """Delete sign-in attempts that can no longer be used (housekeeping job)."""
    cutoff = (now or utcnow()) - timedelta(days=1)
    with db.transaction() as conn:
        result = conn.execute(sa.delete(login_attempts).where(login_attempts.c.expires_at < cutoff))
    return int(result.rowcount)
