"""``POST /v1/chat/completions``: the tokenizer's chat template, logprobs with
``top_logprobs``, ``n``, SSE streaming with ``stream_options.include_usage``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvasir.engine.async_llm import EngineDeadError, RequestRejectedError
from kvasir.entrypoints.openai.chat_output import ChatOutputBuilder
from kvasir.entrypoints.openai.errors import OpenAIError, bad_request
from kvasir.entrypoints.openai.observability import observation, tokenize_span
from kvasir.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
from kvasir.entrypoints.openai.serving_beam import chat_beam_search
from kvasir.entrypoints.openai.serving_common import (
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
    top_entries,
    until_disconnect,
    usage_dict,
)
from kvasir.entrypoints.openai.structured import structured_outputs_for
from kvasir.entrypoints.openai.tool_parsers import (
    ResolvedToolChoice,
    resolve_tool_choice,
    tool_choice_constraint,
)
from kvasir.outputs import PositionLogprobs, RequestOutput
from kvasir.sampling_params import StructuredOutputsParams

# HF apply_chat_template arguments that chat_template_kwargs must not override.
_RESERVED_TEMPLATE_KWARGS = {
    "conversation",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
}


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Chat messages as the template expects them: text parts joined into a string."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"content part type {part.type!r} is not supported (text only)",
                        f"messages[{i}].content[{j}].type",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        d: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [_template_tool_call(tc, i, j) for j, tc in enumerate(m.tool_calls)]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return out


def _template_tool_call(tc: dict[str, Any], i: int, j: int) -> dict[str, Any]:
    """An assistant message's tool call for the template: templates index
    ``function.arguments`` as a mapping, the API sends it as JSON text."""
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request(
            "a tool call needs function.name", f"messages[{i}].tool_calls[{j}].function"
        )
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise bad_request(
                "function.arguments must be JSON text",
                f"messages[{i}].tool_calls[{j}].function.arguments",
            ) from None
    return {**tc, "type": "function", "function": {**fn, "arguments": args}}


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[PositionLogprobs], k: int
) -> list[dict]:
    content = []
    for tid, pos in zip(token_ids, logprobs, strict=False):
        lp = pos.get(tid) if pos else None
        s = token_text(tokenizer, tid, lp)
        content.append(
            {
                "token": s,
                "logprob": -9999.0 if lp is None else safe_logprob(lp.logprob),
                "bytes": list(s.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (ts := token_text(tokenizer, t, p)),
                        "logprob": safe_logprob(p.logprob),
                        "bytes": list(ts.encode("utf-8")),
                    }
                    for t, p in top_entries(pos, k)
                ]
                if pos
                else [],
            }
        )
    return content


class OpenAIServingChat:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def _render(self, req: ChatCompletionRequest, tools: ResolvedToolChoice) -> list[int]:
        kwargs = dict(req.chat_template_kwargs or {})
        bad = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise bad_request(f"chat_template_kwargs must not set {bad}", "chat_template_kwargs")
        if req.chat_template is not None:
            if not self.ctx.trust_request_chat_template:
                raise bad_request(
                    "chat_template from a request is not allowed on this server "
                    "(--trust-request-chat-template)",
                    "chat_template",
                    "chat_template_not_allowed",
                )
            kwargs["chat_template"] = req.chat_template
        if req.continue_final_message and req.add_generation_prompt:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        if req.continue_final_message:
            if req.messages[-1].role != "assistant":
                raise bad_request(
                    "continue_final_message needs the last message to be the assistant's",
                    "continue_final_message",
                )
            kwargs["continue_final_message"] = True
        if tools.functions and tools.mode != "none" or (req.tools and tools.mode == "none"):
            # The template sees the tools (vLLM passes them for tool_choice "none" too).
            kwargs["tools"] = req.tools
        try:
            return self.ctx.engine.input_processor.apply_chat_template(
                messages_to_dicts(req.messages),
                add_generation_prompt=req.add_generation_prompt,
                **kwargs,
            )
        except OpenAIError:
            raise
        except Exception as e:  # jinja2 errors ("roles must alternate" ...) are input errors
            raise bad_request(f"could not apply the chat template: {e}", "messages") from None

    def _tool_choice(self, req: ChatCompletionRequest) -> ResolvedToolChoice:
        try:
            return resolve_tool_choice(req.tools, req.tool_choice, self.ctx.enable_auto_tool_choice)
        except ValueError as e:
            msg = str(e)
            param = msg.split(" ", 1)[0] if msg.startswith("tools[") else "tool_choice"
            raise bad_request(msg, param) from None

    def _checked_tool_constraint(
        self, constraint: StructuredOutputsParams, tools: ResolvedToolChoice
    ) -> StructuredOutputsParams:
        from kvasir.structured_output import validate

        try:
            validate(constraint)
        except ValueError as e:
            names = list(tools.functions)
            i = names.index(tools.named) if tools.named is not None else 0
            param = f"tools[{i}].function.parameters" if tools.named or len(names) == 1 else "tools"
            raise bad_request(
                f"the function parameters are not a usable JSON schema: {e}", param
            ) from None
        return constraint

    def _builder(self, tools: ResolvedToolChoice) -> ChatOutputBuilder:
        return ChatOutputBuilder(tools, self.ctx.tool_call_parser, self.ctx.reasoning_parser)

    async def create_chat_completion(
        self, req: ChatCompletionRequest, raw_request: Request
    ) -> Response:
        ctx = self.ctx
        lora = ctx.check_model(req.model)
        check_unsupported(req)
        if lora is not None and req.use_beam_search:
            raise bad_request("use_beam_search with a LoRA adapter is not supported", "model")
        tools = self._tool_choice(req)
        structured = structured_outputs_for(req)
        tool_constraint = tool_choice_constraint(tools, req.parallel_tool_calls)
        if tool_constraint is not None:
            if structured is not None:
                raise bad_request(
                    f"tool_choice {req.tool_choice!r} cannot be combined with another "
                    "structured-output constraint",
                    "tool_choice",
                )
            structured = self._checked_tool_constraint(tool_constraint, tools)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        max_name = (
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        )
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        rename = {"max_tokens": max_name, "prompt": "messages"}
        obs = observation(raw_request)
        with tokenize_span(ctx.engine.tracing, obs):
            prompt_ids = self._render(req, tools)
        check_length(ctx, len(prompt_ids), max_tokens, "messages", max_name)
        k = (req.top_logprobs or 0) if req.logprobs else None
        if req.use_beam_search:
            ctx.check_beam_search(raw_request)
            if structured is not None:
                raise bad_request(
                    "structured outputs and tool_choice required/named cannot be combined "
                    "with beam search",
                    "use_beam_search",
                )
            return await chat_beam_search(ctx, req, raw_request, prompt_ids, max_tokens)
        params = make_sampling_params(
            req, max_tokens, k, req.stream, rename=rename, structured_outputs=structured
        )
        builders = [self._builder(tools) for _ in range(req.n)]
        if builders[0].tool_parser is not None and builders[0].tool_parser.needs_special_tokens:
            params.skip_special_tokens = False  # the call markers are special tokens
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        gen = ctx.generate(
            raw_request,
            prompt_ids,
            params,
            request_id,
            model=req.model,
            priority=req.priority,
            cache_salt=req.cache_salt,
            trace_span=obs.span,
            tenant=obs.tenant,
            hints=req.scheduling_hints(),
            lora_request=lora,
        )
        try:
            (first,) = await until_disconnect(first_outputs([gen]), raw_request)
        except ClientDisconnected:
            await gen.aclose()
            return Response(status_code=499)
        except (RequestRejectedError, EngineDeadError, ValueError) as e:
            await gen.aclose()
            raise ctx.engine_error(e, rename) from None
        if req.stream:
            return StreamingResponse(
                self._stream(req, request_id, created, first, gen, len(prompt_ids), k, builders),
                media_type="text/event-stream",
            )
        try:
            final = first
            if not first.finished:
                final = await until_disconnect(_last(gen), raw_request)
        except ClientDisconnected:
            return Response(status_code=499)
        except (RequestRejectedError, EngineDeadError, ValueError) as e:
            raise ctx.engine_error(e, rename) from None
        choices = []
        num_generated = 0
        for c in sorted(final.outputs, key=lambda c: c.index):
            num_generated += len(c.token_ids)
            logprobs = None
            if k is not None:
                logprobs = {
                    "content": chat_logprobs(ctx.tokenizer, c.token_ids, c.logprobs or [], k)
                }
            message, finish_reason = builders[c.index].message(c.text, c.finish_reason)
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": created,
                "model": ctx.served_model_name,
                "choices": choices,
                "usage": usage_dict(len(prompt_ids), num_generated, num_cached(final)),
            }
        )

    async def _stream(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        created: int,
        first: RequestOutput,
        gen: AsyncGenerator[RequestOutput, None],
        num_prompt: int,
        k: int | None,
        builders: list[ChatOutputBuilder],
    ) -> AsyncGenerator[bytes, None]:
        ctx = self.ctx
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        generated = [0] * req.n
        cached = num_cached(first)

        def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
            body: dict[str, Any] = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": ctx.served_model_name,
                "choices": choices,
            }
            if usage is not None:
                body["usage"] = usage
            return sse(body)

        async def outputs() -> AsyncGenerator[RequestOutput, None]:
            yield first
            if not first.finished:
                async for _, out in merge_async_iterators([gen]):
                    yield out

        return_ids = bool((req.model_extra or {}).get("return_token_ids"))
        # The role comes first, in a chunk of its own per choice (as OpenAI sends it).
        for i in range(req.n):
            role: dict[str, Any] = {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            if return_ids:
                role["prompt_token_ids"] = list(first.prompt_token_ids or [])
            yield chunk([role])
        it = outputs()
        try:
            async for out in it:
                cached = max(cached, num_cached(out))
                for c in out.outputs:
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    generated[c.index] += len(c.token_ids)
                    logprobs = None
                    if k is not None:
                        logprobs = {
                            "content": chat_logprobs(
                                ctx.tokenizer, c.token_ids, c.logprobs or [], k
                            )
                        }
                    usage = None
                    if include_usage and continuous:
                        usage = usage_dict(num_prompt, sum(generated), cached)
                    delta, finish_reason = builders[c.index].delta(c.text, c.finish_reason)
                    if not delta and finish_reason is None and logprobs is None and not return_ids:
                        continue  # held back (a possible tag or tool call)
                    choice: dict[str, Any] = {
                        "index": c.index,
                        "delta": delta,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                    if return_ids:  # vLLM's extension; kvasir router migrates on them
                        choice["token_ids"] = list(c.token_ids)
                    yield chunk([choice], usage)
            if include_usage:
                yield chunk([], usage_dict(num_prompt, sum(generated), cached))
        except (RequestRejectedError, EngineDeadError, ValueError, OpenAIError) as e:
            yield sse_error(ctx.engine_error(e))
        except Exception as e:  # headers are sent: a bug still ends as an error event
            yield sse_error(internal_error(e))
        finally:
            await it.aclose()
            await gen.aclose()
        yield SSE_DONE


async def _last(gen: AsyncGenerator[RequestOutput, None]) -> RequestOutput:
    last = None
    async for out in gen:
        last = out
    assert last is not None
    return last
