"""``POST /v1/responses`` (the OpenAI Responses API) and ``GET/DELETE /v1/responses/{id}``.

Input is a string or a list of items (messages with text parts; function calls and
their outputs), rendered with the chat template after ``instructions`` (a system
message). ``stream: true`` sends the documented semantic events in order:
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` ...,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, then ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut the text short).

``text.format`` (``json_schema`` / ``json_object``) constrains the text through structured
outputs; function ``tools`` go to the chat template, ``tool_choice`` ``required`` / a named
function is enforced with structured outputs and ``auto`` parsed by the server's
``--tool-call-parser``; calls come back as ``function_call`` output items (streamed: all
items are sent at the end, each with its events), and ``function_call`` /
``function_call_output`` input items go back through the template.

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
from kvasir.entrypoints.openai.chat_output import ChatOutputBuilder
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
from kvasir.entrypoints.openai.structured import make_structured_params
from kvasir.entrypoints.openai.tool_parsers import (
    ResolvedToolChoice,
    resolve_tool_choice,
    tool_choice_constraint,
)
from kvasir.outputs import RequestOutput
from kvasir.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

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


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools (``{"type": "function", "name", "parameters", ...}``) in
    chat completions' shape (``{"type": "function", "function": {...}}``)."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise bad_request(
                f"tool type {kind!r} is not supported (function tools only)", f"tools[{i}].type"
            )
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(tool_choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(tool_choice, dict) and "function" not in tool_choice and "name" in tool_choice:
        return {
            "type": tool_choice.get("type", "function"),
            "function": {"name": tool_choice["name"]},
        }
    return tool_choice


def text_format_constraint(text: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """``text.format``: ``text`` (none), ``json_object`` or ``json_schema`` (its ``schema``)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return make_structured_params({"json_object": True}, "text.format")
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise bad_request(
                "text.format type 'json_schema' needs a schema object", "text.format.schema"
            )
        return make_structured_params({"json": schema}, "text.format.schema")
    raise bad_request(
        f"text.format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        "text.format.type",
    )


def output_messages(output: list[dict]) -> list[dict]:
    """A response's output items as the chat messages a follow-up continues from."""
    msgs: list[dict] = []
    for item in output:
        if item["type"] == "message":
            msgs.append({"role": "assistant", "content": item["content"][0]["text"]})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if msgs and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
    return msgs


