"""``POST /v1/responses`` (the OpenAI Responses API) and ``GET/DELETE /v1/responses/{id}``.

Input is a string or a list of items (messages with text parts; function calls and
their outputs), rendered with the chat template after ``instructions`` (a system
message). ``stream: true`` sends the documented semantic events in order:
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` ...,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, then ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut the text short).

``previous_response_id`` continues a stored conversation: responses are kept in an
in-memory store of at most ``--responses-store-size`` entries (oldest dropped first).
The store belongs to one server process: it is lost on restart and not shared between
replicas behind a router. ``store: false`` keeps a response out of it. As in the OpenAI
API, the previous response's ``instructions`` are not carried over.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from fastapi import Request
from pydantic import Field
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvasir.engine.async_llm import EngineDeadError, RequestRejectedError
from kvasir.entrypoints.openai.errors import OpenAIError, bad_request, from_value_error
from kvasir.entrypoints.openai.protocol import OpenAIModel
from kvasir.entrypoints.openai.serving_common import (
    ClientDisconnected,
    ServingContext,
    check_length,
    first_outputs,
    internal_error,
    num_cached,
    until_disconnect,
)
from kvasir.outputs import RequestOutput
from kvasir.sampling_params import RequestOutputKind, SamplingParams

_json = msgspec.json.Encoder()
_PARAMS = {
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "tools",
    "tool_choice",
    "previous_response_id",
    "prompt",
    "max_tokens",
}
_RENAME = {"prompt": "input", "max_tokens": "max_output_tokens"}


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(..., description="Text, or a list of items.")
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    # vLLM extras
    seed: int | None = None
    top_k: int | None = Field(None, ge=-1)
    priority: int = 0


class ResponseStore:
    """Responses by id, at most ``max_size`` (least recently stored dropped first).
    Each entry keeps the response object and the conversation that produced it (without
    instructions), so a follow-up can continue from it."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, conversation: list[dict]) -> None:
        if self.max_size <= 0:
            return
        self._items[response["id"]] = (response, conversation)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in (
            "input_text",
            "output_text",
            "text",
        ):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(
                f"content part type {kind!r} is not supported (text only)", f"{where}[{j}].type"
            )
        if not isinstance(part.get("text"), str):
            raise bad_request("a text part needs a string 'text'", f"{where}[{j}].text")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(value: str | list[dict[str, Any]]) -> list[dict]:
    """The request's ``input`` as chat messages."""
    if isinstance(value, str):
        if not value:
            raise bad_request("input must not be empty", "input")
        return [{"role": "user", "content": value}]
    if not value:
        raise bad_request("input must not be empty", "input")
    out: list[dict] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(
                    "role must be one of user, assistant, system, developer", f"input[{i}].role"
                )
            role = "system" if role == "developer" else role
            out.append(
                {"role": role, "content": _text_of(item.get("content"), f"input[{i}].content")}
            )
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": output if isinstance(output, str) else _json.encode(output).decode(),
                }
            )
        else:
            raise bad_request(f"input item type {kind!r} is not supported", f"input[{i}].type")
    return out


