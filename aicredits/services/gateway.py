"""One metered chat turn, for the chat UI and the OpenAI-compatible API alike.

    start():  validate (model, prompt size, max_tokens)  -> InvalidRequest / UnknownModel
              rate limits (per user, per IP, in flight)   -> RateLimited / LimiterUnavailable
              price the worst case and RESERVE it         -> InsufficientCredits
    stream(): call the upstream                           -> on failure before any output:
                                                             RELEASE, UpstreamFailed
              SETTLE actual usage: charge, release the rest, append the usage event

Nothing is spent upstream before the reservation succeeds. What a cut reply costs is the
refund policy in docs/api.md: every token delivered is paid for, nothing else is.

While a turn runs, its gateway's InFlight renews the hold's lease and checkpoints what the
turn has delivered, so if this process dies the sweeper (services.recovery) charges the
delivered part. On shutdown, `drain_all()` refuses new turns, lets the running ones finish
for a grace period, then cuts the rest; each is settled for what it delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol

from sqlalchemy.engine import Connection

from aicredits.adapters import metrics
from aicredits.adapters.blocking import run_blocking, run_blocking_to_completion, to_completion
from aicredits.adapters.db import Database
from aicredits.adapters.ledger_sql import HoldPricing
from aicredits.adapters.ratelimit import RateLimiter, RateLimits, Slot, build_rate_limiter
from aicredits.adapters.tables import utcnow
from aicredits.adapters.tokenizer import count_text_tokens
from aicredits.adapters.upstream import Delta, Finished, Upstream, UpstreamError, Usage
from aicredits.domain.chat import ChatRequest
from aicredits.domain.digest import request_digest
from aicredits.domain.errors import (
    AICreditsError,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidIdempotencyKey,
    UnknownModel,
    UnsupportedParameter,
)
from aicredits.domain.reply import ReplyBuilder, ReplyChoice
from aicredits.services import ledger, pricing, subscriptions, thresholds
from aicredits.services.admission import Admission
from aicredits.services.ledger import HoldView, UsageRecord
from aicredits.services.pricing import Quote
from aicredits.settings import ModelSpec, Settings

logger = logging.getLogger(__name__)

# completed; stopped (the caller went away); cut (the upstream broke off); interrupted (this
# server was shutting down); failed (nothing delivered, nothing charged).
Outcome = Literal["completed", "stopped", "cut", "interrupted", "failed"]
# Written in the checkpoint's transaction with the delivered text (the chat saves its reply).
ProgressSink = Callable[[Connection, str], None]
# Called in the settling thread right after the settle, with the result.
FinishHook = Callable[["TurnResult"], None]


class UpstreamFailed(AICreditsError):
    """The model provider failed before any output. Nothing was charged."""

    code = "upstream_failed"


class UpstreamRefused(UpstreamFailed):
    """The model provider refused the call for a reason a retry does not change (our key,
    a model it does not offer, a request it rejects). Nothing was charged."""


def provider_failure(failure: UpstreamError, *, model: str, request_id: str) -> UpstreamFailed:
    """What to tell the caller when the provider failed before any output, and its one log
    line: a refusal that every call will meet (the site's key, a model the provider lacks)
    is an ERROR for the operator, and the caller is not told to try again."""
    status = failure.status
    if status not in (401, 403, 404):
        logger.warning("upstream %s for %s (%s), outcome failed", failure.kind, request_id, failure)
    if status in (401, 403):
        logger.error("the model provider refused our key (HTTP %s): check OPENAI_API_KEY", status)
        return UpstreamRefused(
            f"The model provider refused this site's key (HTTP {status}); the site's operator "
            "has to fix it. Nothing was charged."
        )
    if status == 404:
        logger.error(
            "the model provider does not offer the model %r (HTTP 404): check its entry in "
            "MODELS or EMBEDDING_MODELS (id, upstream_id), and OPENAI_BASE_URL",
            model,
        )
        return UpstreamRefused(
            "The model provider does not offer this model (HTTP 404); the site's operator "
            "has to fix it. Nothing was charged."
        )
    if status is not None and 400 <= status < 500 and status != 429:
        return UpstreamRefused(
            f"The model provider refused this request (HTTP {status}). Nothing was charged."
        )
    return UpstreamFailed(f"The model provider failed ({failure}). Nothing was charged.")


class ReplyCut(AICreditsError):
    """The model provider broke off mid-reply. The delivered part was charged."""

    code = "upstream_cut"

    def __init__(self, message: str, result: TurnResult) -> None:
        super().__init__(message)
        self.result = result


class ReplyInterrupted(ReplyCut):
    """This server was shutting down and cut the reply. The delivered part was charged."""

    code = "server_restarting"


class ServerRestarting(AICreditsError):
    """This server is shutting down (a deploy, a reload): it takes no new calls, and cut a
    call that had delivered nothing yet. Nothing was charged; the call can be retried."""

    code = "server_restarting"


class IdempotencyKeyReused(AICreditsError):
    """A call came again with an Idempotency-Key already used: it is not run twice."""

    code = "duplicate_request"


# A client's Idempotency-Key: printable, and short enough to read in a log.
MAX_IDEMPOTENCY_KEY_CHARS = 200
KEY_REUSED = (
    "This Idempotency-Key was already used for a different request; this one was not run. "
    "Use a new key for a new request."
)

_END = object()  # the upstream finished
_INTERRUPT = object()  # drain: stop now


@dataclass(frozen=True, slots=True)
class Progress:
    """What a call has delivered, for a checkpoint."""

    # The first choice's text: the reply so far, for the caller's own record of it.
    text: str
    # Every generated text of every choice (content, refusals, tool calls): what is charged.
    billable: list[str]
    chars: int

    @property
    def tokens(self) -> int:
        return sum(count_text_tokens(text) for text in self.billable)


@dataclass(frozen=True, slots=True)
class TurnResult:
    request_id: str
    model: str
    text: str
    input_tokens: int
    output_tokens: int
    estimated: bool
    cost: int
    charged: int
    unbilled: int
    # The account balance after the charge; None when nothing was charged.
    balance_after: int | None
    outcome: Outcome
    finish_reason: str | None
    # Every choice as delivered (the first one's text is `text`).
    choices: tuple[ReplyChoice, ...] = ()
    # Of output_tokens, how many the model spent reasoning (from the provider's usage).
    reasoning_tokens: int = 0


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


class Turn:
    """A reserved call, ready to run once. Iterate `stream()` (text as it arrives) or await
    `run()` (the whole reply); either way `result` is set when it ends. A turn that will not
    be run must be given up with `abandon()`."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        request: ChatRequest,
        request_id: str,
        quote: Quote,
        hold: HoldView,
        slot: Slot,
        max_tokens: int,
    ) -> None:
        self._gateway = gateway
        self.request = request
        self.request_id = request_id
        self.quote = quote
        self.hold = hold
        self._slot = slot
        self.max_tokens = max_tokens
        self.result: TurnResult | None = None
        self._started = False
        self._reply = ReplyBuilder(request.n)
        self._checkpointed_chars = 0
        self._queue: asyncio.Queue[object] | None = None
        self._interrupted = False
        self.on_progress: ProgressSink | None = None
        self.on_finished: FinishHook | None = None

    async def stream(
        self, *, upstream_headers: dict[str, str] | None = None
    ) -> AsyncGenerator[str, None]:
        """Yield the reply's text as it arrives (of its first choice: a caller that asks for
        plain text asks for one). Text handed out counts as delivered: if the caller stops
        (closes this generator, or is cancelled), it pays for exactly that much."""
        # aclosing: closing this generator must close (and so settle) the inner one now,
        # not whenever the garbage collector gets to it.
        async with contextlib.aclosing(
            self._run(incremental=True, headers=upstream_headers)
        ) as run:
            async for delta in run:
                if delta.index == 0 and delta.text:
                    yield delta.text

    async def deltas(
        self, *, upstream_headers: dict[str, str] | None = None
    ) -> AsyncGenerator[Delta, None]:
        """Yield every piece of the reply as it arrives: text, tool-call pieces, refusals and
        log probabilities, of every choice. Each counts as delivered once handed out."""
        async with contextlib.aclosing(
            self._run(incremental=True, headers=upstream_headers)
        ) as run:
            async for delta in run:
                yield delta

    async def run(self, *, upstream_headers: dict[str, str] | None = None) -> TurnResult:
        """The whole reply at once. Nothing is delivered until it is complete, so a failure
        anywhere before then charges nothing."""
        async with contextlib.aclosing(
            self._run(incremental=False, headers=upstream_headers)
        ) as run:
            async for _ in run:
                pass
        assert self.result is not None
        return self.result

    async def abandon(self) -> None:
        """Give up a turn that was reserved but will not run: its hold and slot go back."""
        if self._started:
            return
        self._started = True
        try:
            await run_blocking_to_completion(ledger.release, self._gateway.db, hold_id=self.hold.id)
        finally:
            await self._slot.release()

    def interrupt(self) -> None:
        """Cut this turn now (the server is shutting down): it ends as `interrupted`, settled
        for what it delivered."""
        if not self._interrupted:
            self._interrupted = True
            if self._queue is not None:
                self._queue.put_nowait(_INTERRUPT)

    def undelivered_progress(self) -> Progress | None:
        """What was delivered so far, if more was delivered since the last checkpoint."""
        reply = self._reply
        if reply.chars == self._checkpointed_chars:
            return None
        return Progress(text=reply.text, billable=reply.billable_texts(), chars=reply.chars)

    def checkpointed(self, progress: Progress) -> None:
        self._checkpointed_chars = max(self._checkpointed_chars, progress.chars)

    async def renew_slot(self) -> None:
        await self._slot.renew()

    async def _read_upstream(
        self, call: dict[str, Any], incremental: bool, queue: asyncio.Queue[object]
    ) -> None:
        """Runs as its own task, so a drain can cut the turn while it waits on the upstream."""
        upstream = self._gateway.upstream
        try:
            if incremental:
                async for event in upstream.stream(**call):
                    queue.put_nowait(event)
            else:
                # Nothing is delivered before the end, so the upstream need not stream.
                choices, finished = await upstream.complete(**call)
                for delta in choices:
                    queue.put_nowait(delta)
                queue.put_nowait(finished)
            queue.put_nowait(_END)
        except Exception as error:  # noqa: BLE001 - handed to the turn, which raises it
            queue.put_nowait(error)

    async def _run(
        self, *, incremental: bool, headers: dict[str, str] | None
    ) -> AsyncGenerator[Delta, None]:
        if self._started:
            raise RuntimeError("a turn runs once")
        self._started = True
        usage: Usage | None = None
        finish_reasons: Mapping[int, str] = {}
        outcome: Outcome = "failed"
        failure: UpstreamError | None = None
        spec = self._gateway.settings.model_spec(self.request.model)
        assert spec is not None
        call: dict[str, Any] = {
            "model": spec.upstream_model,
            "messages": self.request.messages,
            "max_tokens": self.max_tokens,
            "request_id": self.request_id,
            "params": self.request.params,
            "headers": headers,
            # A reasoning model's cap bounds its reasoning too; max_tokens is refused there.
            "cap_field": "max_completion_tokens" if spec.reasoning else "max_tokens",
        }
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._queue = queue
        inflight = self._gateway.inflight
        inflight.add(self)
        if inflight.draining:
            self.interrupt()
        reader = asyncio.ensure_future(self._read_upstream(call, incremental, queue))
        try:
            while True:
                item = await queue.get()
                if self._interrupted:
                    outcome = "interrupted"
                    break
                if item is _END:
                    outcome = "completed"
                    break
                if isinstance(item, Delta):
                    self._reply.add(
                        index=item.index,
                        text=item.text,
                        tool_calls=item.tool_calls,
                        refusal=item.refusal,
                        logprobs=item.logprobs,
                    )
                    if incremental:
                        yield item
                elif isinstance(item, Finished):
                    usage, finish_reasons = item.usage, item.finish_reasons
                elif isinstance(item, BaseException):
                    raise item
        except UpstreamError as error:
            failure = error
            outcome = "cut" if incremental and self._reply.delivered else "failed"
        except BaseException:
            outcome = "stopped"  # the caller went away (closed the stream, or was cancelled)
            raise
        finally:
            reader.cancel()
            reader.add_done_callback(_ignore_outcome)
            # A whole reply not streamed is delivered only if it completed.
            delivered = (
                self._reply
                if (incremental or outcome == "completed")
                else ReplyBuilder(self.request.n)
            )
            # The rate-limit slot is freed while the settle runs rather than after it: the
            # ledger never relies on the slot, and the caller waits one round trip less.
            releasing = asyncio.ensure_future(self._slot.release())
            try:
                self.result = await self._settle(outcome, delivered, usage, finish_reasons)
                await self._finished(self.result)
            finally:
                inflight.discard(self)
                await releasing
                metrics.upstream_call(
                    model=self.request.model,
                    outcome=outcome,
                    error_kind=failure.kind if failure is not None else None,
                )
        if outcome == "interrupted":
            assert self.result is not None
            if not self.result.charged and not self.result.text:
                raise ServerRestarting(
                    "The server is restarting and stopped this call before any reply. "
                    "Nothing was charged; try again in a few seconds."
                )
            raise ReplyInterrupted(
                "The server restarted and cut this reply; you were charged "
                f"{self.result.charged} credits for the part delivered.",
                self.result,
            )
        if failure is not None:
            if outcome == "failed":
                raise provider_failure(
                    failure, model=self.request.model, request_id=self.request_id
                ) from failure
            logger.warning(
                "upstream %s for %s (%s), outcome %s", failure.kind, self.request_id,
                failure, outcome,
            )  # fmt: skip
            assert self.result is not None
            raise ReplyCut(
                f"The model provider broke off the reply ({failure}); you were charged "
                f"{self.result.charged} credits for the part delivered.",
                self.result,
            ) from failure

    async def _finished(self, result: TurnResult) -> None:
        if self.on_finished is None:
            return
        try:
            await run_blocking_to_completion(self.on_finished, result)
        except Exception:
            # The charge is settled; what failed is the caller's record of the reply (the
            # sweeper's recovery finishes a chat reply left half-written).
            logger.exception("recording the end of %s failed", self.request_id)

    async def _settle(
        self,
        outcome: Outcome,
        delivered: ReplyBuilder,
        usage: Usage | None,
        finish_reasons: Mapping[int, str],
    ) -> TurnResult:
        gateway = self._gateway
        reply = _Reply(delivered.text, delivered.choices(finish_reasons), finish_reasons.get(0))
        if outcome != "completed" and not delivered.delivered:
            hold = await run_blocking_to_completion(
                ledger.release, gateway.db, hold_id=self.hold.id
            )
            if hold.status == "released":  # not swept as expired meanwhile
                metrics.credits_released(model=self.request.model, credits=hold.amount)
            return self._result(reply, 0, 0, False, 0, 0, 0, None, outcome)
        reasoning_tokens = 0
        if outcome == "completed" and usage is not None:
            input_tokens, output_tokens, estimated = usage.input_tokens, usage.output_tokens, False
            reasoning_tokens = usage.reasoning_tokens
        else:
            # No usage from the upstream (cut, stopped, or not supported): count what was
            # actually delivered, of every choice, and say so on the usage event.
            input_tokens = self.quote.prompt_tokens
            output_tokens = sum(count_text_tokens(text) for text in delivered.billable_texts())
            estimated = True
        cost = pricing.price_usage(
            self.quote.price, input_tokens=input_tokens, output_tokens=output_tokens
        )
        record = UsageRecord(
            model=self.request.model,
            price_version_id=self.quote.price.version_id,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            estimated=estimated,
            outcome=outcome,
        )
        # No thread on Postgres (one statement from the event loop), and never abandoned.
        settled = await to_completion(
            ledger.settle_async(gateway.db, hold=self.hold, actual_credits=cost, usage=record)
        )
        metrics.upstream_tokens(
            model=self.request.model, input_tokens=input_tokens, output_tokens=output_tokens
        )
        metrics.credits_settled(
            model=self.request.model,
            charged=settled.charged,
            # A hold already expired (swept) gave its credits back then, not now.
            released=self.hold.amount - settled.charged if settled.applied else 0,
            unbilled=settled.unbilled,
        )
        if settled.charged:
            gateway.note_spend(self.hold.user_id, settled)
        return self._result(
            reply,
            input_tokens,
            output_tokens,
            estimated,
            cost,
            settled.charged,
            settled.unbilled,
            settled.balance_after,
            outcome,
            reasoning_tokens,
        )

    def _result(
        self,
        reply: _Reply,
        input_tokens: int,
        output_tokens: int,
        estimated: bool,
        cost: int,
        charged: int,
        unbilled: int,
        balance_after: int | None,
        outcome: Outcome,
        reasoning_tokens: int = 0,
    ) -> TurnResult:
        return TurnResult(
            request_id=self.request_id,
            model=self.request.model,
            text=reply.text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            estimated=estimated,
            cost=cost,
            charged=charged,
            unbilled=unbilled,
            balance_after=balance_after,
            outcome=outcome,
            finish_reason=reply.finish_reason,
            choices=reply.choices,
            reasoning_tokens=reasoning_tokens,
        )


