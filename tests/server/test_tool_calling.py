"""Tool calling and reasoning through a real ``kvasir serve`` (``--enable-auto-tool-choice
--tool-call-parser hermes --reasoning-parser qwen3``): ``required`` and named choices
always give arguments that validate against the function's schema (jsonschema),
``auto`` parses the model's Hermes calls, streamed deltas reassemble into the same
calls, tool results go back through the template, and bad tool input is a 400."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from server_utils import API_KEY, MODEL, ServerProc

# Slow (default-model server requests; parts never run in their final form through pytest): `make test-slow`, not `make test`.
pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


@pytest.fixture(scope="module")
def client(tools_server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=tools_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300.0
    )


@pytest.fixture(scope="module")
def http(tools_server: ServerProc):
    with tools_server.client(timeout=300.0) as c:
        yield c


def _check_calls(calls, allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _reassemble(stream) -> tuple[list[tuple[str, str]], str | None, str, str]:
    """(calls as (name, arguments), finish_reason, content, reasoning) from chunks."""
    calls: dict[int, dict] = {}
    finish, content, reasoning = None, "", ""
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        content += ch.delta.content or ""
        reasoning += getattr(ch.delta, "reasoning_content", None) or ""
        for d in ch.delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert entry["id"] is None  # the id comes once, with the name
                entry["id"] = d.id
            if d.function and d.function.name:
                entry["name"] += d.function.name
            if d.function and d.function.arguments:
                entry["arguments"] += d.function.arguments
    assert all(e["id"] for e in calls.values())
    return (
        [(e["name"], e["arguments"]) for _, e in sorted(calls.items())],
        finish,
        content,
        reasoning,
    )


def test_required_always_validates(client: openai.OpenAI) -> None:
    # Sampled, one call each (a tiny model sampling a parallel array may not stop).
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        n=6,
        seed=7,
        temperature=1.0,
        max_tokens=40,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, set(SCHEMAS))
    # Parallel calls allowed: greedy, with a frequency penalty (without one this tiny
    # model repeats the same call until max_tokens: seen here, 2026-12-02).
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
        max_tokens=120, frequency_penalty=2.0,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    _check_calls(r.choices[0].message.tool_calls, set(SCHEMAS))


def test_named_always_validates(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, n=6, seed=3, max_tokens=40
    )
    for choice in r.choices:
        assert [c.function.name for c in choice.message.tool_calls] == ["add"]
        _check_calls(choice.message.tool_calls, {"add"})


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_streamed_forced_calls_equal_the_whole_response(client: openai.OpenAI, tool_choice) -> None:
    kw = dict(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=120,
        frequency_penalty=2.0,  # "required" allows parallel calls: see above
    )
    whole = client.chat.completions.create(**kw).choices[0]
    calls, finish, content, _ = _reassemble(client.chat.completions.create(stream=True, **kw))
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert finish == whole.finish_reason == "tool_calls" and content == ""


# The model writes a Hermes call itself (guided here so the test does not depend on the
# tiny model choosing to): tool_choice "auto" parses it, whole and streamed.
HERMES_CALL = (
    r'Ok\. <tool_call>\{"name": "add", "arguments": \{"a": [1-9], "b": [1-9]\}\}</tool_call>'
)


def test_auto_parses_the_models_hermes_calls(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        temperature=0,
        max_tokens=80,  # the forced text tokenises into ~56 tokens
        extra_body={"guided_regex": HERMES_CALL},
    )
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "Ok."
    _check_calls(whole.message.tool_calls, {"add"})
    calls, finish, content, _ = _reassemble(client.chat.completions.create(stream=True, **kw))
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert finish == "tool_calls" and content.strip() == "Ok."
    # tool_choice "none": the same text stays content.
    none = client.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert none.message.tool_calls in (None, []) and "<tool_call>" in none.message.content
    assert none.finish_reason == "stop"


def test_tool_results_go_through_the_template(http: httpx.Client) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'},
    }
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "minus 7 degrees and snowing"},
    ]
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 5},
    )
    assert r.status_code == 200, r.text
    base = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 1},
    ).json()
    # The tool result (and the call) are in the prompt: it is longer by at least them.
    extra = r.json()["usage"]["prompt_tokens"] - base["usage"]["prompt_tokens"]
    assert extra >= 8, (r.json()["usage"], base["usage"])


def test_reasoning_content_split_whole_and_streamed(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Think, then answer."}],
        temperature=0,
        max_tokens=40,
        extra_body={"guided_regex": r"<think>[a-z ]{5,30}</think>\n[A-Z][a-z ]{3,20}"},
    )
    whole = client.chat.completions.create(**kw).choices[0].message
    reasoning = whole.reasoning_content
    assert reasoning and "<think>" not in reasoning and "</think>" not in whole.content
    assert whole.content[0].isupper()
    _, _, content, streamed_reasoning = _reassemble(
        client.chat.completions.create(stream=True, **kw)
    )
    assert (streamed_reasoning, content) == (reasoning, whole.content)


def test_continue_final_message_and_generation_prompt(http: httpx.Client) -> None:
    msgs = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "My favourite colour is"},
    ]

    def prompt_tokens(**kw) -> int:
        r = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 1, **kw}
        )
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    cont = prompt_tokens(add_generation_prompt=False, continue_final_message=True)
    closed = prompt_tokens(add_generation_prompt=False)
    opened = prompt_tokens(add_generation_prompt=True)
    # continue: the assistant turn stays open (no end-of-turn); a new turn adds a header.
    assert cont < closed < opened


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"description": "x"}}]},
            "tools[0].function.name",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
        (
            {"continue_final_message": True, "add_generation_prompt": False},
            "continue_final_message",
        ),
    ],
)
def test_bad_tool_input_is_400(http: httpx.Client, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    ok = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
