"""One metered embeddings call, through the same reserve, call and settle as a chat turn.

    start_embeddings(): validate (model, input sizes, dimensions)  -> InvalidRequest
                        rate limits, then RESERVE the input tokens  -> InsufficientCredits
    EmbeddingCall.run(): call the upstream                          -> on failure: RELEASE,
                                                                       UpstreamFailed
                        SETTLE the provider's usage

An embedding call has no output: its worst case is its input, counted with tiktoken (the
tokenizer of OpenAI's embedding models) and priced at the model's input price. While it
runs it is one of the gateway's calls in flight, so its lease is renewed and a drain can cut
it; nothing is delivered before the end, so a call cut or failed costs nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aicredits.adapters import metrics
from aicredits.adapters.blocking import run_blocking, run_blocking_to_completion
from aicredits.adapters.ratelimit import Slot
from aicredits.adapters.tokenizer import count_text_tokens
from aicredits.adapters.upstream import UpstreamError, Usage
from aicredits.domain.embeddings import EmbeddingRequest
from aicredits.domain.errors import InvalidParameter, UnknownModel, UnsupportedParameter
from aicredits.services import ledger, pricing
from aicredits.services.gateway import (
    Gateway,
    Outcome,
    Progress,
    ProgressSink,
    ServerRestarting,
    keyed_digest,
    provider_failure,
)
from aicredits.services.ledger import HoldView, UsageRecord
from aicredits.services.pricing import Quote
from aicredits.settings import EmbeddingModelSpec

# OpenAI's limit on the tokens of all the inputs of one request.
MAX_TOKENS_PER_REQUEST = 300_000


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    request_id: str
    model: str
    # The embeddings as the provider sent them ({"object", "index", "embedding"} each).
    data: list[dict[str, Any]]
    input_tokens: int
    # True when the provider sent no usage and the counted input was charged.
    estimated: bool
    cost: int
    charged: int
    unbilled: int
    balance_after: int | None


def count_inputs(request: EmbeddingRequest, spec: EmbeddingModelSpec) -> int:
    """The tokens of every input, checked against the model's limits."""
    if len(request.inputs) > spec.max_inputs:
        raise InvalidParameter(
            f"{spec.id} takes at most {spec.max_inputs} inputs per request", param="input"
        )
    total = 0
    for index, item in enumerate(request.inputs):
        tokens = count_text_tokens(item) if isinstance(item, str) else len(item)
        if tokens > spec.max_input_tokens:
            raise InvalidParameter(
                f"input[{index}] is {tokens} tokens; {spec.id} takes at most "
                f"{spec.max_input_tokens} per input",
                param="input",
            )
        total += tokens
    if total > MAX_TOKENS_PER_REQUEST:
        raise InvalidParameter(
            f"the inputs are {total} tokens; at most {MAX_TOKENS_PER_REQUEST} per request",
            param="input",
        )
    return total