class OpenAIServingResponses:
    def __init__(self, ctx: ServingContext, store_size: int) -> None:
        self.ctx = ctx
        self.store = ResponseStore(store_size)

    # ---------------------------------------------------------------- request

    def _check_unsupported(self, req: ResponsesRequest) -> None:
        fmt = (req.text or {}).get("format")
        if fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind != "text":
                raise bad_request(
                    f"text.format type {kind!r} is not supported by this server (only 'text')",
                    "text.format.type",
                )
        if req.tools:
            raise bad_request("function tools are not supported by this server", "tools")

    def _conversation(self, req: ResponsesRequest) -> list[dict]:
        history: list[dict] = []
        if req.previous_response_id is not None:
            stored = self.store.get(req.previous_response_id)
            if stored is None:
                raise bad_request(
                    f"Previous response with id {req.previous_response_id!r} not found "
                    "(responses are kept in this server process's memory, at most "
                    f"{self.store.max_size})",
                    "previous_response_id",
                    "previous_response_not_found",
                )
            history = list(stored[1])
        return history + input_messages(req.input)

    def _render(self, req: ResponsesRequest, conversation: list[dict]) -> list[int]:
        messages = list(conversation)
        if req.instructions:
            messages = [{"role": "system", "content": req.instructions}] + messages
        try:
            return self.ctx.engine.input_processor.apply_chat_template(
                messages, add_generation_prompt=True
            )
        except OpenAIError:
            raise
        except Exception as e:  # jinja2 errors are input errors
            raise bad_request(f"could not apply the chat template: {e}", "input") from None

    def _params(self, req: ResponsesRequest) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=-1 if req.top_k is None else req.top_k,
                seed=req.seed,
                max_tokens=req.max_output_tokens,
                output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
            )
        except ValueError as e:
            raise from_value_error(e, _PARAMS, _RENAME) from None

    async def create_response(self, req: ResponsesRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(req.model)
        self._check_unsupported(req)
        conversation = self._conversation(req)
        prompt_ids = self._render(req, conversation)
        check_length(ctx, len(prompt_ids), req.max_output_tokens, "input", "max_output_tokens")
        params = self._params(req)
        response_id = f"resp_{uuid.uuid4().hex}"
        gen = ctx.engine.generate(prompt_ids, params, response_id, priority=req.priority)
        try:
            (first,) = await until_disconnect(first_outputs([gen]), raw_request)
        except ClientDisconnected:
            await gen.aclose()
            return Response(status_code=499)
        except (RequestRejectedError, EngineDeadError, ValueError) as e:
            await gen.aclose()
            raise ctx.engine_error(e, _RENAME) from None
        builder = _ResponseBuilder(req, response_id, ctx.served_model_name, len(prompt_ids))
        if req.stream:
            return StreamingResponse(
                self._stream(req, builder, conversation, first, gen), media_type="text/event-stream"
            )
        try:
            final = first
            if not first.finished:
                async for out in _rest(gen, raw_request):
                    final = out
        except ClientDisconnected:
            return Response(status_code=499)
        except (RequestRejectedError, EngineDeadError, ValueError) as e:
            raise ctx.engine_error(e, _RENAME) from None
        finally:
            await gen.aclose()
        c = final.outputs[0]
        builder.add(c.text, len(c.token_ids), num_cached(final))
        body = builder.response(c.finish_reason)
        self._remember(req, body, conversation, builder.text)
        return JSONResponse(body)

    def _remember(self, req: ResponsesRequest, body: dict, conversation: list, text: str) -> None:
        if req.store:
            self.store.put(body, conversation + [{"role": "assistant", "content": text}])

    async def _stream(
        self,
        req: ResponsesRequest,
        b: _ResponseBuilder,
        conversation: list[dict],
        first: RequestOutput,
        gen: AsyncGenerator[RequestOutput, None],
    ) -> AsyncGenerator[bytes, None]:
        ctx = self.ctx
        seq = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            body = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return b"event: " + kind.encode() + b"\ndata: " + _json.encode(body) + b"\n\n"

        ids = {"item_id": b.message_id, "output_index": 0}
        yield event("response.created", response=b.response(None))
        yield event("response.in_progress", response=b.response(None))
        yield event("response.output_item.added", output_index=0, item=b.message(None))
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event("response.content_part.added", **ids, content_index=0, part=part)
        finish_reason = None
        try:
            out: RequestOutput | None = first
            rest = None if first.finished else gen
            while out is not None:
                c = out.outputs[0] if out.outputs else None
                if c is not None:
                    b.add(c.text, len(c.token_ids), num_cached(out))
                    if c.text:
                        yield event(
                            "response.output_text.delta",
                            **ids,
                            content_index=0,
                            delta=c.text,
                            logprobs=[],
                        )
                    finish_reason = c.finish_reason or finish_reason
                out = await anext(rest, None) if rest is not None and not out.finished else None
        except (RequestRejectedError, EngineDeadError, ValueError, OpenAIError) as e:
            err = ctx.engine_error(e, _RENAME)
            yield event("error", code=err.code, message=err.message, param=err.param)
            return
        except Exception as e:  # headers are sent: a bug still ends as an error event
            err = internal_error(e)
            yield event("error", code=err.code, message=err.message, param=err.param)
            return
        finally:
            await gen.aclose()
        yield event("response.output_text.done", **ids, content_index=0, text=b.text, logprobs=[])
        done_part = {"type": "output_text", "text": b.text, "annotations": []}
        yield event("response.content_part.done", **ids, content_index=0, part=done_part)
        yield event("response.output_item.done", output_index=0, item=b.message(finish_reason))
        body = b.response(finish_reason)
        self._remember(req, body, conversation, b.text)
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        yield event(kind, response=body)

    # ---------------------------------------------------------------- store

    def retrieve(self, response_id: str) -> dict:
        stored = self.store.get(response_id)
        if stored is None:
            raise OpenAIError(
                404,
                f"Response with id {response_id!r} not found.",
                "invalid_request_error",
                "response_id",
                "response_not_found",
            )
        return stored[0]

    def delete(self, response_id: str) -> dict:
        if not self.store.delete(response_id):
            self.retrieve(response_id)  # raises the 404
        return {"id": response_id, "object": "response.deleted", "deleted": True}


async def _rest(
    gen: AsyncGenerator[RequestOutput, None], raw_request: Request
) -> AsyncGenerator[RequestOutput, None]:
    while True:
        out = await until_disconnect(anext(gen, None), raw_request)
        if out is None:
            return
        yield out


class _ResponseBuilder:
    """The Response object of one request, as its text comes in."""

    def __init__(
        self, req: ResponsesRequest, response_id: str, model: str, num_prompt: int
    ) -> None:
        self.req = req
        self.id = response_id
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.created_at = int(time.time())
        self.num_prompt = num_prompt
        self.text = ""
        self.num_output = 0
        self.num_cached = 0

    def add(self, text: str, num_tokens: int, cached: int) -> None:
        # FINAL_ONLY outputs are whole; DELTA ones are pieces.
        if self.req.stream:
            self.text += text
            self.num_output += num_tokens
        else:
            self.text, self.num_output = text, num_tokens
        self.num_cached = max(self.num_cached, cached)

    def message(self, finish_reason: str | None) -> dict:
        status = "in_progress" if finish_reason is None else _status(finish_reason)
        content = []
        if finish_reason is not None:
            content = [{"type": "output_text", "text": self.text, "annotations": []}]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(self, finish_reason: str | None) -> dict:
        req = self.req
        done = finish_reason is not None
        status = _status(finish_reason) if done else "in_progress"
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": [self.message(finish_reason)] if done else [],
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "store": req.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "user": req.user,
            "usage": None,
        }
        if done:
            body["completed_at"] = int(time.time()) if status == "completed" else None
            body["usage"] = {
                "input_tokens": self.num_prompt,
                "input_tokens_details": {"cached_tokens": self.num_cached},
                "output_tokens": self.num_output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.num_prompt + self.num_output,
            }
        return body


def _status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"
