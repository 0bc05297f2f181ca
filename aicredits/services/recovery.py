"""What a dead worker leaves behind, put right: holds whose lease lapsed, and chat replies
left half-written.

A live worker renews its calls' leases and checkpoints what each has delivered (see
services.gateway.InFlight). When a lease lapses, the worker is gone (SIGKILL, out of memory,
a crash), and its call is settled here for the tokens delivered as of its last checkpoint:
never more than was delivered, never more than the hold. A call that had delivered nothing
is released. Then the chat replies of such calls are finished with what they cost, so the
conversation shows them as they were delivered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import chat_messages, holds, usage_events, utcnow
from aicredits.domain.errors import UnknownModel
from aicredits.domain.ledger import HoldStatus
from aicredits.domain.pricing import usage_cost
from aicredits.services import conversations, ledger, pricing
from aicredits.services.conversations import STREAMING, Reply
from aicredits.services.ledger import HoldView, UsageRecord

logger = logging.getLogger(__name__)

# The outcome of a call whose worker died: charged for its last checkpoint.
LOST = "lost"


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    holds_settled: int = 0
    holds_released: int = 0
    credits_charged: int = 0
    replies_finished: int = 0

    @property
    def holds(self) -> int:
        return self.holds_settled + self.holds_released


def reclaim_lapsed_holds(
    db: Database, *, now: datetime | None = None, batch: int = 500
) -> RecoveryReport:
    """Settle or release every hold whose lease has lapsed."""
    now = now or utcnow()
    settled = released = charged = 0
    for hold in ledger.lapsed_holds(db, now=now, batch=batch):
        cost = _delivered_cost(db, hold)
        if cost is None:
            released += ledger.expire_lapsed_hold(db, hold_id=hold.id, now=now)
            continue
        assert hold.price_version_id is not None
        result = ledger.settle(
            db,
            hold=hold,
            actual_credits=cost,
            usage=UsageRecord(
                model=hold.model,
                price_version_id=hold.price_version_id,
                input_tokens=hold.input_tokens,
                output_tokens=hold.delivered_tokens,
                estimated=True,
                outcome=LOST,
            ),
            now=now,
            only_if_lapsed=True,
        )
        if result.applied:
            settled += 1
            charged += result.charged
            logger.warning(
                "hold %s (%s) lapsed: its worker died after delivering %d tokens; charged %d",
                hold.id, hold.request_id, hold.delivered_tokens, result.charged,
            )  # fmt: skip
    return RecoveryReport(holds_settled=settled, holds_released=released, credits_charged=charged)


def _delivered_cost(db: Database, hold: HoldView) -> int | None:
    """What the delivered part of a lapsed hold's call costs; None when nothing is owed
    (nothing delivered, or a hold from before holds recorded their price)."""
    if hold.delivered_tokens <= 0 or hold.price_version_id is None:
        return None
    try:
        price = pricing.price_version(db, version_id=hold.price_version_id)
    except UnknownModel:
        return None
    return usage_cost(price, input_tokens=hold.input_tokens, output_tokens=hold.delivered_tokens)


def finish_orphaned_replies(db: Database, *, settled_before: datetime, batch: int = 200) -> int:
    """Finish the chat replies left "streaming" by a worker that died: their holds were
    closed by the sweeper, or settled by their worker before `settled_before` (a live worker
    finishes its reply right after settling; this leaves it that moment). Each gets what its
    call was charged; a call that delivered nothing is marked lost, free."""
    with db.read() as conn:
        rows = conn.execute(
            sa.select(
                chat_messages.c.id,
                chat_messages.c.content,
                usage_events.c.outcome,
                usage_events.c.input_tokens,
                usage_events.c.output_tokens,
                usage_events.c.charged,
                usage_events.c.estimated,
            )
            .select_from(
                chat_messages.join(
                    holds, holds.c.request_id == chat_messages.c.request_id
                ).outerjoin(usage_events, usage_events.c.request_id == holds.c.request_id)
            )
            .where(
                chat_messages.c.outcome == STREAMING,
                holds.c.status != HoldStatus.PENDING.value,
                sa.or_(
                    # closed by the sweeper: its worker is gone
                    holds.c.status == HoldStatus.EXPIRED.value,
                    usage_events.c.outcome == LOST,
                    # closed by its worker, which then died before finishing the reply
                    holds.c.finalized_at <= settled_before,
                ),
            )
            .limit(batch)
        ).all()
    finished = 0
    for row in rows:
        usage = Reply(
            request_id="",
            outcome=row.outcome or LOST,
            input_tokens=row.input_tokens or 0,
            output_tokens=row.output_tokens or 0,
            credits_charged=row.charged or 0,
            estimated=bool(row.estimated) if row.outcome else False,
        )
        finished += conversations.finish_reply(db, reply_id=row.id, text=row.content, usage=usage)
    return finished


def recover(db: Database, *, lease: timedelta, now: datetime | None = None) -> RecoveryReport:
    """One sweep: lapsed holds, then the chat replies they (or an earlier sweep) left."""
    now = now or utcnow()
    report = reclaim_lapsed_holds(db, now=now)
    replies = finish_orphaned_replies(db, settled_before=now - lease)
    return RecoveryReport(
        holds_settled=report.holds_settled,
        holds_released=report.holds_released,
        credits_charged=report.credits_charged,
        replies_finished=replies,
    )
