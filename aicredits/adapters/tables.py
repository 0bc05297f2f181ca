"""The database schema as SQLModel tables. Every change here ships an Alembic migration.

Credits are BIGINT: a pack of 5 USD buys thousands of credits, and a 32-bit column would
cap a balance at about two million dollars.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from aicredits.domain.allowance import TOP_UP_KINDS


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on SQLite (which stores no zone) and on Postgres."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY; Postgres gets a 64-bit identity.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(**kw: Any) -> Any:
    nullable = kw.pop("nullable", False)
    return Field(sa_column=sa.Column(UTCDateTime(), nullable=nullable, **kw))


def _credits(**kw: Any) -> Any:
    return Field(sa_column=sa.Column(sa.BigInteger(), nullable=False, **kw))


class User(SQLModel, table=True):
    """A person. Keyed by an internal id; the email only links a second sign-in provider."""

    __tablename__ = "users"
    __table_args__ = (
        # One user per verified email, so two first sign-ins with one email cannot race into
        # two accounts. Unverified emails are never used to link, so they may repeat.
        sa.Index(
            "uq_users_verified_email",
            "email",
            unique=True,
            sqlite_where=sa.text("email_verified = 1"),
            postgresql_where=sa.text("email_verified"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    email: str | None = Field(default=None, max_length=320, index=True)
    email_verified: bool = Field(default=False)
    name: str = Field(default="", max_length=200)
    avatar_url: str | None = Field(default=None, max_length=2000)
    is_suspended: bool = Field(default=False)
    created_at: datetime = _ts()
    last_seen_at: datetime | None = _ts(nullable=True)
    # Set when the account was created past its address's daily limit of free trials: it
    # never gets the trial (not at a later sign-in either), and its pages say why. `others`
    # is how many accounts from that address had got the trial that day.
    trial_withheld_at: datetime | None = _ts(nullable=True)
    trial_withheld_others: int | None = Field(default=None)


class CreditAccount(SQLModel, table=True):
    """One per user. `balance` is owned, `held` is reserved for in-flight calls."""

    __tablename__ = "credit_accounts"
    __table_args__ = (
        sa.CheckConstraint("balance >= 0", name="ck_credit_accounts_balance_non_negative"),
        sa.CheckConstraint("held >= 0", name="ck_credit_accounts_held_non_negative"),
        sa.CheckConstraint("held <= balance", name="ck_credit_accounts_held_within_balance"),
    )

    user_id: int = Field(foreign_key="users.id", primary_key=True)
    balance: int = _credits(server_default="0")
    held: int = _credits(server_default="0")
    created_at: datetime = _ts()


class PriceVersion(SQLModel, table=True):
    """Credits per 1M tokens for a model from `effective_from` on. Rows are never edited."""

    __tablename__ = "model_prices"
    __table_args__ = (
        sa.UniqueConstraint("model", "effective_from", name="uq_model_prices_model_effective"),
        sa.CheckConstraint("input_per_mtok >= 0", name="ck_model_prices_input_non_negative"),
        sa.CheckConstraint("output_per_mtok >= 0", name="ck_model_prices_output_non_negative"),
    )

    id: int | None = Field(default=None, primary_key=True)
    model: str = Field(max_length=100, index=True)
    input_per_mtok: int = _credits()
    output_per_mtok: int = _credits()
    effective_from: datetime = _ts()
    created_at: datetime = _ts()
    created_by: str = Field(default="system", max_length=200)


class Hold(SQLModel, table=True):
    """Credits reserved for one in-flight call; settled, released or expired exactly once.

    `expires_at` is the hold's lease: the worker running the call renews it every few
    seconds, and records how much it has delivered (`delivered_tokens`). When the lease lapses
    (the worker died), the sweeper settles the hold for that much, priced by the columns the
    reservation stored, since nothing else remembers the call.
    """

    __tablename__ = "holds"
    __table_args__ = (
        sa.CheckConstraint("amount >= 0", name="ck_holds_amount_non_negative"),
        sa.CheckConstraint(
            "status IN ('pending', 'settled', 'released', 'expired')", name="ck_holds_status"
        ),
        sa.Index("ix_holds_status_expires_at", "status", "expires_at"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    request_id: str = Field(max_length=200, unique=True)
    amount: int = _credits()
    status: str = Field(default="pending", max_length=16)
    charged: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger(), nullable=True))
    unbilled: int = _credits(server_default="0")
    created_at: datetime = _ts()
    expires_at: datetime = _ts()
    finalized_at: datetime | None = _ts(nullable=True)
    model: str = Field(default="", max_length=100, sa_column_kwargs={"server_default": ""})
    price_version_id: int | None = Field(default=None, foreign_key="model_prices.id")
    # The prompt's tokens as counted when the call was reserved.
    input_tokens: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    # Output tokens delivered as of the last checkpoint: what a dead worker's call is charged.
    delivered_tokens: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    checkpoint_at: datetime | None = _ts(nullable=True)
    # A call with an Idempotency-Key: the SHA-256 of its request (domain.digest), so a retry
    # is told apart from another request sent with the same key.
    request_digest: str | None = Field(default=None, max_length=64, nullable=True)


class UsageEvent(SQLModel, table=True):
    """One metered model call: tokens, the price version used, and what it cost."""

    __tablename__ = "usage_events"

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    request_id: str = Field(max_length=200, unique=True)
    hold_id: int | None = Field(
        default=None, sa_column=sa.Column(sa.BigInteger(), sa.ForeignKey("holds.id"), index=True)
    )
    model: str = Field(max_length=100)
    price_version_id: int = Field(foreign_key="model_prices.id")
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    # True when the stream was cut before usage arrived and tokens were counted locally.
    estimated: bool = Field(default=False)
    outcome: str = Field(default="completed", max_length=16)
    cost: int = _credits()
    charged: int = _credits()
    unbilled: int = _credits(server_default="0")
    created_at: datetime = _ts(index=True)


# A ledger entry that starts a new allowance (domain.allowance.TOP_UP_KINDS). Written as SQL
# with literal values, because a partial index is used only by a query whose WHERE repeats
# its predicate with the same constants (bound parameters do not count, on either database).
TOP_UP_PREDICATE = "amount > 0 AND kind IN ({})".format(
    ", ".join(f"'{kind.value}'" for kind in sorted(TOP_UP_KINDS))
)


class LedgerEntry(SQLModel, table=True):
    """Append-only: one row per change of a balance. A database trigger refuses edits."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        sa.CheckConstraint("amount <> 0", name="ck_ledger_entries_amount_nonzero"),
        sa.CheckConstraint("balance_after >= 0", name="ck_ledger_entries_balance_after"),
        sa.Index("ix_ledger_entries_user_id_id", "user_id", "id"),
        # The last top-up, which starts the current allowance, is read after every charge:
        # without this it is a scan back through all of a heavy user's spends.
        sa.Index(
            "ix_ledger_entries_top_ups",
            "user_id",
            "id",
            postgresql_where=sa.text(TOP_UP_PREDICATE),
            sqlite_where=sa.text(TOP_UP_PREDICATE),
        ),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id")
    kind: str = Field(max_length=16)
    amount: int = _credits()
    balance_after: int = _credits()
    idempotency_key: str = Field(max_length=200, unique=True)
    reference: str | None = Field(default=None, max_length=200)
    actor: str = Field(max_length=200)
    reason: str = Field(default="", max_length=500)
    created_at: datetime = _ts()


