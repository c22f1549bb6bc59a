"""``use_beam_search`` on completions and chat completions (vLLM's extra): the engine's
beam search (``kvasir/engine/beam_search.py``) with ``n`` beams, driven through
``AsyncLLM.generate`` one token per step; the ``n`` best hypotheses come back as the
request's choices, best first."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request
from starlette.responses import JSONResponse, Response

from kvasir.engine.async_llm import AsyncLLM, EngineDeadError, RequestRejectedError
from kvasir.engine.beam_search import (
    BeamSearch,
    BeamSearchParams,
    TopLogprobs,
    run_beam_search_async,
    top_logprobs_of,
)
from kvasir.entrypoints.openai.errors import bad_request
from kvasir.entrypoints.openai.protocol import ChatCompletionRequest
from kvasir.entrypoints.openai.serving_common import (
    ClientDisconnected,
    ServingContext,
    until_disconnect,
    usage_dict,
)
from kvasir.outputs import CompletionOutput, RequestOutput
from kvasir.sampling_params import RequestOutputKind, SamplingParams


def beam_params(
    n: int, max_tokens: int | None, max_model_len: int, ignore_eos: bool, length_penalty: float
) -> BeamSearchParams:
    try:
        return BeamSearchParams(
            beam_width=n,
            max_tokens=max_tokens if max_tokens is not None else max_model_len,
            ignore_eos=ignore_eos,
            length_penalty=length_penalty,
        )
    except ValueError as e:
        raise bad_request(str(e), "n" if "beam_width" in str(e) else "max_tokens") from None


async def beam_search_outputs(
    engine: AsyncLLM,
    request_id: str,
    prompts: list[list[int]],
    params: BeamSearchParams,
    priority: int = 0,
) -> list[RequestOutput]:
    """One ``RequestOutput`` per prompt whose outputs are its best hypotheses."""
    ip = engine.input_processor
    try:
        searches = [BeamSearch(p, params, ip.eos_token_ids, ip.max_model_len) for p in prompts]
    except ValueError as e:
        raise bad_request(str(e), "prompt") from None
    step = 0

    async def one(prompt: list[int], sp: SamplingParams, rid: str) -> TopLogprobs:
        last = None
        async for out in engine.generate(prompt, sp, rid, priority=priority):
            last = out
        assert last is not None
        return top_logprobs_of((last.outputs[0].logprobs or [{}])[0], sp.logprobs or 0)

    async def generate(batch: list[list[int]], sp: SamplingParams) -> list[TopLogprobs]:
        nonlocal step
        step += 1
        sp.output_kind = RequestOutputKind.FINAL_ONLY
        tasks = [one(p, sp, f"{request_id}-beam{step}-{i}") for i, p in enumerate(batch)]
        return list(await asyncio.gather(*tasks))

    try:
        results = await run_beam_search_async(searches, generate)
    except ValueError as e:
        raise bad_request(str(e), "n") from None
    tok = engine.tokenizer
    outs = []
    for prompt, res in zip(prompts, results, strict=True):
        completions = []
        for i, seq in enumerate(res.sequences):
            ids = seq.output_token_ids
            text = "" if tok is None else tok.decode(ids, skip_special_tokens=True)
            completions.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=ids,
                    cumulative_logprob=seq.cum_logprob,
                    finish_reason=seq.finish_reason,
                )
            )
        outs.append(
            RequestOutput(
                request_id=request_id,
                prompt=None,
                prompt_token_ids=prompt,
                outputs=completions,
                finished=True,
            )
        )
    return outs


async def chat_beam_search(
    ctx: ServingContext,
    req: ChatCompletionRequest,
    raw_request: Request,
    prompt_ids: list[int],
    max_tokens: int | None,
) -> Response:
    """A chat completion whose choices are the n best beams."""
    bp = beam_params(req.n, max_tokens, ctx.max_model_len, req.ignore_eos, req.length_penalty)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    try:
        (final,) = await until_disconnect(
            beam_search_outputs(ctx.engine, request_id, [prompt_ids], bp, req.priority),
            raw_request,
        )
    except ClientDisconnected:
        return Response(status_code=499)
    except (RequestRejectedError, EngineDeadError, ValueError) as e:
        raise ctx.engine_error(e) from None
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None,
            "finish_reason": c.finish_reason,
            "stop_reason": None,
        }
        for c in final.outputs
    ]
    num_generated = sum(len(c.token_ids) for c in final.outputs)
    return JSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": ctx.served_model_name,
            "choices": choices,
            "usage": usage_dict(len(prompt_ids), num_generated, 0),
        }
    )
