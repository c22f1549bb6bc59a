"""Tool-call and reasoning parsers on recorded outputs in each model family's format:
whole-text extraction, and streamed deltas (every split of the text into pieces)
reassembling into the same calls and content."""

from __future__ import annotations

import json
import random

import pytest

from kvasir.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from kvasir.entrypoints.openai.tool_parsers import (
    ToolCall,
    ToolCallStreamer,
    get_tool_parser,
    parse_constrained_output,
    resolve_tool_choice,
    tool_choice_constraint,
)

W = {"city": "Paris", "unit": "C"}
A = {"a": 2, "b": 3}

# (parser, model output, expected calls as (name, arguments dict), expected content)
RECORDED = [
    # Qwen2.5 / Qwen3 / SmolLM2 (Hermes template)
    (
        "hermes",
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>',
        [("get_weather", W)],
        "Sure.",
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
        [("get_weather", W), ("add", A)],
        None,
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}',
        [("add", A)],
        None,
    ),  # no closing tag (EOS)
    ("hermes", "The weather in Paris is mild.", [], "The weather in Paris is mild."),
    ("hermes", "<tool_call>\nnot json\n</tool_call>", [], "<tool_call>\nnot json\n</tool_call>"),
    # Llama 3.1 / 3.2 JSON
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}',
        [("get_weather", W)],
        None,
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}',
        [("add", A)],
        None,
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}; {"name": "add", "parameters": {"a": 2, "b": 3}}',
        [("get_weather", W), ("add", A)],
        None,
    ),
    ("llama3_json", "I can't call {tools} today.", [], "I can't call {tools} today."),
    # Mistral: v3 JSON array and v11 name[ARGS]
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, {"name": "add", "arguments": {"a": 2, "b": 3}}]',
        [("get_weather", W), ("add", A)],
        None,
    ),
    (
        "mistral",
        'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}',
        [("get_weather", W)],
        "Let me check.",
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}[TOOL_CALLS]add[ARGS]{"a": 2, "b": 3}',
        [("get_weather", W), ("add", A)],
        None,
    ),
    ("mistral", "No tools needed.", [], "No tools needed."),
]


def _calls(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(("parser", "text", "calls", "content"), RECORDED)
def test_extract_recorded_outputs(parser: str, text: str, calls: list, content: str | None) -> None:
    out = get_tool_parser(parser).extract(text)
    assert _calls(out.tool_calls) == calls
    assert out.content == content


@pytest.mark.parametrize(("parser", "text", "calls", "content"), RECORDED)
def test_streamed_deltas_reassemble(
    parser: str, text: str, calls: list, content: str | None
) -> None:
    rng = random.Random(len(text))
    for trial in range(20):
        # Pieces of 1..8 characters (token-sized), a different split each trial.
        cuts, i = [], 0
        while i < len(text):
            step = 1 if trial == 0 else rng.randint(1, 8)
            cuts.append(text[i : i + step])
            i += step
        streamer = ToolCallStreamer(get_tool_parser(parser))
        got_content = ""
        got: dict[int, dict] = {}
        for n, piece in enumerate(cuts):
            c, deltas = streamer.feed(piece, final=n == len(cuts) - 1)
            got_content += c
            for d in deltas:
                e = got.setdefault(d["index"], {"name": "", "arguments": ""})
                if "id" in d:
                    assert d["id"].startswith("call_") and d["type"] == "function"
                e["name"] += d["function"].get("name", "")
                e["arguments"] += d["function"].get("arguments", "")
        assert [(e["name"], json.loads(e["arguments"])) for _, e in sorted(got.items())] == calls
        if calls:  # content before the calls (streamed as it came, unstripped)
            assert got_content.strip() == (content or "")
        else:
            assert got_content == text


def test_reasoning_parsers_whole_and_streamed() -> None:
    cases = [
        ("qwen3", "<think>\nLet me see.\n</think>\n\nIt is 5.", "\nLet me see.\n", "It is 5."),
        ("qwen3", "It is 5.", None, "It is 5."),  # enable_thinking=False: no tags
        ("deepseek_r1", "Let me see.</think>It is 5.", "Let me see.", "It is 5."),
        ("deepseek_r1", "<think>Let me see.</think>It is 5.", "Let me see.", "It is 5."),
        ("deepseek_r1", "Still thinking", "Still thinking", None),  # cut before </think>
    ]
    for name, text, reasoning, content in cases:
        whole = get_reasoning_parser(name).extract(text)
        assert (whole.reasoning, whole.content) == (reasoning, content), (name, text)
        for size in (1, 2, 3, 7):
            p = get_reasoning_parser(name)
            r = c = ""
            pieces = [text[i : i + size] for i in range(0, len(text), size)]
            for n, piece in enumerate(pieces):
                out = p.feed(piece, final=n == len(pieces) - 1)
                r += out.reasoning or ""
                c += out.content or ""
            assert (r or None, c or None) == (reasoning, content), (name, text, size)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "add"}},
]


def test_tool_choice_resolution_and_constraints() -> None:
    assert resolve_tool_choice(TOOLS, None, auto_enabled=True).mode == "auto"
    assert resolve_tool_choice(TOOLS, None, auto_enabled=False).mode == "none"
    with pytest.raises(ValueError, match="^tool_choice .*--enable-auto-tool-choice"):
        resolve_tool_choice(TOOLS, "auto", auto_enabled=False)
    with pytest.raises(ValueError, match="^tool_choice names 'nope'"):
        resolve_tool_choice(TOOLS, {"type": "function", "function": {"name": "nope"}}, True)
    with pytest.raises(ValueError, match=r"^tools\[1\]\.function\.name"):
        resolve_tool_choice([TOOLS[0], {"type": "function", "function": {}}], "required", True)
    named = resolve_tool_choice(
        TOOLS, {"type": "function", "function": {"name": "get_weather"}}, False
    )
    so = tool_choice_constraint(named)
    assert so is not None and json.loads(so.json) == TOOLS[0]["function"]["parameters"]
    assert _calls(parse_constrained_output(named, '{"city": "Oslo"}')) == [
        ("get_weather", {"city": "Oslo"})
    ]
    required = resolve_tool_choice(TOOLS, "required", False)
    schema = json.loads(tool_choice_constraint(required, parallel_tool_calls=False).json)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [i["properties"]["name"]["enum"] for i in schema["items"]["anyOf"]] == [
        ["get_weather"],
        ["add"],
    ]
    text = '[{"name": "add", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Lima"}}]'
    assert _calls(parse_constrained_output(required, text)) == [
        ("add", {}),
        ("get_weather", {"city": "Lima"}),
    ]
    assert parse_constrained_output(required, '[{"name": "add", "param') == []  # cut short
    assert tool_choice_constraint(resolve_tool_choice(TOOLS, "none", False)) is None
