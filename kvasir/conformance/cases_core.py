"""Core cases: behaviour of the OpenAI API itself (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``): response shapes, the streaming contract, n, logprobs, stop,
seeds, token-id prompts, limits, and error objects with their status codes."""

from __future__ import annotations

import json
import math
from typing import Any

from kvasir.conformance.registry import SSE, CaseSkipped, Ctx, case, check, expect_error

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def _usage(body: dict[str, Any], where: str) -> dict[str, int]:
    u = body.get("usage")
    check(isinstance(u, dict), f"{where}: no usage object")
    assert isinstance(u, dict)
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        check(isinstance(u.get(k), int) and u[k] >= 0, f"{where}: usage.{k} = {u.get(k)!r}")
    check(
        u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"],
        f"{where}: total_tokens != prompt_tokens + completion_tokens ({u})",
    )
    return u


def _stream_contract(s: SSE, obj: str, num_choices: int = 1) -> None:
    """One finish_reason per choice, in its last chunk; ``[DONE]`` last; every chunk of
    ``obj`` with one id."""
    check(s.status == 200, f"stream -> HTTP {s.status}")
    check("text/event-stream" in s.content_type, f"content-type {s.content_type!r}")
    check(s.done_last, "the stream does not end with data: [DONE]")
    check(s.events, "no chunks before [DONE]")
    check(all(e.get("object") == obj for e in s.events), f"a chunk's object is not {obj!r}")
    check(len({e.get("id") for e in s.events}) == 1, "chunks carry different ids")
    finishes: dict[int, int] = {}
    for e in s.events:
        for c in e.get("choices", []):
            if c.get("finish_reason") is not None:
                finishes[c["index"]] = finishes.get(c["index"], 0) + 1
    check(
        finishes == {i: 1 for i in range(num_choices)},
        f"finish_reason count per choice {finishes}, want one each for {num_choices}",
    )


def _stream_text(s: SSE, chat: bool) -> str:
    out = []
    for e in s.events:
        for c in e.get("choices", []):
            out.append((c.get("delta") or {}).get("content") or "" if chat else c.get("text", ""))
    return "".join(out)


# ---- models --------------------------------------------------------------------------------


@case("core")
def case_models_list(ctx: Ctx) -> str:
    """GET /v1/models: a list object of model objects."""
    r = ctx.http.get("/v1/models")
    check(r.status_code == 200, f"HTTP {r.status_code}")
    body = r.json()
    check(body.get("object") == "list", f"object {body.get('object')!r}")
    data = body.get("data")
    check(isinstance(data, list) and data, "empty data")
    for m in data:
        check(m.get("object") == "model" and isinstance(m.get("id"), str), f"bad model {m}")
        check(isinstance(m.get("created"), int), "model.created is not an int")
        check(isinstance(m.get("owned_by"), str), "model.owned_by is not a string")
    return ", ".join(m["id"] for m in data)


@case("core")
def case_models_retrieve(ctx: Ctx) -> None:
    """GET /v1/models/{id}: the model object."""
    r = ctx.http.get(f"/v1/models/{ctx.model}")
    check(r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}")
    check(r.json().get("id") == ctx.model, f"id {r.json().get('id')!r}")


# ---- completions ---------------------------------------------------------------------------


@case("core")
def case_completion_shape(ctx: Ctx) -> None:
    """A completion: id, object, created, model, choices[index, text, finish_reason], usage."""
    b = ctx.completion(prompt=PROMPT, max_tokens=5, temperature=0)
    check(isinstance(b.get("id"), str) and b["id"], "id missing")
    check(b.get("object") == "text_completion", f"object {b.get('object')!r}")
    check(isinstance(b.get("created"), int), "created is not an int")
    check(isinstance(b.get("model"), str), "model is not a string")
    ch = b.get("choices")
    check(isinstance(ch, list) and len(ch) == 1, f"choices {ch!r}")
    c = ch[0]
    check(c.get("index") == 0 and isinstance(c.get("text"), str), f"choice {c}")
    check(c.get("finish_reason") in ("stop", "length"), f"finish_reason {c.get('finish_reason')!r}")
    u = _usage(b, "completion")
    check(1 <= u["completion_tokens"] <= 5, f"completion_tokens {u['completion_tokens']}")


