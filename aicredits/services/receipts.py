"""Email receipts (with SMTP configured): one for each paid purchase and each paid
subscription invoice, queued in the same transaction as the credits it records and sent once
by the jobs through the outbox (services.outbox), failures retried like the usage warnings.

`receipt_emails` holds one row per (kind, source): the Checkout Session id of a purchase or
the Stripe invoice id, so a replayed event or a second path to the same payment (the success
page, reconciliation) queues nothing more."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, insert_ignoring_conflict
from aicredits.adapters.tables import invoices, purchases, receipt_emails, users, utcnow
from aicredits.domain.money import format_money
from aicredits.services import outbox
from aicredits.settings import Settings

ReceiptKind = Literal["purchase", "invoice"]


def queue(
    conn: Connection,
    settings: Settings,
    *,
    kind: ReceiptKind,
    source_id: str,
    user_id: int,
    now: datetime,
) -> None:
    """Queue a receipt in the caller's transaction, once per source (nothing without SMTP)."""
    if not settings.smtp_configured:
        return
    conn.execute(
        insert_ignoring_conflict(
            conn.dialect.name, receipt_emails, index=("kind", "source_id")
        ).values(
            user_id=user_id,
            kind=kind,
            source_id=source_id,
            created_at=now,
            email_attempts=0,
            next_email_at=now,
            email_error="",
        )
    )


def _hello(name: str | None) -> str:
    return f"Hello {name or 'there'},\n\n"


def send_due_emails(
    db: Database, settings: Settings, *, now: datetime | None = None, batch: int = 50
) -> int:
    """Send the receipts that are due (background job). Returns how many were sent."""
    if not settings.smtp_configured:
        return 0
    now = now or utcnow()
    bought = (
        sa.select(
            users.c.email,
            users.c.name,
            purchases.c.pack_id,
            purchases.c.credits,
            purchases.c.amount,
            purchases.c.currency,
            purchases.c.receipt_url,
            purchases.c.simulated,
        )
        .select_from(
            receipt_emails.join(users, users.c.id == receipt_emails.c.user_id).join(
                purchases, purchases.c.checkout_session_id == receipt_emails.c.source_id
            )
        )
        .where(receipt_emails.c.kind == "purchase")
    )

    def purchase_email(row: sa.Row[Any]) -> outbox.Email | None:
        if not row.email:
            return None
        lines = [
            f"Thank you for your purchase{' (simulated checkout)' if row.simulated else ''}.",
            f"Pack: {row.pack_id}, {row.credits:,} credits",
            f"Paid: {format_money(row.amount, row.currency)}",
        ]
        if row.receipt_url:
            lines.append(f"Stripe's receipt: {row.receipt_url}")
        lines.append(f"Your credits: {settings.public_url}/credits")
        return outbox.Email(
            to=row.email,
            subject="Your aicredits receipt",
            body=_hello(row.name) + "\n".join(lines) + "\n",
        )

    billed = (
        sa.select(
            users.c.email,
            users.c.name,
            invoices.c.invoice_id,
            invoices.c.plan_id,
            invoices.c.amount,
            invoices.c.currency,
            invoices.c.credits_granted,
            invoices.c.period_end,
            invoices.c.hosted_invoice_url,
            invoices.c.invoice_pdf,
            invoices.c.simulated,
        )
        .select_from(
            receipt_emails.join(users, users.c.id == receipt_emails.c.user_id).join(
                invoices, invoices.c.invoice_id == receipt_emails.c.source_id
            )
        )
        .where(receipt_emails.c.kind == "invoice")
    )

    def invoice_email(row: sa.Row[Any]) -> outbox.Email | None:
        if not row.email:
            return None
        lines = [
            f"Your {row.plan_id or ''} plan invoice {row.invoice_id} is paid"
            f"{' (simulated billing)' if row.simulated else ''}.",
            f"Paid: {format_money(row.amount, row.currency)}" if row.currency else "",
            f"Credits: {row.credits_granted:,}"
            + (f", until {row.period_end:%Y-%m-%d}" if row.period_end else ""),
        ]
        if row.hosted_invoice_url:
            lines.append(f"Invoice: {row.hosted_invoice_url}")
        if row.invoice_pdf:
            lines.append(f"PDF: {row.invoice_pdf}")
        lines.append(f"Your plan: {settings.public_url}/credits")
        return outbox.Email(
            to=row.email,
            subject="Your aicredits invoice",
            body=_hello(row.name) + "\n".join(line for line in lines if line) + "\n",
        )

    sent = 0
    for details, compose in ((bought, purchase_email), (billed, invoice_email)):
        sent += outbox.send_due(
            db,
            settings,
            table=receipt_emails,
            details=details,
            compose=compose,
            label="receipt",
            now=now,
            batch=batch,
        )
    return sent