class OpenAIServingResponses:
    def __init__(self, ctx: ServingContext, store_size: int) -> None:
        self.ctx = ctx
        self.store = ResponseStore(store_size)

    # ---------------------------------------------------------------- request

    def _constraints(
        self, req: ResponsesRequest
    ) -> tuple[ResolvedToolChoice, StructuredOutputsParams | None]:
        """The request's tool choice and its one structured-output constraint (from
        ``text.format`` or from a ``required`` / named tool choice)."""
        structured = text_format_constraint(req.text)
        try:
            choice = resolve_tool_choice(
                chat_tools(req.tools),
                chat_tool_choice(req.tool_choice),
                self.ctx.enable_auto_tool_choice,
            )
        except ValueError as e:
            msg = str(e)
            param = msg.split(" ", 1)[0] if msg.startswith("tools[") else "tool_choice"
            param = param.replace(".function", "")
            raise bad_request(msg.replace(".function", ""), param) from None
        tool_constraint = tool_choice_constraint(choice, req.parallel_tool_calls)
        if tool_constraint is not None:
            if structured is not None:
                raise bad_request(
                    f"tool_choice {req.tool_choice!r} cannot be combined with text.format",
                    "tool_choice",
                )
            names = list(choice.functions)
            i = names.index(choice.named) if choice.named is not None else 0
            param = f"tools[{i}].parameters" if choice.named or len(names) == 1 else "tools"
            structured = make_structured_params({"json": tool_constraint.json}, param)
        return choice, structured

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

    def _render(
        self, req: ResponsesRequest, conversation: list[dict], choice: ResolvedToolChoice
    ) -> list[int]:
        messages = list(conversation)
        if req.instructions:
            messages = [{"role": "system", "content": req.instructions}] + messages
        kwargs: dict[str, Any] = {}
        if choice.functions:  # the template sees the tools (also for tool_choice "none")
            kwargs["tools"] = chat_tools(req.tools)
        try:
            return self.ctx.engine.input_processor.apply_chat_template(
                messages, add_generation_prompt=True, **kwargs
            )
        except OpenAIError:
            raise
        except Exception as e:  # jinja2 errors are input errors
            raise bad_request(f"could not apply the chat template: {e}", "input") from None

    def _params(
        self, req: ResponsesRequest, structured: StructuredOutputsParams | None
    ) -> SamplingParams:
        try:
            return SamplingParams(
                structured_outputs=structured,
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
        lora = ctx.check_model(req.model)
        choice, structured = self._constraints(req)
        conversation = self._conversation(req)
        prompt_ids = self._render(req, conversation, choice)
        check_length(ctx, len(prompt_ids), req.max_output_tokens, "input", "max_output_tokens")
        params = self._params(req, structured)
        response_id = f"resp_{uuid.uuid4().hex}"
        gen = ctx.generate(
            raw_request, prompt_ids, params, response_id, model=req.model,
            priority=req.priority, lora_request=lora,
        )  # fmt: skip
        try:
            (first,) = await until_disconnect(first_outputs([gen]), raw_request)
        except ClientDisconnected:
            await gen.aclose()
            return Response(status_code=499)
        except (RequestRejectedError, EngineDeadError, ValueError) as e:
            await gen.aclose()
            raise ctx.engine_error(e, _RENAME) from None
        builder = _ResponseBuilder(
            req, response_id, ctx.served_model_name, len(prompt_ids),
            ChatOutputBuilder(choice, ctx.tool_call_parser, None) if choice.mode != "none" else None,
        )  # fmt: skip
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
        self._remember(req, body, conversation)
        return JSONResponse(body)

    def _remember(self, req: ResponsesRequest, body: dict, conversation: list) -> None:
        if req.store:
            self.store.put(body, conversation + output_messages(body["output"]))

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
        # With tools the output's items are known only at the end (a call or text):
        # they are sent then, each with its events; plain text streams as it comes.
        live = b.tools is None
        yield event("response.created", response=b.response(None))
        yield event("response.in_progress", response=b.response(None))
        part = {"type": "output_text", "text": "", "annotations": []}
        if live:
            yield event("response.output_item.added", output_index=0, item=b.message(None))
            yield event("response.content_part.added", **ids, content_index=0, part=part)
        finish_reason = None
        try:
            out: RequestOutput | None = first
            rest = None if first.finished else gen
            while out is not None:
                c = out.outputs[0] if out.outputs else None
                if c is not None:
                    b.add(c.text, len(c.token_ids), num_cached(out))
                    if c.text and live:
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
        body = b.response(finish_reason)
        for index, item in enumerate(body["output"]):
            if item["type"] == "function_call":
                added = {**item, "arguments": "", "status": "in_progress"}
                yield event("response.output_item.added", output_index=index, item=added)
                call = {"item_id": item["id"], "output_index": index}
                yield event(
                    "response.function_call_arguments.delta", **call, delta=item["arguments"]
                )
                yield event(
                    "response.function_call_arguments.done", **call, arguments=item["arguments"]
                )
                yield event("response.output_item.done", output_index=index, item=item)
                continue
            text = item["content"][0]["text"]
            ids = {"item_id": item["id"], "output_index": index}
            if not live:
                yield event("response.output_item.added", output_index=index, item=b.message(None))
                yield event("response.content_part.added", **ids, content_index=0, part=part)
                yield event(
                    "response.output_text.delta", **ids, content_index=0, delta=text, logprobs=[]
                )
            yield event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[])
            done_part = {"type": "output_text", "text": text, "annotations": []}
            yield event("response.content_part.done", **ids, content_index=0, part=done_part)
            yield event("response.output_item.done", output_index=index, item=item)
        self._remember(req, body, conversation)
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
        self,
        req: ResponsesRequest,
        response_id: str,
        model: str,
        num_prompt: int,
        tools: ChatOutputBuilder | None = None,
    ) -> None:
        self.req = req
        self.tools = tools  # parses function calls out of the text (tools given)
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

    def output(self, finish_reason: str) -> list[dict]:
        """The output items: the text as one message, or with tools the calls the text
        holds (as function_call items) after any text around them."""
        if self.tools is None:
            return [self.message(finish_reason)]
        msg, _ = self.tools.message(self.text, finish_reason)
        items = []
        if msg.get("content"):
            items.append(self.message(finish_reason, msg["content"]))
        for tc in msg.get("tool_calls", []):
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_{uuid.uuid4().hex}",
                    "call_id": tc["id"],
                    "name": tc["function"]["name"],
                    "arguments": tc["function"]["arguments"],
                    "status": "completed",
                }
            )
        return items or [self.message(finish_reason, "")]

    def message(self, finish_reason: str | None, text: str | None = None) -> dict:
        status = "in_progress" if finish_reason is None else _status(finish_reason)
        content = []
        if finish_reason is not None:
            text = self.text if text is None else text
            content = [{"type": "output_text", "text": text, "annotations": []}]
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
            "output": self.output(finish_reason) if finish_reason is not None else [],
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "store": req.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": req.text or {"format": {"type": "text"}},
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