@dataclass(frozen=True, slots=True)
class _Reply:
    text: str
    choices: tuple[ReplyChoice, ...]
    finish_reason: str | None


def _ignore_outcome(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: the turn already handled what the reader reported


class InFlightCall(Protocol):
    """A metered call while it runs: a chat Turn, or an embedding call."""

    hold: HoldView
    on_progress: ProgressSink | None

    def undelivered_progress(self) -> Progress | None: ...

    def checkpointed(self, progress: Progress) -> None: ...

    def interrupt(self) -> None: ...

    async def renew_slot(self) -> None: ...


class InFlight:
    """The calls running in this process through one gateway. Every `checkpoint_seconds` it
    renews their holds' leases and their rate-limit slots, and records what each has
    delivered (with the caller's own record of it, `Turn.on_progress`), in one transaction.
    On shutdown it drains them."""

    def __init__(self, db: Database, *, lease_seconds: float, checkpoint_seconds: float) -> None:
        self.db = db
        self.lease = timedelta(seconds=lease_seconds)
        self.interval = checkpoint_seconds
        self.draining = False
        self._turns: set[InFlightCall] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain: asyncio.Future[int] | None = None
        self._consumers: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._turns)

    def add(self, turn: InFlightCall) -> None:
        self._turns.add(turn)
        self._idle.clear()
        # The task showing this turn to its caller (a chat tab's event, an API response):
        # a drain waits for it too, so a cut reply's last words reach the caller.
        consumer = asyncio.current_task()
        if consumer is not None:
            self._consumers.add(consumer)
            consumer.add_done_callback(self._consumers.discard)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def discard(self, turn: InFlightCall) -> None:
        self._turns.discard(turn)
        if not self._turns:
            self._idle.set()

    async def _tick(self) -> None:
        try:
            while self._turns:
                await asyncio.sleep(self.interval)
                try:
                    await self.checkpoint()
                except Exception:
                    # A missed checkpoint costs at most one more interval of tokens if this
                    # worker dies now; the next one catches up.
                    logger.exception("checkpointing %d replies in flight failed", len(self))
        finally:
            self._ticker = None

    async def checkpoint(self) -> None:
        """Renew every running turn's lease and slot; record new progress."""
        turns = list(self._turns)
        if not turns:
            return
        progress = [(turn, turn.undelivered_progress()) for turn in turns]
        await asyncio.gather(*(turn.renew_slot() for turn in turns))
        await run_blocking(self._write, progress)

    def _write(self, progress: list[tuple[InFlightCall, Progress | None]]) -> None:
        now = utcnow()
        until = now + self.lease
        done: list[tuple[InFlightCall, Progress]] = []
        with self.db.transaction() as conn:
            ledger.renew_leases(
                conn, hold_ids=[t.hold.id for t, p in progress if p is None], until=until
            )
            for turn, delivered in progress:
                if delivered is None:
                    continue
                recorded = ledger.record_progress(
                    conn,
                    hold_id=turn.hold.id,
                    delivered_tokens=delivered.tokens,
                    until=until,
                    now=now,
                )
                if recorded and turn.on_progress is not None:
                    turn.on_progress(conn, delivered.text)
                done.append((turn, delivered))
        for turn, delivered in done:
            turn.checkpointed(delivered)

    def drain(self, grace: float, *, settle_wait: float = 5.0) -> asyncio.Future[int]:
        """Take no new turns; let the running ones finish for up to `grace` seconds, then cut
        the rest and wait (up to `settle_wait`) for them to settle. Returns how many were cut.
        Asked again (the signal, then the lifespan's end), it is the same drain."""
        if self._drain is None:
            self.draining = True
            self._drain = asyncio.ensure_future(self._drain_now(grace, settle_wait))
        return asyncio.shield(self._drain)

    async def _drain_now(self, grace: float, settle_wait: float) -> int:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        cut = list(self._turns)
        for turn in cut:
            turn.interrupt()
        if cut:
            logger.warning("shutting down: cut %d replies in flight after %.0f s", len(cut), grace)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=settle_wait)
            except TimeoutError:
                # Settling is stuck (the database?): leave what was delivered on record, for
                # the sweeper to charge once the leases lapse.
                with contextlib.suppress(Exception):
                    await self.checkpoint()
        callers = self._consumers - {asyncio.current_task()}
        if callers:
            await asyncio.wait(callers, timeout=settle_wait)
        return len(cut)


