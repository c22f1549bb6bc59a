"""``POST /v1/completions``: prompts as text, token ids or lists of either; echo;
logprobs; SSE streaming with ``stream_options.include_usage``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvasir.engine.async_llm import EngineDeadError, RequestRejectedError
from kvasir.entrypoints.openai.errors import OpenAIError, bad_request, from_value_error
from kvasir.entrypoints.openai.observability import observation, tokenize_span
from kvasir.entrypoints.openai.protocol import CompletionRequest
from kvasir.entrypoints.openai.serving_beam import beam_params, beam_search_outputs
from kvasir.entrypoints.openai.serving_common import (
    PARAM_NAMES,
    SSE_DONE,
    ClientDisconnected,
    ServingContext,
    check_length,
    check_unsupported,
    first_outputs,
    internal_error,
    make_sampling_params,
    merge_async_iterators,
    num_cached,
    safe_logprob,
    sse,
    sse_error,
    token_text,
    until_disconnect,
    usage_dict,
)
from kvasir.outputs import PositionLogprobs, RequestOutput


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        return [list(prompt)]
    return list(prompt)


def completion_logprobs(
    tokenizer: Any,
    token_ids: list[int],
    logprobs: list[PositionLogprobs | None],
    text_offset: int,
) -> tuple[dict, int]:
    """OpenAI legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset) of
    ``token_ids``; returns it and the text offset after the last token."""
    out: dict[str, list] = {
        "text_offset": [],
        "token_logprobs": [],
        "tokens": [],
        "top_logprobs": [],
    }
    for tid, pos in zip(token_ids, logprobs, strict=False):
        lp = pos.get(tid) if pos else None
        s = token_text(tokenizer, tid, lp)
        out["tokens"].append(s)
        out["text_offset"].append(text_offset)
        text_offset += len(s)
        if pos is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(None if lp is None else safe_logprob(lp.logprob))
        # The sampled token plus the top-k alternatives, as vLLM reports them.
        out["top_logprobs"].append(
            {token_text(tokenizer, t, p): safe_logprob(p.logprob) for t, p in pos.items()}
        )
    return out, text_offset


class OpenAIServingCompletion:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create_completion(self, req: CompletionRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        engine = ctx.engine
        lora = ctx.check_model(req.model)
        check_unsupported(req)
        if lora is not None and req.use_beam_search:
            raise bad_request("use_beam_search with a LoRA adapter is not supported", "model")
        if req.suffix is not None:
            raise bad_request("suffix is not supported", "suffix")
        if req.use_beam_search and req.best_of not in (None, req.n):
            raise bad_request("best_of must equal n with use_beam_search", "best_of")
        prompts = _prompt_list(req.prompt)
        texts: list[str] = []
        prompt_ids: list[list[int]] = []
        obs = observation(raw_request)
        with tokenize_span(engine.tracing, obs):
            for i, p in enumerate(prompts):
                try:
                    text, ids = engine.input_processor.tokenize(p)
                except ValueError as e:
                    err = from_value_error(e, PARAM_NAMES)
                    if len(prompts) > 1 and err.param == "prompt":
                        err.param = f"prompt[{i}]"
                    raise err from None
                check_length(ctx, len(ids), req.max_tokens, "prompt", "max_tokens")
                prompt_ids.append(ids)
                if req.echo:
                    if text is None:  # token ids: echo their text (none without a tokenizer)
                        text = engine.tokenizer.decode(ids) if engine.tokenizer is not None else ""
                    texts.append(text)
        prompt_logprobs = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            prompt_logprobs = max(req.logprobs, prompt_logprobs or 0)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.use_beam_search:
            ctx.check_beam_search(raw_request)
            bp = beam_params(
                req.n, req.max_tokens, ctx.max_model_len, req.ignore_eos, req.length_penalty
            )
            try:
                finals = await until_disconnect(
                    beam_search_outputs(engine, request_id, prompt_ids, bp, req.priority),
                    raw_request,
                )
            except ClientDisconnected:
                return Response(status_code=499)
            except (RequestRejectedError, EngineDeadError, ValueError) as e:
                raise ctx.engine_error(e) from None
            body = self._response(req, request_id, created, finals, texts, prompt_ids)
            return JSONResponse(body)
        params = make_sampling_params(
            req, req.max_tokens, req.logprobs, req.stream, prompt_logprobs, best_of=req.best_of
        )
        arrival = time.time()
        gens = [
            ctx.generate(
                raw_request,
                ids,
                params,
                request_id if len(prompts) == 1 else f"{request_id}-{i}",
                arrival_time=arrival,
                priority=req.priority,
                cache_salt=req.cache_salt,
                trace_span=obs.span,
                tenant=obs.tenant,
                hints=req.scheduling_hints(),
                lora_request=lora,
                model=req.model,
            )
            for i, ids in enumerate(prompt_ids)
        ]
        # Wait for every prompt's first output before answering, so a rejection (queue
        # full: 429, never fits: 400) is a status code rather than an error event.
        try:
            firsts = await until_disconnect(first_outputs(gens), raw_request)
        except ClientDisconnected:
            for g in gens:
                await g.aclose()
            return Response(status_code=499)
        except (RequestRejectedError, EngineDeadError, ValueError) as e:
            for g in gens:
                await g.aclose()
            raise ctx.engine_error(e) from None
        if req.stream:
            return StreamingResponse(
                self._stream(req, request_id, created, firsts, gens, texts, prompt_ids),
                media_type="text/event-stream",
            )
        try:
            finals = await until_disconnect(self._collect(firsts, gens), raw_request)
        except ClientDisconnected:
            return Response(status_code=499)
        except (RequestRejectedError, EngineDeadError, ValueError) as e:
            raise ctx.engine_error(e) from None
        return JSONResponse(self._response(req, request_id, created, finals, texts, prompt_ids))

    @staticmethod
    async def _collect(
        firsts: list[RequestOutput], gens: list[AsyncGenerator[RequestOutput, None]]
    ) -> list[RequestOutput]:
        finals = list(firsts)
        pending = [g for g, f in zip(gens, firsts, strict=False) if not f.finished]
        idx = [i for i, f in enumerate(firsts) if not f.finished]
        if pending:
            async for j, out in merge_async_iterators(pending):
                finals[idx[j]] = out
        return finals

    def _response(
        self,
        req: CompletionRequest,
        request_id: str,
        created: int,
        finals: list[RequestOutput],
        texts: list[str],
        prompt_ids: list[list[int]],
    ) -> dict:
        tok = self.ctx.tokenizer
        choices = []
        num_generated = 0
        for i, out in enumerate(finals):
            # best_of: usage counts every candidate, returned or not.
            num_generated += out.extra.get("num_candidate_tokens", 0)
            for c in sorted(out.outputs, key=lambda c: c.index):
                if "num_candidate_tokens" not in out.extra:
                    num_generated += len(c.token_ids)
                text = c.text
                logprobs = None
                if req.echo:
                    text = texts[i] + text
                if req.logprobs is not None:
                    offset = 0
                    logprobs = {
                        "text_offset": [],
                        "token_logprobs": [],
                        "tokens": [],
                        "top_logprobs": [],
                    }
                    if req.echo:
                        plps = list(out.prompt_logprobs or [None] * len(prompt_ids[i]))
                        logprobs, offset = completion_logprobs(tok, prompt_ids[i], plps, 0)
                    gen, _ = completion_logprobs(tok, c.token_ids, c.logprobs or [], offset)
                    for k in logprobs:
                        logprobs[k] += gen[k]
                choices.append(
                    {
                        "index": i * req.n + c.index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                )
        num_prompt = sum(len(p) for p in prompt_ids)
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": self.ctx.served_model_name,
            "choices": choices,
            "usage": usage_dict(num_prompt, num_generated, sum(num_cached(o) for o in finals)),
        }

    async def _stream(
        self,
        req: CompletionRequest,
        request_id: str,
        created: int,
        firsts: list[RequestOutput],
        gens: list[AsyncGenerator[RequestOutput, None]],
        texts: list[str],
        prompt_ids: list[list[int]],
    ) -> AsyncGenerator[bytes, None]:
        ctx = self.ctx
        tok = ctx.tokenizer
        n = req.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        num_prompt = sum(len(p) for p in prompt_ids)
        generated = [0] * (len(gens) * n)
        offsets = [0] * (len(gens) * n)
        started: set[int] = set()
        cached = [0] * len(gens)
        return_ids = bool((req.model_extra or {}).get("return_token_ids"))
        ids_sent: set[int] = set()

        async def outputs() -> AsyncGenerator[tuple[int, RequestOutput], None]:
            for i, f in enumerate(firsts):
                yield i, f
            pending = [g for g, f in zip(gens, firsts, strict=False) if not f.finished]
            idx = [i for i, f in enumerate(firsts) if not f.finished]
            if pending:
                async for j, out in merge_async_iterators(pending):
                    yield idx[j], out

        it = outputs()
        try:
            async for i, out in it:
                cached[i] = max(cached[i], num_cached(out))
                for c in out.outputs:
                    idx = i * n + c.index
                    text = c.text
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = {
                            "text_offset": [],
                            "token_logprobs": [],
                            "tokens": [],
                            "top_logprobs": [],
                        }
                    if req.echo and idx not in started:
                        text = texts[i] + text
                        if logprobs is not None:
                            plps = list(out.prompt_logprobs or [None] * len(prompt_ids[i]))
                            logprobs, offsets[idx] = completion_logprobs(
                                tok, prompt_ids[i], plps, 0
                            )
                    started.add(idx)
                    if logprobs is not None:
                        gen, offsets[idx] = completion_logprobs(
                            tok, c.token_ids, c.logprobs or [], offsets[idx]
                        )
                        for k in logprobs:
                            logprobs[k] += gen[k]
                    if not text and not c.token_ids and c.finish_reason is None:
                        continue  # nothing new (e.g. text held back by a stop-string check)
                    generated[idx] += len(c.token_ids)
                    chunk: dict[str, Any] = {
                        "id": request_id,
                        "object": "text_completion",
                        "created": created,
                        "model": ctx.served_model_name,
                        "choices": [
                            {
                                "index": idx,
                                "text": text,
                                "logprobs": logprobs,
                                "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason,
                            }
                        ],
                    }
                    if return_ids:  # vLLM's extension; kvasir router migrates on them
                        chunk["choices"][0]["token_ids"] = list(c.token_ids)
                        if idx not in ids_sent:
                            ids_sent.add(idx)
                            chunk["choices"][0]["prompt_token_ids"] = prompt_ids[i]
                    if include_usage and continuous:
                        chunk["usage"] = usage_dict(num_prompt, sum(generated), sum(cached))
                    yield sse(chunk)
            if include_usage:
                yield sse(
                    {
                        "id": request_id,
                        "object": "text_completion",
                        "created": created,
                        "model": ctx.served_model_name,
                        "choices": [],
                        "usage": usage_dict(num_prompt, sum(generated), sum(cached)),
                    }
                )
        except (RequestRejectedError, EngineDeadError, ValueError, OpenAIError) as e:
            yield sse_error(ctx.engine_error(e))
        except Exception as e:  # headers are sent: a bug still ends as an error event
            yield sse_error(internal_error(e))
        finally:
            await it.aclose()
            for g in gens:
                await g.aclose()
        yield SSE_DONE