class CreditLot(SQLModel, table=True):
    """An expiring grant. What is left of it is derived from the ledger (domain.lot_remaining),
    so spending never has to touch lot rows; `closed_at` is set once nothing of it can expire.
    """

    __tablename__ = "credit_lots"
    __table_args__ = (
        sa.CheckConstraint("amount > 0", name="ck_credit_lots_amount_positive"),
        sa.Index("ix_credit_lots_due", "closed_at", "expires_at"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    entry_id: int = Field(
        sa_column=sa.Column(
            sa.BigInteger(), sa.ForeignKey("ledger_entries.id"), nullable=False, unique=True
        )
    )
    amount: int = _credits()
    expires_at: datetime = _ts()
    closed_at: datetime | None = _ts(nullable=True)


class Identity(SQLModel, table=True):
    """A provider account (Google, GitHub, an OIDC issuer) that signs in as a user."""

    __tablename__ = "identities"
    __table_args__ = (
        sa.UniqueConstraint("provider", "subject", name="uq_identities_provider_subject"),
    )

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    provider: str = Field(max_length=50)
    subject: str = Field(max_length=255)
    email: str | None = Field(default=None, max_length=320)
    email_verified: bool = Field(default=False)
    created_at: datetime = _ts()
    last_sign_in_at: datetime = _ts()


class AuthSession(SQLModel, table=True):
    """A signed-in browser. Only the token's hash is stored, never the token."""

    __tablename__ = "auth_sessions"

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    token_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = _ts()
    expires_at: datetime = _ts()
    last_used_at: datetime = _ts()
    revoked_at: datetime | None = _ts(nullable=True)
    user_agent: str = Field(default="", max_length=300)


class LoginAttempt(SQLModel, table=True):
    """One sign-in in progress: its state (hashed), PKCE verifier, nonce and destination.

    It is bound to the browser that started it (a cookie whose hash is `binder_hash`) and
    used at most once (`used_at`).
    """

    __tablename__ = "login_attempts"

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    state_hash: str = Field(max_length=64, unique=True)
    binder_hash: str = Field(max_length=64)
    provider: str = Field(max_length=50)
    code_verifier: str = Field(max_length=128)
    nonce: str = Field(max_length=128)
    next_path: str = Field(max_length=500)
    created_at: datetime = _ts()
    expires_at: datetime = _ts(index=True)
    used_at: datetime | None = _ts(nullable=True)


class ApiKey(SQLModel, table=True):
    """A personal API key for the OpenAI-compatible API. Only its SHA-256 and its first
    characters (to recognise it by) are stored, never the key."""

    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    name: str = Field(max_length=60)
    prefix: str = Field(max_length=12)
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = _ts()
    last_used_at: datetime | None = _ts(nullable=True)
    revoked_at: datetime | None = _ts(nullable=True)


class Conversation(SQLModel, table=True):
    """A user's chat thread. Titles come from the first message; users may rename them."""

    __tablename__ = "conversations"
    __table_args__ = (sa.Index("ix_conversations_user_updated", "user_id", "updated_at"),)

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id")
    title: str = Field(default="", max_length=120)
    model: str = Field(max_length=100)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class ChatMessage(SQLModel, table=True):
    """One message of a conversation. An assistant message carries what its reply cost."""

    __tablename__ = "chat_messages"
    __table_args__ = (
        sa.CheckConstraint("role IN ('user', 'assistant')", name="ck_chat_messages_role"),
        sa.Index("ix_chat_messages_conversation_id_id", "conversation_id", "id"),
        # The replies still being written: few, and looked up by the sweeper every few seconds.
        sa.Index(
            "ix_chat_messages_streaming",
            "request_id",
            sqlite_where=sa.text("outcome = 'streaming'"),
            postgresql_where=sa.text("outcome = 'streaming'"),
        ),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    conversation_id: int = Field(
        sa_column=sa.Column(
            sa.BigInteger(),
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        )
    )
    role: str = Field(max_length=16)
    content: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    model: str = Field(default="", max_length=100)
    request_id: str | None = Field(default=None, max_length=200)
    # completed | stopped | cut (the upstream broke off); empty for user messages
    outcome: str = Field(default="", max_length=16)
    input_tokens: int = Field(default=0)
    output_tokens: int = Field(default=0)
    credits_charged: int = _credits(server_default="0")
    estimated: bool = Field(default=False)
    created_at: datetime = _ts()


class Purchase(SQLModel, table=True):
    """One Checkout Session a user started, and what became of it: paid and credited,
    refunded (wholly or in part), disputed. Credits are granted once per session id."""

    __tablename__ = "purchases"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('open', 'pending', 'paid', 'failed', 'expired')",
            name="ck_purchases_status",
        ),
        sa.CheckConstraint("credits > 0", name="ck_purchases_credits_positive"),
        sa.CheckConstraint("amount >= 0", name="ck_purchases_amount_non_negative"),
        sa.CheckConstraint(
            "amount_refunded >= 0 AND credits_granted >= 0 AND credits_clawed_back >= 0 "
            "AND credits_shortfall >= 0",
            name="ck_purchases_counters_non_negative",
        ),
        sa.Index("ix_purchases_user_created", "user_id", "created_at"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id")
    pack_id: str = Field(max_length=40)
    # What the session sells, fixed when it is created (later pack changes do not apply).
    credits: int = _credits()
    amount: int = _credits()  # minor units of `currency` (500 = 5.00 USD)
    currency: str = Field(max_length=3)
    checkout_session_id: str = Field(max_length=255, unique=True)
    payment_intent_id: str | None = Field(default=None, max_length=255, index=True)
    charge_id: str | None = Field(default=None, max_length=255, index=True)
    customer_id: str | None = Field(default=None, max_length=255)
    # open -> pending (paid later, e.g. a bank debit) -> paid | failed; open -> expired
    status: str = Field(default="open", max_length=16)
    credits_granted: int = _credits(server_default="0")
    # Refunds: Stripe's cumulative refunded amount, and how the credits it bought were
    # settled so far: taken back, or not recoverable (already spent; flagged for an admin).
    amount_refunded: int = _credits(server_default="0")
    credits_clawed_back: int = _credits(server_default="0")
    credits_shortfall: int = _credits(server_default="0")
    receipt_url: str | None = Field(default=None, max_length=2000)
    flagged: bool = Field(default=False)
    simulated: bool = Field(default=False)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    fulfilled_at: datetime | None = _ts(nullable=True)


class StripeEvent(SQLModel, table=True):
    """Each Stripe event id, stored once: a replay of a processed event changes nothing.

    An event that names a payment not known yet (a refund before its completion) is parked
    with its payload and applied when the payment's Checkout Session completes."""

    __tablename__ = "stripe_events"

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    event_id: str = Field(max_length=255, unique=True)
    type: str = Field(max_length=100)
    received_at: datetime = _ts()
    processed_at: datetime | None = _ts(nullable=True)
    outcome: str = Field(default="", max_length=32)
    payment_intent_id: str | None = Field(default=None, max_length=255, index=True)
    payload: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))


class StripeCustomer(SQLModel, table=True):
    """The Stripe customer made once per user and reused by every checkout."""

    __tablename__ = "stripe_customers"

    user_id: int = Field(foreign_key="users.id", primary_key=True)
    customer_id: str = Field(max_length=255, unique=True)
    created_at: datetime = _ts()


class AccountFlag(SQLModel, table=True):
    """Something about an account an admin must look at: a refund whose credits were already
    spent, or a dispute. `amount` is the credits at stake. Cleared, never deleted."""

    __tablename__ = "account_flags"
    __table_args__ = (
        sa.CheckConstraint("kind IN ('refund_shortfall', 'dispute')", name="ck_account_flags_kind"),
        sa.Index("ix_account_flags_open", "cleared_at", "created_at"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    kind: str = Field(max_length=32)
    purchase_id: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.BigInteger(), sa.ForeignKey("purchases.id"), nullable=True),
    )
    detail: str = Field(default="", max_length=500)
    amount: int = _credits(server_default="0")
    # The same shortfall or dispute is flagged once, however often its event is replayed.
    idempotency_key: str = Field(max_length=200, unique=True)
    created_at: datetime = _ts()
    cleared_at: datetime | None = _ts(nullable=True)
    cleared_by: str | None = Field(default=None, max_length=200)
    clear_note: str | None = Field(default=None, max_length=500)


class ThresholdCrossing(SQLModel, table=True):
    """A user has used a threshold's share (50%, 80%, 100%...) of an allowance: recorded once
    per allowance, which is named by the ledger entry (a grant, purchase or top-up) that
    started it. Banners and emails are driven from here, so neither ever repeats."""

    __tablename__ = "threshold_crossings"
    __table_args__ = (
        sa.UniqueConstraint(
            "user_id", "allowance_entry_id", "threshold", name="uq_threshold_crossings_once"
        ),
        sa.Index("ix_threshold_crossings_email_due", "emailed_at", "next_email_at"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    allowance_entry_id: int = Field(
        sa_column=sa.Column(sa.BigInteger(), sa.ForeignKey("ledger_entries.id"), nullable=False)
    )
    threshold: int = Field(ge=1, le=100)
    allowance: int = _credits()
    used: int = _credits()
    crossed_at: datetime = _ts()
    dismissed_at: datetime | None = _ts(nullable=True)
    # Email, when SMTP is configured: sent by a background job, retried with backoff.
    emailed_at: datetime | None = _ts(nullable=True)
    email_attempts: int = Field(default=0)
    next_email_at: datetime | None = _ts(nullable=True)
    email_error: str = Field(default="", max_length=500)


class AdminAction(SQLModel, table=True):
    """The audit log: every admin action, who did it, when, to whom, what and why.
    Append-only, like the ledger (a database trigger refuses edits)."""

    __tablename__ = "admin_actions"
    __table_args__ = (sa.Index("ix_admin_actions_created_at", "created_at"),)

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    actor_user_id: int = Field(foreign_key="users.id")
    actor_email: str = Field(max_length=320)
    action: str = Field(max_length=40)
    target_user_id: int | None = Field(default=None, foreign_key="users.id", index=True)
    detail: str = Field(
        default="", sa_column=sa.Column(sa.Text(), nullable=False, server_default="")
    )
    reason: str = Field(max_length=500)
    # The submitted form's token: the same submission twice is one action.
    idempotency_key: str = Field(max_length=200, unique=True)
    created_at: datetime = _ts()


class SpikeReport(SQLModel, table=True):
    """A user whose spending spiked, reported to the admins once per clock hour: the unique
    key is what makes a repeated or raced job run report nothing twice."""

    __tablename__ = "spike_reports"
    __table_args__ = (
        sa.UniqueConstraint("user_id", "hour", name="uq_spike_reports_once"),
        sa.Index("ix_spike_reports_email_due", "emailed_at", "next_email_at"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    # The start of the clock hour (UTC) the spike was seen in.
    hour: datetime = _ts()
    last_hour: int = _credits()
    previous_week: int = _credits()
    reported_at: datetime = _ts()
    # Email to the admins, when SMTP is configured: sent by the job, retried with backoff.
    emailed_at: datetime | None = _ts(nullable=True)
    email_attempts: int = Field(default=0)
    next_email_at: datetime | None = _ts(nullable=True)
    email_error: str = Field(default="", max_length=500)


class TrialAddress(SQLModel, table=True):
    """New accounts given the free trial, and refused it, per client address (an IPv6
    client: its /64) per UTC day. A sign-up takes a trial with one conditional UPDATE of
    its row, so sign-ups at the same moment from many workers never exceed the limit."""

    __tablename__ = "trial_addresses"
    __table_args__ = (
        sa.CheckConstraint("granted >= 0", name="ck_trial_addresses_granted_non_negative"),
        sa.CheckConstraint("refused >= 0", name="ck_trial_addresses_refused_non_negative"),
        sa.Index("ix_trial_addresses_day", "day"),
    )

    address: str = Field(primary_key=True, max_length=64)
    day: date = Field(primary_key=True)
    granted: int = Field(default=0)
    refused: int = Field(default=0)


class UnmatchedPayment(SQLModel, table=True):
    """A payment the app could not match to a Checkout Session it created (no keyed marker,
    a forged one, another mode, a pack or an amount that is not ours): nothing was credited,
    and it waits here for an admin. One row per session, whoever saw it first (the webhook,
    the success page, reconciliation)."""

    __tablename__ = "unmatched_payments"
    __table_args__ = (sa.Index("ix_unmatched_payments_open", "cleared_at", "created_at"),)

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    checkout_session_id: str = Field(max_length=255, unique=True)
    event_id: str | None = Field(default=None, max_length=255)
    amount: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger(), nullable=True))
    currency: str | None = Field(default=None, max_length=8)
    reason: str = Field(max_length=40)
    detail: str = Field(default="", max_length=500)
    source: str = Field(max_length=20)  # webhook | success_page | reconcile
    created_at: datetime = _ts()
    cleared_at: datetime | None = _ts(nullable=True)
    cleared_by: str | None = Field(default=None, max_length=200)
    clear_note: str | None = Field(default=None, max_length=500)


class ReconciliationRun(SQLModel, table=True):
    """One run of reconciliation against Stripe: its window, what it found and fixed."""

    __tablename__ = "reconciliation_runs"
    __table_args__ = (sa.Index("ix_reconciliation_runs_started_at", "started_at"),)

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    trigger: str = Field(max_length=20)  # cli | job | admin
    since: datetime = _ts()
    started_at: datetime = _ts()
    finished_at: datetime | None = _ts(nullable=True)
    fix: bool = Field(default=False)
    stripe_checked: bool = Field(default=False)
    sessions_checked: int = Field(default=0)
    refunds_checked: int = Field(default=0)
    discrepancies: int = Field(default=0)
    fixed: int = Field(default=0)
    # The discrepancies as JSON: [{"kind", "session_id", "detail", "fixed"}, ...].
    report: str = Field(
        default="[]", sa_column=sa.Column(sa.Text(), nullable=False, server_default="[]")
    )
    error: str = Field(default="", max_length=500)


class Subscription(SQLModel, table=True):
    """A user's Stripe subscription to a plan, as Stripe's own events last described it
    (services.subscriptions): the app never sets its status, plan or period itself."""

    __tablename__ = "subscriptions"
    __table_args__ = (sa.Index("ix_subscriptions_user", "user_id", "updated_at"),)

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id")
    customer_id: str = Field(max_length=255)
    subscription_id: str = Field(max_length=255, unique=True)
    # From the app's PLANS by the subscription's Stripe Price id, never from metadata.
    plan_id: str = Field(max_length=40)
    price_id: str = Field(max_length=255)
    # Stripe's: incomplete | trialing | active | past_due | unpaid | canceled | ...
    status: str = Field(max_length=32)
    current_period_start: datetime | None = _ts(nullable=True)
    current_period_end: datetime | None = _ts(nullable=True)
    cancel_at_period_end: bool = Field(default=False)
    # The `created` time of the event last applied: an older event changes nothing.
    event_created: int = Field(
        default=0, sa_column=sa.Column(sa.BigInteger(), nullable=False, server_default="0")
    )
    simulated: bool = Field(default=False)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Invoice(SQLModel, table=True):
    """A subscription invoice Stripe told us about, and the credits its payment granted
    (once per invoice id: the ledger key `plan-invoice:{invoice_id}`)."""

    __tablename__ = "invoices"
    __table_args__ = (sa.Index("ix_invoices_user_created", "user_id", "created_at"),)

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    invoice_id: str = Field(max_length=255, unique=True)
    user_id: int = Field(foreign_key="users.id")
    customer_id: str = Field(max_length=255)
    subscription_id: str | None = Field(default=None, max_length=255, index=True)
    plan_id: str | None = Field(default=None, max_length=40)
    billing_reason: str = Field(default="", max_length=40)
    # paid | payment_failed
    status: str = Field(max_length=16)
    amount: int = _credits(server_default="0")  # minor units of `currency`
    currency: str = Field(default="", max_length=8)
    period_start: datetime | None = _ts(nullable=True)
    period_end: datetime | None = _ts(nullable=True)
    credits_granted: int = _credits(server_default="0")
    # The ledger entry of those credits (its lot ends with the period).
    entry_id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger(), nullable=True))
    # A metered plan's credit line for the period, its ledger entry, and what was used of it
    # (reported to Stripe once, when the period is over).
    credit_line: int = _credits(server_default="0")
    credit_line_entry_id: int | None = Field(
        default=None, sa_column=sa.Column(sa.BigInteger(), nullable=True)
    )
    overage_credits: int = _credits(server_default="0")
    overage_reported_at: datetime | None = _ts(nullable=True)
    overage_item_id: str | None = Field(default=None, max_length=255)
    hosted_invoice_url: str | None = Field(default=None, max_length=2000)
    invoice_pdf: str | None = Field(default=None, max_length=2000)
    simulated: bool = Field(default=False)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class ReceiptEmail(SQLModel, table=True):
    """An email receipt, queued once per paid purchase (by its Checkout Session id) or paid
    subscription invoice (by its invoice id) when SMTP is configured; an outbox
    (services.outbox) sends it from the jobs, retrying failures."""

    __tablename__ = "receipt_emails"
    __table_args__ = (
        sa.UniqueConstraint("kind", "source_id", name="uq_receipt_emails_source"),
        sa.Index("ix_receipt_emails_email_due", "emailed_at", "next_email_at"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id")
    kind: str = Field(max_length=16)  # purchase | invoice
    source_id: str = Field(max_length=255)
    created_at: datetime = _ts()
    emailed_at: datetime | None = _ts(nullable=True)
    email_attempts: int = Field(default=0)
    next_email_at: datetime | None = _ts(nullable=True)
    email_error: str = Field(default="", max_length=500)


class AutoTopUpSetting(SQLModel, table=True):
    """A user's auto top-up: "when my available credits fall below `threshold`, buy
    `pack_id` with my saved card", the card itself (brand and last four only; Stripe keeps
    the rest), and what the last failures said. One row per user who ever opened it."""

    __tablename__ = "auto_topup_settings"
    __table_args__ = (
        sa.CheckConstraint("threshold >= 0", name="ck_auto_topup_settings_threshold"),
        sa.CheckConstraint("monthly_cap >= 0", name="ck_auto_topup_settings_monthly_cap"),
        sa.Index("ix_auto_topup_settings_enabled", "enabled"),
    )

    user_id: int = Field(foreign_key="users.id", primary_key=True)
    enabled: bool = Field(default=False)
    threshold: int = _credits(server_default="0")
    pack_id: str = Field(default="", max_length=40)
    # Top-ups allowed per calendar month (UTC); set from AUTO_TOPUP_MONTHLY_CAP at first save.
    monthly_cap: int = Field(default=0)
    # The saved card: a Stripe PaymentMethod of the user's Stripe customer.
    payment_method_id: str | None = Field(default=None, max_length=255)
    customer_id: str | None = Field(default=None, max_length=255)
    card_brand: str = Field(default="", max_length=20)
    card_last4: str = Field(default="", max_length=4)
    card_exp: str = Field(default="", max_length=7)
    card_simulated: bool = Field(default=False)
    # The Checkout Session (mode setup) this user was sent to to save a card: only a
    # session we made for them saves one.
    setup_session_id: str | None = Field(default=None, max_length=255, unique=True)
    consecutive_failures: int = Field(default=0)
    # After a failure, no new try before this.
    retry_after: datetime | None = _ts(nullable=True)
    # What the banner says: '' | failed | action_required | disabled | cap_reached.
    notice_kind: str = Field(default="", max_length=20)
    notice: str = Field(default="", max_length=500)
    # Development only (simulated card): what the next simulated charge does.
    simulate_next: str = Field(default="", max_length=32)
    updated_at: datetime = _ts()


class AutoTopUp(SQLModel, table=True):
    """One auto top-up: the trigger (its `key`, also the Stripe idempotency key of its
    off-session PaymentIntent, so a retry never charges twice), the pack it buys as our pack
    table had it, and its outcome. Also the outbox of its failure email."""

    __tablename__ = "auto_topups"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('processing', 'succeeded', 'failed', 'requires_action')",
            name="ck_auto_topups_status",
        ),
        sa.CheckConstraint("credits > 0", name="ck_auto_topups_credits_positive"),
        # At most one top-up in flight per user, whatever runs the job.
        sa.Index(
            "uq_auto_topups_in_flight",
            "user_id",
            unique=True,
            sqlite_where=sa.text("status = 'processing'"),
            postgresql_where=sa.text("status = 'processing'"),
        ),
        sa.Index("ix_auto_topups_user_created", "user_id", "created_at"),
        sa.Index("ix_auto_topups_email_due", "emailed_at", "next_email_at"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True))
    user_id: int = Field(foreign_key="users.id")
    key: str = Field(max_length=64, unique=True)
    purchase_id: int = Field(
        sa_column=sa.Column(sa.BigInteger(), sa.ForeignKey("purchases.id"), nullable=False)
    )
    pack_id: str = Field(max_length=40)
    credits: int = _credits()
    amount: int = _credits()
    currency: str = Field(max_length=3)
    status: str = Field(default="processing", max_length=16)
    payment_intent_id: str | None = Field(default=None, max_length=255, unique=True)
    failure_code: str = Field(default="", max_length=64)
    failure_message: str = Field(default="", max_length=500)
    simulated: bool = Field(default=False)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    finished_at: datetime | None = _ts(nullable=True)
    emailed_at: datetime | None = _ts(nullable=True)
    email_attempts: int = Field(default=0)
    next_email_at: datetime | None = _ts(nullable=True)
    email_error: str = Field(default="", max_length=500)


def table(model: type[SQLModel]) -> sa.Table:
    """The Core table of a model, for the ledger's hand-written statements."""
    t = model.__table__  # type: ignore[attr-defined]
    assert isinstance(t, sa.Table)
    return t


users = table(User)
credit_accounts = table(CreditAccount)
model_prices = table(PriceVersion)
holds = table(Hold)
usage_events = table(UsageEvent)
ledger_entries = table(LedgerEntry)
credit_lots = table(CreditLot)
identities = table(Identity)
auth_sessions = table(AuthSession)
login_attempts = table(LoginAttempt)
api_keys = table(ApiKey)
conversations = table(Conversation)
chat_messages = table(ChatMessage)
purchases = table(Purchase)
stripe_events = table(StripeEvent)
stripe_customers = table(StripeCustomer)
account_flags = table(AccountFlag)
threshold_crossings = table(ThresholdCrossing)
admin_actions = table(AdminAction)
spike_reports = table(SpikeReport)
trial_addresses = table(TrialAddress)
unmatched_payments = table(UnmatchedPayment)
reconciliation_runs = table(ReconciliationRun)
subscriptions = table(Subscription)
invoices = table(Invoice)
receipt_emails = table(ReceiptEmail)
auto_topup_settings = table(AutoTopUpSetting)
auto_topups = table(AutoTopUp)