class EmbeddingCall:
    """A reserved embeddings call, ready to run once with `run()`."""

    on_progress: ProgressSink | None = None

    def __init__(
        self,
        gateway: Gateway,
        *,
        request: EmbeddingRequest,
        spec: EmbeddingModelSpec,
        request_id: str,
        quote: Quote,
        hold: HoldView,
        slot: Slot,
    ) -> None:
        self._gateway = gateway
        self.request = request
        self.spec = spec
        self.request_id = request_id
        self.quote = quote
        self.hold = hold
        self._slot = slot
        self._task: asyncio.Future[tuple[list[dict[str, Any]], Usage | None]] | None = None
        self._interrupted = False

    # What the gateway's InFlight asks of a call: nothing is delivered before the end.
    def undelivered_progress(self) -> Progress | None:
        return None

    def checkpointed(self, progress: Progress) -> None:
        pass

    async def renew_slot(self) -> None:
        await self._slot.renew()

    def interrupt(self) -> None:
        self._interrupted = True
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> EmbeddingResult:
        gateway = self._gateway
        self._task = asyncio.ensure_future(
            gateway.upstream.embed(
                model=self.spec.upstream_model,
                inputs=self.request.upstream_input,
                encoding_format=self.request.encoding_format,
                request_id=self.request_id,
                params=self.request.params,
            )
        )
        inflight = gateway.inflight
        inflight.add(self)
        if inflight.draining:
            self.interrupt()
        outcome: Outcome = "failed"
        failure: UpstreamError | None = None
        try:
            data, usage = await self._task
            outcome = "completed"
        except UpstreamError as error:
            failure = error
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._interrupted or (current is not None and current.cancelling()):
                outcome = "stopped"  # the caller went away
                raise
            outcome = "interrupted"
        finally:
            if outcome != "completed":
                self._task.cancel()
                await self._release()
            inflight.discard(self)
            await self._slot.release()
            metrics.upstream_call(
                model=self.request.model,
                outcome=outcome,
                error_kind=failure.kind if failure is not None else None,
            )
        if outcome == "interrupted":
            raise ServerRestarting(
                "The server is restarting and stopped this call. Nothing was charged; try "
                "again in a few seconds."
            )
        if failure is not None:
            raise provider_failure(
                failure, model=self.request.model, request_id=self.request_id
            ) from failure
        return await self._settle(data, usage)

    async def _release(self) -> None:
        hold = await run_blocking_to_completion(
            ledger.release, self._gateway.db, hold_id=self.hold.id
        )
        if hold.status == "released":
            metrics.credits_released(model=self.request.model, credits=hold.amount)

    async def _settle(self, data: list[dict[str, Any]], usage: Usage | None) -> EmbeddingResult:
        if usage is not None:
            input_tokens, estimated = usage.input_tokens, False
        else:
            input_tokens, estimated = self.quote.prompt_tokens, True
        cost = pricing.price_usage(self.quote.price, input_tokens=input_tokens, output_tokens=0)
        settled = await run_blocking_to_completion(
            ledger.settle,
            self._gateway.db,
            hold=self.hold,
            actual_credits=cost,
            usage=UsageRecord(
                model=self.request.model,
                price_version_id=self.quote.price.version_id,
                input_tokens=input_tokens,
                output_tokens=0,
                estimated=estimated,
                outcome="completed",
            ),
        )
        metrics.upstream_tokens(
            model=self.request.model, input_tokens=input_tokens, output_tokens=0
        )
        metrics.credits_settled(
            model=self.request.model,
            charged=settled.charged,
            released=self.hold.amount - settled.charged if settled.applied else 0,
            unbilled=settled.unbilled,
        )
        if settled.charged:
            self._gateway.note_spend(self.hold.user_id, settled)
        return EmbeddingResult(
            request_id=self.request_id,
            model=self.request.model,
            data=data,
            input_tokens=input_tokens,
            estimated=estimated,
            cost=cost,
            charged=settled.charged,
            unbilled=settled.unbilled,
            balance_after=settled.balance_after,
        )


async def start_embeddings(
    gateway: Gateway,
    *,
    user_id: int,
    request: EmbeddingRequest,
    ip: str | None,
    request_id: str | None = None,
    idempotency_key: str | None = None,
) -> EmbeddingCall:
    """Validate, check the limits and reserve the input. Nothing is sent upstream."""
    request_id, hold_key = gateway.admit(user_id, request_id, idempotency_key)
    spec = gateway.settings.embedding_model_spec(request.model)
    if spec is None:
        raise UnknownModel(f"embedding model {request.model!r} is not offered here")
    if "dimensions" in request.params and not spec.dimensions:
        raise UnsupportedParameter(
            f"dimensions: {spec.id} makes embeddings of one size only", param="dimensions"
        )
    input_tokens = await run_blocking(count_inputs, request, spec)
    price = await gateway.price(request.model)
    quote = pricing.quote_embeddings(price, input_tokens=input_tokens)
    hold, slot = await gateway.reserve(
        user_id=user_id, ip=ip, request_id=request_id, hold_key=hold_key, quote=quote,
        model=request.model, digest=keyed_digest(request, request_id, hold_key),
    )  # fmt: skip
    return EmbeddingCall(
        gateway,
        request=request,
        spec=spec,
        request_id=request_id,
        quote=quote,
        hold=hold,
        slot=slot,
    )