class Gateway:
    def __init__(
        self, *, db: Database, settings: Settings, upstream: Upstream, limiter: RateLimiter
    ) -> None:
        self.db = db
        self.settings = settings
        self.upstream = upstream
        self.limiter = limiter
        self.admission = Admission(limiter, self._release_hold)
        self.inflight = InFlight(
            db,
            lease_seconds=settings.hold_lease_seconds,
            checkpoint_seconds=settings.stream_checkpoint_seconds,
        )
        self._background: set[asyncio.Task[None]] = set()

    async def _release_hold(self, hold: HoldView) -> None:
        await run_blocking_to_completion(ledger.release, self.db, hold_id=hold.id)

    async def aclose(self, *, background_wait: float = 5.0) -> None:
        """Close the gateway's connections, once its calls are over (the app's shutdown,
        after the drain): the spend notes still being written get `background_wait` seconds
        first, and the rate limiter sends the slot releases it still owes."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=background_wait)
        await self.upstream.aclose()
        await self.limiter.aclose()
        if not self.db.is_sqlite:
            await self.db.aclose_async()

    def note_spend(self, user_id: int, settled: ledger.SettleResult | None = None) -> None:
        """Record usage-threshold crossings after a charge, off the request path: an API user
        who never opens the site still gets the warning email. Given the settle's result, it
        skips the work when that shows nothing to record (most charges)."""
        if (
            settled is not None
            and settled.balance_after is not None
            and not thresholds.may_need_recording(
                self.settings,
                balance=settled.balance_after,
                top_up_id=settled.top_up_id,
                top_up_balance_after=settled.top_up_balance_after,
            )
        ):
            return

        async def record() -> None:
            try:
                await run_blocking(
                    thresholds.record_crossings, self.db, self.settings, user_id=user_id
                )
            except Exception:
                logger.exception("recording threshold crossings for user %s failed", user_id)

        task = asyncio.get_running_loop().create_task(record())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(
        self,
        *,
        user_id: int,
        request: ChatRequest,
        ip: str | None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Turn:
        """Validate, check the limits and reserve the worst case. Nothing is sent upstream."""
        request_id, hold_key = self.admit(user_id, request_id, idempotency_key)
        spec = self.settings.model_spec(request.model)
        if spec is None:
            raise UnknownModel(f"model {request.model!r} is not offered here")
        check_model_takes(spec, request)
        price = await self.price(request.model)
        quote = pricing.quote_request(price, spec, request)
        hold, slot = await self.reserve(
            user_id=user_id, ip=ip, request_id=request_id, hold_key=hold_key, quote=quote,
            model=request.model, digest=keyed_digest(request, request_id, hold_key),
        )  # fmt: skip
        return Turn(
            self,
            request=request,
            request_id=request_id,
            quote=quote,
            hold=hold,
            slot=slot,
            max_tokens=quote.max_output_tokens,
        )

    def admit(
        self, user_id: int, request_id: str | None, idempotency_key: str | None
    ) -> tuple[str, str]:
        """A new metered call's request id and its hold's key; none while the server drains."""
        if self.inflight.draining:
            raise ServerRestarting(
                "The server is restarting and takes no new calls; try again in a few seconds."
            )
        request_id = request_id or new_request_id()
        return request_id, idempotent_hold_key(user_id, idempotency_key) or request_id

    async def price(self, model: str) -> pricing.Price:
        price = pricing.cached_price(self.db, model=model)
        if price is None:
            price = await run_blocking(pricing.recent_price, self.db, model=model)
        return price

    async def reserve(
        self,
        *,
        user_id: int,
        ip: str | None,
        request_id: str,
        hold_key: str,
        quote: Quote,
        model: str,
        digest: str | None = None,
    ) -> tuple[HoldView, Slot]:
        """Take a rate-limit slot and reserve the quote: what every metered call does before
        it may reach the upstream. `digest` (domain.digest) is a keyed call's request, kept
        on the hold so a replay of the key with another request is told apart."""
        if subscriptions.past_due_may_block(self.settings):
            await run_blocking(
                subscriptions.check_plan_usable, self.db, self.settings, user_id=user_id
            )
        try:
            slot, hold = await self.admission.admit(
                user_id=user_id,
                ip=ip,
                request_id=request_id,
                keyed=hold_key != request_id,
                reserve=lambda: ledger.reserve_async(
                    self.db,
                    user_id=user_id,
                    credits=quote.credits,
                    request_id=hold_key,
                    lease=timedelta(seconds=self.settings.hold_lease_seconds),
                    pricing=HoldPricing(
                        model=model,
                        price_version_id=quote.price.version_id,
                        input_tokens=quote.prompt_tokens,
                        request_digest=digest,
                    ),
                ),
            )
        except IdempotencyConflict:
            # Another worst case: another request. (The ledger's message names the hold's
            # key, which the client never sees.)
            raise IdempotencyConflict(KEY_REUSED) from None
        except InsufficientCredits as refused:
            # A plan user is told their plan and its reset date (quota_exceeded).
            raise await run_blocking(
                subscriptions.quota_error, self.db, self.settings, user_id=user_id, refused=refused
            ) from None
        if hold.replayed:
            await slot.release()
            # Another model, prompt size or body is another request, even at the same worst
            # case. (A hold made before digests were kept has none: its model and size decide.)
            if (hold.model, hold.input_tokens) != (model, quote.prompt_tokens) or (
                hold.request_digest is not None and hold.request_digest != digest
            ):
                raise IdempotencyConflict(KEY_REUSED)
            raise IdempotencyKeyReused(
                "A request with this idempotency key was already made; it was not run again."
            )
        metrics.credits_reserved(model=model, credits=hold.amount)
        return hold, slot


def keyed_digest(request: object, request_id: str, hold_key: str) -> str | None:
    """The request's digest when it carries an Idempotency-Key (its hold has the key's hold
    key, not its request id); None otherwise, which costs an unkeyed call nothing."""
    return request_digest(request) if hold_key != request_id else None


def idempotent_hold_key(user_id: int, idempotency_key: str | None) -> str | None:
    """The hold key of a request with a client's Idempotency-Key (None without one), so a
    retry finds the first request's hold. The key is hashed: any allowed key fits the
    column, and it is not stored as the client wrote it."""
    if idempotency_key is None:
        return None
    if not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS or not (
        idempotency_key.isascii() and idempotency_key.isprintable()
    ):
        raise InvalidIdempotencyKey(
            f"The Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII "
            "characters."
        )
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]
    return f"idem:{user_id}:{digest}"


def check_model_takes(spec: ModelSpec, request: ChatRequest) -> None:
    """Refuse what this model cannot do: images on a model not marked for vision, reasoning
    effort on a model that does not reason."""
    if request.images and not spec.vision:
        raise UnsupportedParameter(
            f"model {spec.id!r} does not take images (image_url parts); send text only, or "
            "use a model that takes images (see /v1/models)",
            param="messages",
        )
    if request.reasoning_effort is not None and not spec.reasoning:
        raise UnsupportedParameter(
            f"reasoning_effort: model {spec.id!r} is not a reasoning model",
            param="reasoning_effort",
        )


def rate_limits(settings: Settings) -> RateLimits:
    return RateLimits(
        user_per_minute=settings.rate_limit_user_per_minute,
        ip_per_minute=settings.rate_limit_ip_per_minute,
        concurrent_per_user=settings.rate_limit_concurrent,
        slot_ttl_seconds=settings.hold_lease_seconds,
    )


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, Gateway]] = (
    weakref.WeakKeyDictionary()
)


def shared_gateway(settings: Settings, db: Database) -> Gateway:
    """The gateway for these settings in the running event loop: the chat page and the API
    share it, and so share one in-process rate limiter and one upstream connection pool."""
    loop = asyncio.get_running_loop()
    per_loop = _shared.setdefault(loop, {})
    gateway = per_loop.get(id(settings))
    if gateway is None or gateway.settings is not settings:
        gateway = per_loop[id(settings)] = build_gateway(settings, db)
        gateway.inflight.draining = loop in _draining
    return gateway


# Event loops whose app is shutting down: a gateway made there from now on takes no calls.
_draining: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


async def drain_all(grace: float) -> int:
    """Drain every gateway of the running event loop (the app's shutdown): see InFlight.drain.
    Returns how many replies were cut."""
    loop = asyncio.get_running_loop()
    _draining.add(loop)
    gateways = list(_shared.get(loop, {}).values())
    cut = await asyncio.gather(*(g.inflight.drain(grace) for g in gateways))
    return sum(cut)


async def close_all() -> None:
    """Close every gateway of the running event loop (the app's shutdown, after drain_all):
    the upstream's, Redis's and this loop's Postgres connections end cleanly rather than
    being dropped with the process. A gateway asked for after this is a new one, and takes
    no calls (the loop is draining)."""
    loop = asyncio.get_running_loop()
    gateways = list(_shared.pop(loop, {}).values())
    closed = await asyncio.gather(*(g.aclose() for g in gateways), return_exceptions=True)
    for error in closed:
        if isinstance(error, Exception):
            logger.warning("closing a gateway failed: %s: %s", type(error).__name__, error)


def build_gateway(settings: Settings, db: Database) -> Gateway:
    """A gateway for the running event loop (its HTTP and Redis clients belong to it)."""
    upstream = Upstream(
        base_url=settings.upstream_base_url,
        api_key=settings.openai_api_key,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
        retries=settings.upstream_retries,
        max_seconds=settings.upstream_max_seconds,
    )
    limiter = build_rate_limiter(
        rate_limits(settings),
        redis_url=settings.redis_url or None,
        fail_open=settings.rate_limit_fail_open,
    )
    return Gateway(db=db, settings=settings, upstream=upstream, limiter=limiter)
