"""One metered chat turn, for the chat UI and the OpenAI-compatible API alike.

    start():  validate (model, prompt size, max_tokens)  -> InvalidRequest / UnknownModel
              rate limits (per user, per IP, in flight)   -> RateLimited / LimiterUnavailable
              price the worst case and RESERVE it         -> InsufficientCredits
    stream(): call the upstream                           -> on failure before any output:
                                                             RELEASE, UpstreamFailed
              SETTLE actual usage: charge, release the rest, append the usage event

Nothing is spent upstream before the reservation succeeds. What a cut reply costs is the
refund policy in the README: every token delivered is paid for, nothing else is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from aicredits.adapters import metrics
from aicredits.adapters.blocking import run_blocking, run_blocking_to_completion
from aicredits.adapters.db import Database
from aicredits.adapters.ratelimit import RateLimiter, RateLimits, Slot, build_rate_limiter
from aicredits.adapters.tokenizer import count_text_tokens
from aicredits.adapters.upstream import Delta, Upstream, UpstreamError, Usage
from aicredits.domain.chat import ChatRequest
from aicredits.domain.errors import AICreditsError, UnknownModel
from aicredits.services import ledger, pricing, thresholds
from aicredits.services.ledger import HoldView, UsageRecord
from aicredits.services.pricing import Quote
from aicredits.settings import Settings

logger = logging.getLogger(__name__)

Outcome = Literal["completed", "stopped", "cut", "failed"]


class UpstreamFailed(AICreditsError):
    """The model provider failed before any output. Nothing was charged."""

    code = "upstream_failed"


class ReplyCut(AICreditsError):
    """The model provider broke off mid-reply. The delivered part was charged."""

    code = "upstream_cut"

    def __init__(self, message: str, result: TurnResult) -> None:
        super().__init__(message)
        self.result = result


class DuplicateRequest(AICreditsError):
    code = "duplicate_request"


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


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


class Turn:
    """A reserved call, ready to run once. Iterate `stream()` (text as it arrives) or await
    `run()` (the whole reply); either way `result` is set when it ends."""

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

    async def stream(
        self, *, upstream_headers: dict[str, str] | None = None
    ) -> AsyncGenerator[str, None]:
        """Yield the reply as it arrives. Text handed out counts as delivered: if the caller
        stops (closes this generator, or is cancelled), it pays for exactly that much."""
        # aclosing: closing this generator must close (and so settle) the inner one now,
        # not whenever the garbage collector gets to it.
        async with contextlib.aclosing(
            self._run(incremental=True, headers=upstream_headers)
        ) as run:
            async for text in run:
                yield text

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

    async def _run(
        self, *, incremental: bool, headers: dict[str, str] | None
    ) -> AsyncGenerator[str, None]:
        if self._started:
            raise RuntimeError("a turn runs once")
        self._started = True
        delivered: list[str] = []
        usage: Usage | None = None
        finish_reason: str | None = None
        outcome: Outcome = "failed"
        failure: UpstreamError | None = None
        spec = self._gateway.settings.model_spec(self.request.model)
        assert spec is not None
        try:
            upstream = self._gateway.upstream
            call: dict[str, Any] = {
                "model": spec.upstream_model,
                "messages": self.request.messages,
                "max_tokens": self.max_tokens,
                "request_id": self.request_id,
                "params": self.request.params,
                "headers": headers,
            }
            if incremental:
                async for event in upstream.stream(**call):
                    if isinstance(event, Delta):
                        delivered.append(event.text)
                        yield event.text
                    else:
                        usage, finish_reason = event.usage, event.finish_reason
            else:
                # Nothing is delivered before the end, so the upstream need not stream.
                text, finished = await upstream.complete(**call)
                delivered.append(text)
                usage, finish_reason = finished.usage, finished.finish_reason
            outcome = "completed"
        except UpstreamError as error:
            failure = error
            outcome = "cut" if incremental and delivered else "failed"
        except BaseException:
            outcome = "stopped"  # the caller went away (closed the stream, or was cancelled)
            raise
        finally:
            try:
                self.result = await self._settle(
                    outcome,
                    delivered if (incremental or outcome == "completed") else [],
                    usage,
                    finish_reason,
                )
            finally:
                await self._slot.release()
                metrics.upstream_call(
                    model=self.request.model,
                    outcome=outcome,
                    error_kind=failure.kind if failure is not None else None,
                )
        if failure is not None:
            logger.warning(
                "upstream %s for %s (%s), outcome %s", failure.kind, self.request_id,
                failure, outcome,
            )  # fmt: skip
            if outcome == "failed":
                raise UpstreamFailed(
                    f"The model provider failed ({failure}). Nothing was charged."
                ) from failure
            assert self.result is not None
            raise ReplyCut(
                f"The model provider broke off the reply ({failure}); you were charged "
                f"{self.result.charged} credits for the part delivered.",
                self.result,
            ) from failure

    async def _settle(
        self,
        outcome: Outcome,
        delivered: list[str],
        usage: Usage | None,
        finish_reason: str | None,
    ) -> TurnResult:
        text = "".join(delivered)
        gateway = self._gateway
        if outcome != "completed" and not delivered:
            hold = await run_blocking_to_completion(
                ledger.release, gateway.db, hold_id=self.hold.id
            )
            if hold.status == "released":  # not swept as expired meanwhile
                metrics.credits_released(model=self.request.model, credits=hold.amount)
            return self._result(text, 0, 0, False, 0, 0, 0, None, outcome, finish_reason)
        if outcome == "completed" and usage is not None:
            input_tokens, output_tokens, estimated = usage.input_tokens, usage.output_tokens, False
        else:
            # No usage from the upstream (cut, stopped, or not supported): count what was
            # actually delivered, and say so on the usage event.
            input_tokens = self.quote.prompt_tokens
            output_tokens = count_text_tokens(text)
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
        settled = await run_blocking_to_completion(
            ledger.settle, gateway.db, hold=self.hold, actual_credits=cost, usage=record
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
            gateway.note_spend(self.hold.user_id)
        return self._result(
            text,
            input_tokens,
            output_tokens,
            estimated,
            cost,
            settled.charged,
            settled.unbilled,
            settled.balance_after,
            outcome,
            finish_reason,
        )

    def _result(
        self,
        text: str,
        input_tokens: int,
        output_tokens: int,
        estimated: bool,
        cost: int,
        charged: int,
        unbilled: int,
        balance_after: int | None,
        outcome: Outcome,
        finish_reason: str | None,
    ) -> TurnResult:
        return TurnResult(
            request_id=self.request_id,
            model=self.request.model,
            text=text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            estimated=estimated,
            cost=cost,
            charged=charged,
            unbilled=unbilled,
            balance_after=balance_after,
            outcome=outcome,
            finish_reason=finish_reason,
        )


class Gateway:
    def __init__(
        self, *, db: Database, settings: Settings, upstream: Upstream, limiter: RateLimiter
    ) -> None:
        self.db = db
        self.settings = settings
        self.upstream = upstream
        self.limiter = limiter
        self._background: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.limiter.aclose()

    def note_spend(self, user_id: int) -> None:
        """Record usage-threshold crossings after a charge, off the request path: an API user
        who never opens the site still gets the warning email."""

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
        request_id = request_id or new_request_id()
        spec = self.settings.model_spec(request.model)
        if spec is None:
            raise UnknownModel(f"model {request.model!r} is not offered here")
        price = pricing.cached_price(self.db, model=request.model)
        if price is None:
            price = await run_blocking(pricing.recent_price, self.db, model=request.model)
        quote = pricing.quote_worst_case(
            price, spec, messages=request.messages, max_tokens=request.max_tokens
        )
        slot = await self.limiter.acquire(user_id=user_id, ip=ip, request_id=request_id)
        # A client's idempotency key makes a retried request find the first one's hold.
        hold_key = f"idem:{user_id}:{idempotency_key}" if idempotency_key else request_id
        try:
            hold = await run_blocking(
                ledger.reserve,
                self.db,
                user_id=user_id,
                credits=quote.credits,
                request_id=hold_key,
                ttl=timedelta(seconds=self.settings.hold_ttl_seconds),
            )
        except BaseException:
            await slot.release()
            raise
        if hold.replayed:
            await slot.release()
            raise DuplicateRequest(
                "A request with this idempotency key was already made; it was not run again."
            )
        metrics.credits_reserved(model=request.model, credits=hold.amount)
        return Turn(
            self,
            request=request,
            request_id=request_id,
            quote=quote,
            hold=hold,
            slot=slot,
            max_tokens=quote.max_output_tokens,
        )


def rate_limits(settings: Settings) -> RateLimits:
    return RateLimits(
        user_per_minute=settings.rate_limit_user_per_minute,
        ip_per_minute=settings.rate_limit_ip_per_minute,
        concurrent_per_user=settings.rate_limit_concurrent,
        slot_ttl_seconds=float(settings.hold_ttl_seconds),
    )


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, Gateway]] = (
    weakref.WeakKeyDictionary()
)


def shared_gateway(settings: Settings, db: Database) -> Gateway:
    """The gateway for these settings in the running event loop: the chat page and the API
    share it, and so share one in-process rate limiter and one upstream connection pool."""
    per_loop = _shared.setdefault(asyncio.get_running_loop(), {})
    gateway = per_loop.get(id(settings))
    if gateway is None or gateway.settings is not settings:
        gateway = per_loop[id(settings)] = build_gateway(settings, db)
    return gateway


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