@case("core")
def case_completion_max_tokens_length(ctx: Ctx) -> None:
    """max_tokens cuts the completion: finish_reason "length", completion_tokens == max_tokens."""
    b = ctx.completion(prompt="Count: 1, 2, 3,", max_tokens=3, temperature=0)
    c = b["choices"][0]
    u = _usage(b, "completion")
    if c["finish_reason"] == "stop":
        check(u["completion_tokens"] <= 3, f"{u['completion_tokens']} tokens")
    else:
        check(c["finish_reason"] == "length", f"finish_reason {c['finish_reason']!r}")
        check(u["completion_tokens"] == 3, f"completion_tokens {u['completion_tokens']} != 3")


@case("core")
def case_completion_greedy_deterministic(ctx: Ctx) -> None:
    """temperature 0 gives the same text twice."""
    a = ctx.completion(prompt=PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
    b = ctx.completion(prompt=PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
    check(a == b, f"{a!r} != {b!r}")


@case("core")
def case_completion_prompt_list(ctx: Ctx) -> None:
    """A list of prompts: one choice per prompt, indices 0..n-1, each as if sent alone."""
    prompts = [PROMPT, "One plus one is"]
    b = ctx.completion(prompt=prompts, max_tokens=5, temperature=0)
    idx = sorted(c["index"] for c in b["choices"])
    check(idx == [0, 1], f"indices {idx}")
    alone = ctx.completion(prompt=prompts[1], max_tokens=5, temperature=0)["choices"][0]["text"]
    by_index = {c["index"]: c["text"] for c in b["choices"]}
    check(by_index[1] == alone, f"batched {by_index[1]!r} != alone {alone!r}")


@case("core")
def case_completion_token_ids_prompt(ctx: Ctx) -> None:
    """A prompt as a list of token ids, and a list of such lists."""
    b = ctx.completion(prompt=[1, 2, 3, 4], max_tokens=3, temperature=0)
    check(_usage(b, "completion")["prompt_tokens"] == 4, "prompt_tokens != 4 for 4 token ids")
    b2 = ctx.completion(prompt=[[1, 2, 3], [4, 5]], max_tokens=2, temperature=0)
    check(len(b2["choices"]) == 2, f"{len(b2['choices'])} choices for 2 token-id prompts")
    check(_usage(b2, "completion")["prompt_tokens"] == 5, "prompt_tokens != 3 + 2")


@case("core")
def case_completion_n(ctx: Ctx) -> None:
    """n=3: three choices with indices 0, 1, 2; usage counts all of them."""
    b = ctx.completion(prompt=PROMPT, max_tokens=4, temperature=1.0, n=3, seed=1)
    idx = sorted(c["index"] for c in b["choices"])
    check(idx == [0, 1, 2], f"indices {idx}")
    u = _usage(b, "completion")
    check(u["completion_tokens"] >= 3, f"completion_tokens {u['completion_tokens']} for n=3")


@case("core")
def case_completion_stop(ctx: Ctx) -> None:
    """A stop string ends the text before it, with finish_reason "stop"."""
    full = ctx.completion(prompt=PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    words = full.split()
    if len(words) < 2:
        raise CaseSkipped(f"greedy text too short to pick a stop string: {full!r}")
    stop = words[1]
    c = ctx.completion(prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])["choices"][0]
    check(stop not in c["text"], f"text {c['text']!r} contains the stop string {stop!r}")
    check(full.startswith(c["text"]), f"{c['text']!r} is not a prefix of {full!r}")
    check(c["finish_reason"] == "stop", f"finish_reason {c['finish_reason']!r}")


@case("core")
def case_completion_echo(ctx: Ctx) -> None:
    """echo=true: the text starts with the prompt."""
    c = ctx.completion(prompt=PROMPT, max_tokens=3, temperature=0, echo=True)["choices"][0]
    check(c["text"].startswith(PROMPT), f"text {c['text']!r} does not start with the prompt")


@case("core")
def case_completion_logprobs(ctx: Ctx) -> None:
    """logprobs=2: tokens, token_logprobs (<= 0), top_logprobs (<= 2 each, holding the
    chosen token under greedy), text_offset, one per completion token."""
    b = ctx.completion(prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = b["choices"][0].get("logprobs")
    check(isinstance(lp, dict), "no logprobs object")
    n = _usage(b, "completion")["completion_tokens"]
    for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        check(isinstance(lp.get(k), list) and len(lp[k]) == n, f"logprobs.{k} is not {n} long")
    check(all(x <= 1e-6 for x in lp["token_logprobs"]), "a token logprob > 0")
    for tok, top, x in zip(lp["tokens"], lp["top_logprobs"], lp["token_logprobs"], strict=True):
        check(isinstance(top, dict) and 1 <= len(top) <= 3, f"top_logprobs entry {top}")
        check(max(top.values()) >= x - 1e-4, f"greedy token {tok!r} is not the most likely")
    check(lp["text_offset"] == sorted(lp["text_offset"]), "text_offset not increasing")
    check("".join(lp["tokens"]) == b["choices"][0]["text"], "tokens do not spell the text")


@case("core")
def case_completion_echo_logprobs(ctx: Ctx) -> None:
    """echo + logprobs + max_tokens=1 (how lm-eval scores): the prompt's tokens come first,
    the first with a null logprob, then the one generated token."""
    b = ctx.completion(prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1)
    c = b["choices"][0]
    lp = c["logprobs"]
    u = _usage(b, "completion")
    want = u["prompt_tokens"] + u["completion_tokens"]
    check(len(lp["tokens"]) == want, f"{len(lp['tokens'])} tokens, want prompt + 1 = {want}")
    check(lp["token_logprobs"][0] is None, "the first prompt token's logprob is not null")
    check(all(x is not None and x <= 1e-6 for x in lp["token_logprobs"][1:]), "bad logprobs")
    check("".join(lp["tokens"]) == c["text"], "echoed tokens do not spell the text")
    check(c["text"].startswith(PROMPT), "text does not start with the prompt")


@case("core")
def case_completion_seed(ctx: Ctx) -> None:
    """The same seed at temperature 1 gives the same text."""
    kw: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 4, "temperature": 1.0, "seed": 1234}
    a = ctx.completion(**kw)["choices"][0]["text"]
    b = ctx.completion(**kw)["choices"][0]["text"]
    check(a == b, f"seed 1234 gave {a!r} then {b!r}")


@case("core")
def case_completion_stream(ctx: Ctx) -> str:
    """Streaming: text_completion chunks, one finish_reason, [DONE]; the same text as not
    streaming."""
    body = {"model": ctx.model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    s = ctx.stream("/v1/completions", body)
    _stream_contract(s, "text_completion")
    text = _stream_text(s, chat=False)
    want = ctx.completion(prompt=PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
    check(text == want, f"streamed {text!r} != {want!r}")
    return f"{len(s.events)} chunks"


@case("core")
def case_completion_stream_usage(ctx: Ctx) -> None:
    """stream_options.include_usage: a last chunk with usage and empty choices; other
    chunks carry usage null (or none)."""
    body = {
        "model": ctx.model,
        "prompt": PROMPT,
        "max_tokens": 3,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    s = ctx.stream("/v1/completions", body)
    _stream_contract(s, "text_completion")
    last = s.events[-1]
    check(last.get("choices") == [], f"last chunk's choices {last.get('choices')!r}")
    u = _usage(last, "usage chunk")
    check(u["completion_tokens"] >= 1, "usage chunk counts no tokens")
    check(all(e.get("usage") is None for e in s.events[:-1]), "usage on a non-final chunk")


@case("core")
def case_completion_stream_n(ctx: Ctx) -> None:
    """Streaming with n=2: both indices appear and each finishes once."""
    body = {"model": ctx.model, "prompt": PROMPT, "max_tokens": 4, "n": 2, "temperature": 1.0}
    s = ctx.stream("/v1/completions", body)
    _stream_contract(s, "text_completion", num_choices=2)


# ---- chat ----------------------------------------------------------------------------------


@case("core")
def case_chat_shape(ctx: Ctx) -> None:
    """A chat completion: chat.completion object, an assistant message, finish_reason, usage."""
    b = ctx.chat(messages=MESSAGES, max_tokens=4, temperature=0)
    check(b.get("object") == "chat.completion", f"object {b.get('object')!r}")
    check(isinstance(b.get("id"), str) and isinstance(b.get("created"), int), "id/created")
    c = b["choices"][0]
    check(c.get("index") == 0, "index != 0")
    m = c.get("message") or {}
    check(m.get("role") == "assistant", f"role {m.get('role')!r}")
    check(isinstance(m.get("content"), str), "content is not a string")
    check(c.get("finish_reason") in ("stop", "length"), f"finish_reason {c.get('finish_reason')}")
    _usage(b, "chat")


@case("core")
def case_chat_system_and_multi_turn(ctx: Ctx) -> None:
    """System message and earlier turns are accepted, and change the prompt."""
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a fruit."},
    ]
    long = _usage(ctx.chat(messages=msgs, max_tokens=4, temperature=0), "chat")["prompt_tokens"]
    short = _usage(ctx.chat(messages=msgs[-1:], max_tokens=4, temperature=0), "chat")
    check(long > short["prompt_tokens"], "earlier turns did not reach the prompt")


@case("core")
def case_chat_content_parts(ctx: Ctx) -> None:
    """Message content as a list of text parts equals the same text as a string."""
    parts = [{"type": "text", "text": "Name three"}, {"type": "text", "text": " colours."}]
    a = ctx.chat(messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0)
    b = ctx.chat(messages=[{"role": "user", "content": "Name three colours."}], max_tokens=6,
                 temperature=0)  # fmt: skip
    ua, ub = _usage(a, "parts"), _usage(b, "string")
    check(abs(ua["prompt_tokens"] - ub["prompt_tokens"]) <= 2, f"{ua} vs {ub}")


@case("core")
def case_chat_max_tokens_length(ctx: Ctx) -> None:
    """max_tokens=2 cuts the reply: finish_reason "length", 2 completion tokens."""
    b = ctx.chat(messages=[{"role": "user", "content": "Write a long story."}], max_tokens=2)
    c = b["choices"][0]
    check(c["finish_reason"] == "length", f"finish_reason {c['finish_reason']!r}")
    check(_usage(b, "chat")["completion_tokens"] == 2, "completion_tokens != 2")


@case("core")
def case_chat_max_completion_tokens(ctx: Ctx) -> None:
    """max_completion_tokens (the newer name) limits the reply like max_tokens."""
    b = ctx.chat(messages=[{"role": "user", "content": "Write a long story."}],
                 max_completion_tokens=3)  # fmt: skip
    check(_usage(b, "chat")["completion_tokens"] <= 3, "more than max_completion_tokens")
    check(b["choices"][0]["finish_reason"] == "length", "finish_reason is not length")


@case("core")
def case_chat_n(ctx: Ctx) -> None:
    """n=2: two choices, indices 0 and 1."""
    b = ctx.chat(messages=MESSAGES, max_tokens=4, n=2, temperature=1.0, seed=3)
    check(sorted(c["index"] for c in b["choices"]) == [0, 1], "indices are not [0, 1]")


@case("core")
def case_chat_stop(ctx: Ctx) -> None:
    """A stop string ends the reply before it, finish_reason "stop"."""
    full = ctx.chat(messages=MESSAGES, max_tokens=8, temperature=0)["choices"][0]["message"]
    words = (full["content"] or "").split()
    if len(words) < 2:
        raise CaseSkipped(f"greedy reply too short: {full['content']!r}")
    stop = words[1]
    c = ctx.chat(messages=MESSAGES, max_tokens=8, temperature=0, stop=stop)["choices"][0]
    check(stop not in (c["message"]["content"] or ""), "reply contains the stop string")
    check(c["finish_reason"] == "stop", f"finish_reason {c['finish_reason']!r}")


@case("core")
def case_chat_seed(ctx: Ctx) -> None:
    """The same seed at temperature 1 gives the same reply."""
    kw: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 4, "temperature": 1.0, "seed": 7}
    a = ctx.chat(**kw)["choices"][0]["message"]["content"]
    b = ctx.chat(**kw)["choices"][0]["message"]["content"]
    check(a == b, f"seed 7 gave {a!r} then {b!r}")


@case("core")
def case_chat_logprobs(ctx: Ctx) -> None:
    """logprobs + top_logprobs=2: content entries with token, logprob, bytes, top_logprobs."""
    b = ctx.chat(messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = (b["choices"][0].get("logprobs") or {}).get("content")
    check(isinstance(content, list), "no logprobs.content list")
    check(len(content) == _usage(b, "chat")["completion_tokens"], "one entry per token")
    for e in content:
        check(isinstance(e.get("token"), str), "entry.token")
        check(isinstance(e.get("logprob"), (int, float)) and e["logprob"] <= 1e-6, "logprob")
        check(e.get("bytes") is None or isinstance(e["bytes"], list), "bytes")
        top = e.get("top_logprobs")
        check(isinstance(top, list) and len(top) == 2, f"top_logprobs {top}")
        check(max(t["logprob"] for t in top) >= e["logprob"] - 1e-4, "greedy not the top")


@case("core")
def case_chat_stream(ctx: Ctx) -> str:
    """Streaming chat: chunks of chat.completion.chunk, role first, one finish_reason,
    [DONE]; the same content as not streaming."""
    body = {"model": ctx.model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    s = ctx.stream("/v1/chat/completions", body)
    _stream_contract(s, "chat.completion.chunk")
    first = s.events[0]["choices"][0]["delta"]
    check(first.get("role") == "assistant", f"first delta {first}")
    text = _stream_text(s, chat=True)
    want = ctx.chat(messages=MESSAGES, max_tokens=4, temperature=0)["choices"][0]["message"]
    check(text == want["content"], f"streamed {text!r} != {want['content']!r}")
    return f"{len(s.events)} chunks"


@case("core")
def case_chat_stream_usage(ctx: Ctx) -> None:
    """stream_options.include_usage on chat: the final chunk has usage and choices == []."""
    body = {
        "model": ctx.model,
        "messages": MESSAGES,
        "max_tokens": 4,
        "stream_options": {"include_usage": True},
    }
    s = ctx.stream("/v1/chat/completions", body)
    _stream_contract(s, "chat.completion.chunk")
    check(s.events[-1].get("choices") == [], "last chunk's choices are not empty")
    _usage(s.events[-1], "usage chunk")


@case("core")
def case_chat_stream_without_usage(ctx: Ctx) -> None:
    """Without stream_options no chunk carries a usage object."""
    body = {"model": ctx.model, "messages": MESSAGES, "max_tokens": 3}
    s = ctx.stream("/v1/chat/completions", body)
    _stream_contract(s, "chat.completion.chunk")
    check(all(not e.get("usage") for e in s.events), "a chunk carries usage")


@case("core")
def case_chat_response_format_text(ctx: Ctx) -> None:
    """response_format {"type": "text"} is accepted."""
    ctx.chat(messages=MESSAGES, max_tokens=3, response_format={"type": "text"})


@case("core")
def case_chat_response_format_json_object(ctx: Ctx) -> None:
    """response_format {"type": "json_object"}: the reply parses as a JSON object."""
    msgs = [{"role": "user", "content": "Give a JSON object with a key 'a' set to 1."}]
    b = ctx.chat(messages=msgs, max_tokens=40, temperature=0,
                 response_format={"type": "json_object"})  # fmt: skip
    text = b["choices"][0]["message"]["content"] or ""
    try:
        check(isinstance(json.loads(text), dict), f"not an object: {text!r}")
    except json.JSONDecodeError:
        raise AssertionError(f"reply is not JSON: {text[:120]!r}") from None


@case("core")
def case_chat_tools(ctx: Ctx) -> str:
    """tools with tool_choice naming a function: the reply is a tool call of it with JSON
    arguments, finish_reason "tool_calls"."""
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }]  # fmt: skip
    b = ctx.chat(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    c = b["choices"][0]
    calls = c["message"].get("tool_calls")
    check(isinstance(calls, list) and calls, f"no tool_calls in {c['message']}")
    fn = calls[0].get("function", {})
    check(fn.get("name") == "get_weather", f"called {fn.get('name')!r}")
    check(isinstance(json.loads(fn.get("arguments", "")), dict), "arguments not a JSON object")
    check(c["finish_reason"] in ("tool_calls", "stop"), f"finish_reason {c['finish_reason']}")
    return str(fn.get("arguments"))


# ---- errors --------------------------------------------------------------------------------


@case("core")
def case_error_unknown_model(ctx: Ctx) -> str:
    """An unknown model: 404 with an error object (OpenAI's model_not_found)."""
    r = ctx.post("/v1/chat/completions", {"model": "no-such-model-xyz", "messages": MESSAGES})
    return expect_error(r, (404, 400), "model")


@case("core")
def case_error_invalid_json(ctx: Ctx) -> str:
    """A body that is not JSON: 400 with an error object."""
    r = ctx.http.post("/v1/chat/completions", content=b"{not json",
                      headers={"Content-Type": "application/json"})  # fmt: skip
    return expect_error(r, (400, 422))


@case("core")
def case_error_missing_messages(ctx: Ctx) -> str:
    """Chat without messages: 400 naming messages."""
    return expect_error(ctx.post("/v1/chat/completions", {"model": ctx.model}), (400,), "messages")


@case("core")
def case_error_empty_messages(ctx: Ctx) -> str:
    """Chat with messages == []: 400."""
    r = ctx.post("/v1/chat/completions", {"model": ctx.model, "messages": []})
    return expect_error(r, (400,), "messages")


@case("core")
def case_error_bad_role(ctx: Ctx) -> str:
    """A message with an unknown role: 400."""
    r = ctx.post("/v1/chat/completions",
                 {"model": ctx.model, "messages": [{"role": "wizard", "content": "hi"}]})  # fmt: skip
    return expect_error(r, (400,))


@case("core")
def case_error_missing_prompt(ctx: Ctx) -> str:
    """A completion without prompt: 400 naming prompt."""
    return expect_error(ctx.post("/v1/completions", {"model": ctx.model}), (400,), "prompt")


@case("core")
def case_error_temperature_range(ctx: Ctx) -> str:
    """temperature=5 (outside [0, 2]): 400 naming temperature."""
    r = ctx.post("/v1/completions", {"model": ctx.model, "prompt": "x", "temperature": 5})
    return expect_error(r, (400,), "temperature")


@case("core")
def case_error_top_p_range(ctx: Ctx) -> str:
    """top_p=1.5: 400 naming top_p."""
    r = ctx.post("/v1/completions", {"model": ctx.model, "prompt": "x", "top_p": 1.5})
    return expect_error(r, (400,), "top_p")


@case("core")
def case_error_negative_max_tokens(ctx: Ctx) -> str:
    """max_tokens=-1: 400 naming max_tokens."""
    r = ctx.post("/v1/completions", {"model": ctx.model, "prompt": "x", "max_tokens": -1})
    return expect_error(r, (400,), "max_tokens")


@case("core")
def case_error_n_zero(ctx: Ctx) -> str:
    """n=0: 400 naming n."""
    r = ctx.post("/v1/chat/completions", {"model": ctx.model, "messages": MESSAGES, "n": 0})
    return expect_error(r, (400,), "n")


@case("core")
def case_error_presence_penalty_range(ctx: Ctx) -> str:
    """presence_penalty=3 (outside [-2, 2]): 400."""
    r = ctx.post("/v1/chat/completions",
                 {"model": ctx.model, "messages": MESSAGES, "presence_penalty": 3})  # fmt: skip
    return expect_error(r, (400,), "presence_penalty")


@case("core")
def case_error_top_logprobs_range(ctx: Ctx) -> str:
    """top_logprobs=21 (OpenAI's limit is 20): 400."""
    body = {"model": ctx.model, "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}
    return expect_error(ctx.post("/v1/chat/completions", body), (400,), "top_logprobs")


@case("core")
def case_error_wrong_type(ctx: Ctx) -> str:
    """max_tokens="ten": 400, not 500."""
    r = ctx.post("/v1/completions", {"model": ctx.model, "prompt": "x", "max_tokens": "ten"})
    return expect_error(r, (400,), "max_tokens")


@case("core")
def case_error_context_length(ctx: Ctx) -> str:
    """A prompt longer than the model's context: 400, and the server keeps serving."""
    # past the model card's max_model_len (vLLM's field) when the server gives one
    cards = ctx.http.get("/v1/models").json().get("data", [])
    limit = next((m.get("max_model_len") for m in cards if m.get("id") == ctx.model), None)
    words = 2 * limit + 16 if isinstance(limit, int) else 200_000
    r = ctx.post(
        "/v1/completions", {"model": ctx.model, "prompt": "hello " * words, "max_tokens": 4}
    )
    detail = expect_error(r, (400, 413))
    ctx.completion(prompt=PROMPT, max_tokens=2)
    return detail


@case("core")
def case_error_stream_bad_request(ctx: Ctx) -> str:
    """A bad streamed request fails before streaming: a plain 400 error object."""
    body = {"model": ctx.model, "messages": MESSAGES, "temperature": -1, "stream": True}
    return expect_error(ctx.post("/v1/chat/completions", body), (400,), "temperature")


@case("core")
def case_error_unknown_route(ctx: Ctx) -> None:
    """An unknown route under /v1: 404."""
    r = ctx.http.get("/v1/no-such-endpoint")
    check(r.status_code == 404, f"HTTP {r.status_code}")


@case("core")
def case_auth_required(ctx: Ctx) -> str:
    """With an API key configured, a request without it or with a wrong one is 401."""
    if not ctx.api_key:
        raise CaseSkipped("no --api-key given")
    path = f"{ctx.root}/v1/models"
    import httpx

    r = httpx.get(path, timeout=30)
    detail = expect_error(r, (401,))
    r2 = httpx.get(path, headers={"Authorization": "Bearer wrong-key"}, timeout=30)
    expect_error(r2, (401,))
    return detail


@case("core")
def case_logprob_values_finite(ctx: Ctx) -> None:
    """Logprobs are finite numbers, never NaN (not JSON) or -inf."""
    b = ctx.completion(prompt=PROMPT, max_tokens=3, logprobs=5, temperature=0)
    lp = b["choices"][0]["logprobs"]
    for x in lp["token_logprobs"]:
        check(isinstance(x, (int, float)) and math.isfinite(x), f"logprob {x!r}")
    for top in lp["top_logprobs"]:
        check(all(math.isfinite(v) for v in top.values()), f"top logprob {top}")
