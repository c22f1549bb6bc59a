"""What completions and chat completions share: model check, sampling parameters,
engine-error mapping, client-disconnect handling, SSE framing and logprob formatting."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from fastapi import Request

from kvasir.engine.async_llm import AsyncLLM, EngineDeadError, RequestRejectedError
from kvasir.engine.messages import SchedulingHints
from kvasir.entrypoints.openai.errors import OpenAIError, bad_request, from_value_error
from kvasir.entrypoints.openai.protocol import SamplingFields
from kvasir.entrypoints.openai.tenancy import Tenancy, combine_salts, request_tenant
from kvasir.lora.request import LoRARequest
from kvasir.outputs import Logprob, PositionLogprobs, RequestOutput
from kvasir.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from kvasir.entrypoints.openai.serving_lora import LoRAModels

logger = logging.getLogger(__name__)
T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"
_json = msgspec.json.Encoder()


class GuardHTTPError(OpenAIError, ValueError):
    """An input guard's block (a ValueError too: the handlers' error paths close the
    request's generators)."""


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


class ServingContext:
    """Per-server state the handlers need."""

    def __init__(self, engine: AsyncLLM, served_model_name: str, retry_after_s: int = 1) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.max_model_len = engine.model_info.max_model_len
        self.tokenizer = engine.tokenizer
        self.retry_after_s = retry_after_s
        # Chat extras (set by the launcher from --enable-auto-tool-choice,
        # --tool-call-parser and --reasoning-parser).
        self.enable_auto_tool_choice = False
        self.tool_call_parser: str | None = None
        self.reasoning_parser: str | None = None
        # Multi-LoRA (--enable-lora): the adapters a request's model may name.
        self.lora: LoRAModels | None = None
        if engine.config.lora_config is not None:
            from kvasir.entrypoints.openai.serving_lora import LoRAModels

            info = engine.model_info
            self.lora = LoRAModels(
                engine.config.lora_config,
                served_model_name,
                info.lora_module_shapes,
                info.max_lora_rank,
            )
        # --trust-request-chat-template: a request's own chat_template is rendered.
        self.trust_request_chat_template = False
        # --logprobs-precision: returned logprobs rounded to this many decimals.
        self.logprobs_precision: int | None = None
        # --api-keys-file: per-tenant limits, cache salts and metrics (None: no tenants).
        self.tenancy: Tenancy | None = None
        # --guard-config: kvasir.guard.pipeline.Guards (None: no guards).
        self.guards: Any = None

    async def generate(
        self,
        raw_request: Request,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        model: str | None = None,
        cache_salt: str | None = None,
        hints: SchedulingHints | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[RequestOutput, None]:
        """``engine.generate`` behind the request's API-key tenant: its limits are
        checked and charged on the first ``__anext__`` (a ``TenantLimitHTTPError``, a
        ValueError), its cache salt is mixed into ``cache_salt``, its name replaces the
        scheduling hints' tenant (the client's ``user`` field otherwise, which isolates
        nothing), and the unused budget is refunded when the generator closes."""
        if self.guards is not None and self.tokenizer is not None:
            self._check_input(prompt_token_ids)
        who = request_tenant(raw_request) if self.tenancy is not None else None
        ticket = None
        if who is not None:
            assert self.tenancy is not None
            params, ticket = self.tenancy.admit(
                who, prompt_token_ids, params, model, self.max_model_len
            )
            cache_salt = combine_salts(who.cache_salt, cache_salt)
            hints = msgspec.structs.replace(hints or SchedulingHints(), tenant=who.name)
        num_generated: dict[int, int] = {}
        delta = params.output_kind == RequestOutputKind.DELTA
        out_guards: dict[int, Any] = {}
        try:
            async for out in self.engine.generate(
                prompt_token_ids, params, request_id, cache_salt=cache_salt, hints=hints,
                **kwargs,
            ):  # fmt: skip
                if self.logprobs_precision is not None:
                    round_logprobs(out, self.logprobs_precision)
                if self.guards is not None and self._guard_output(out, out_guards):
                    yield out  # finish_reason "content_filter": the request ends here
                    return
                if ticket is not None:
                    for c in out.outputs:
                        k = len(c.token_ids)
                        num_generated[c.index] = num_generated.get(c.index, 0) + k if delta else k
                yield out
        finally:
            if ticket is not None:
                assert self.tenancy is not None
                self.tenancy.finish(ticket, sum(num_generated.values()))

    def _check_input(self, prompt_token_ids: list[int]) -> None:
        from kvasir.guard.pipeline import GuardBlocked

        text = self.tokenizer.decode(prompt_token_ids, skip_special_tokens=True)
        try:
            self.guards.check_input(text)
        except GuardBlocked as e:
            raise GuardHTTPError(
                400,
                f"The request was refused by the input guard ({', '.join(sorted(set(e.findings)))}).",
                "invalid_request_error",
                None,
                "content_filter",
            ) from None

    def _guard_output(self, out: RequestOutput, guards: dict[int, Any]) -> bool:
        """Run the output guards over ``out``'s text (each choice its own stream);
        True when one blocked: every unfinished choice then ends with
        ``content_filter``."""
        blocked = False
        for c in out.outputs:
            g = guards.get(c.index)
            if g is None:
                g = guards[c.index] = self.guards.output_stream()
            if g is None:
                return False
            text, b = g.feed(c.text)
            if c.finish_reason is not None or out.finished:
                tail, b2 = g.flush()
                text, b = text + tail, b or b2
            c.text = text
            blocked = blocked or b
        if blocked:
            for c in out.outputs:
                if c.finish_reason is None:
                    c.finish_reason = "content_filter"
            out.finished = True
        return blocked

    def check_beam_search(self, raw_request: Request) -> None:
        """Beam search runs many engine requests per API request: not for tenants with
        rate or concurrency limits (it would bypass them)."""
        who = request_tenant(raw_request) if self.tenancy is not None else None
        if who is None:
            return
        lim = who.limits
        if (lim.requests_per_minute, lim.tokens_per_minute, lim.max_concurrent_requests) != (
            None, None, None
        ):  # fmt: skip
            raise bad_request(
                f"use_beam_search is not available to tenant {who.name!r} (it has rate or "
                "concurrency limits)",
                "use_beam_search",
            )

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The adapter ``model`` names (None: the base model); an unknown name is a
        404 (400 naming ``model`` when adapters are served)."""
        if model is None or model == self.served_model_name:
            return None
        if self.lora is not None:
            return self.lora.resolve(model)
        if model != self.served_model_name:
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist. Served: `{self.served_model_name}`.",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def engine_error(self, e: BaseException, rename: dict[str, str] | None = None) -> OpenAIError:
        """Map what ``AsyncLLM.generate`` raises onto an HTTP error."""
        if isinstance(e, OpenAIError):
            return e
        if isinstance(e, RequestRejectedError):
            if e.queue_full:
                return OpenAIError(
                    429,
                    f"The server is overloaded: {e}. Retry later.",
                    "rate_limit_error",
                    None,
                    "queue_full",
                    {"Retry-After": str(_retry_after(e.retry_after_s, self.retry_after_s))},
                )
            return from_value_error(e, PARAM_NAMES, rename)
        if isinstance(e, EngineDeadError):
            return OpenAIError(
                503,
                f"The engine is not available: {e}",
                "service_unavailable_error",
                None,
                "engine_dead",
            )
        if isinstance(e, ValueError):
            return from_value_error(e, PARAM_NAMES, rename)
        raise e


PARAM_NAMES = set(SamplingFields.model_fields) | {
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "echo",
    "best_of",
    "suffix",
    "tools",
    "tool_choice",
    "response_format",
    "request_id",
}


def check_unsupported(req: SamplingFields) -> None:
    if req.use_beam_search and req.stream:
        raise bad_request("use_beam_search does not support stream", "use_beam_search")


def make_sampling_params(
    req: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    stream: bool,
    prompt_logprobs: int | None = None,
    rename: dict[str, str] | None = None,
    best_of: int | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """``structured_outputs``: a constraint the caller built (tool choice); without one,
    the request's own structured-output fields (``structured_outputs_for``)."""
    if structured_outputs is None:
        from kvasir.entrypoints.openai.structured import structured_outputs_for

        structured_outputs = structured_outputs_for(req)
    try:
        return SamplingParams(
            n=req.n,
            best_of=best_of,
            logit_bias=req.logit_bias,  # type: ignore[arg-type]  # string keys are parsed
            allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=structured_outputs,
        )
    except ValueError as e:
        raise from_value_error(e, PARAM_NAMES, rename) from None


def check_length(
    ctx: ServingContext,
    num_prompt_tokens: int,
    max_tokens: int | None,
    prompt_param: str,
    max_tokens_param: str,
) -> None:
    limit = ctx.max_model_len
    if num_prompt_tokens + 1 > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens (at least one more is needed to generate).",
            prompt_param,
            "context_length_exceeded",
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
        raise bad_request(
            f"{max_tokens_param} is too large: {max_tokens}. This model's maximum context "
            f"length is {limit} tokens and the prompt has {num_prompt_tokens} tokens.",
            max_tokens_param,
            "context_length_exceeded",
        )


# ---------------------------------------------------------------- disconnects


async def _wait_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(aw: Awaitable[T], raw_request: Request) -> T:
    """Await ``aw``; if the client disconnects first, cancel it (which aborts the
    engine requests behind it) and raise ClientDisconnected."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_wait_disconnect(raw_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected()


async def merge_async_iterators(
    iterators: list[AsyncGenerator[T, None]],
) -> AsyncGenerator[tuple[int, T], None]:
    """Items of several async generators as they come, tagged with the generator's
    index. Closing this closes them all (aborting their requests)."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await iterators[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Any] | None] = asyncio.Queue()
    sentinel_exc: list[BaseException] = []

    async def pump(i: int, it: AsyncGenerator[T, None]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except Exception as e:
            sentinel_exc.append(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    remaining = len(tasks)
    try:
        while remaining:
            got = await queue.get()
            if got is None:
                remaining -= 1
                if sentinel_exc:
                    raise sentinel_exc[0]
                continue
            yield got
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in iterators:
            await it.aclose()


async def first_outputs(gens: list[AsyncGenerator[T, None]]) -> list[T]:
    """The first item of every generator, concurrently. If one raises, the others are
    cancelled (aborting their requests) and the error propagates; the caller closes
    the generators."""
    tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------- SSE / logprobs


def sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def sse_error(err: OpenAIError) -> bytes:
    return sse(err.to_dict())


def internal_error(e: BaseException) -> OpenAIError:
    logger.exception("error while streaming", exc_info=e)
    return OpenAIError(
        500,
        f"internal server error: {type(e).__name__}",
        "internal_server_error",
        None,
        "internal_error",
    )


def round_logprobs(out: RequestOutput, ndigits: int) -> None:
    """Round every logprob of ``out`` in place (--logprobs-precision: fewer bits per
    query for a client reconstructing the model's output layer)."""
    positions: list[PositionLogprobs | None] = list(out.prompt_logprobs or [])
    for c in out.outputs:
        positions += c.logprobs or []
        if c.cumulative_logprob is not None:
            c.cumulative_logprob = round(c.cumulative_logprob, ndigits)
    for pos in positions:
        for lp in (pos or {}).values():
            if math.isfinite(lp.logprob):
                lp.logprob = round(lp.logprob, ndigits)


def safe_logprob(x: float) -> float:
    # JSON has no -inf/NaN; vLLM reports -9999.0 for impossible tokens.
    if math.isnan(x) or x < -9999.0:
        return -9999.0
    return float(x)


def token_text(tokenizer: Any, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])


def top_entries(pos: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely entries of one position, by rank."""
    items = sorted(pos.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
    return [kv for kv in items if kv[1].rank is not None and kv[1].rank <= k][:k] if k else []


def num_cached(out: RequestOutput) -> int:
    return max(int(out.num_cached_tokens or 0), 0)


def usage_dict(num_prompt: int, num_generated: int, num_cached_tokens: int) -> dict:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_generated,
        "total_tokens": num_prompt + num_generated,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


def _retry_after(estimate_s: float, default_s: int) -> int:
    """Whole seconds for Retry-After: admission control's estimate, else the default."""
    return max(math.ceil(estimate_s), 1) if estimate_s > 0 else default_s
