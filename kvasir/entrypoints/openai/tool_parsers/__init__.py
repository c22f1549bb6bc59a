"""Tool calling for chat completions (and the Responses API).

Two ways a model's tool calls come out:

- ``tool_choice="auto"``: the model writes calls in its own format and a parser
  (``--tool-call-parser``: ``hermes``, ``llama3_json``, ``mistral``) finds them
  (``get_tool_parser(name).extract(text)``; streamed with ``ToolCallStreamer``).
- ``tool_choice="required"`` or a named function: the output is constrained with
  structured outputs (``tool_choice_constraint``) so the arguments always parse and
  validate against the function's schema; ``parse_constrained_output`` reads the calls
  back. Named: the output *is* the arguments object. Required: a JSON array of
  ``{"name": ..., "parameters": {...}}`` (one item unless ``parallel_tool_calls``).

``resolve_tool_choice`` checks ``tools`` / ``tool_choice`` (ValueError naming the field)
and says which of the two applies.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from kvasir.entrypoints.openai.tool_parsers.base import (
    ExtractedToolCalls,
    ToolCall,
    ToolCallStreamer,
    ToolParser,
    make_tool_call_id,
    tool_call_dict,
)
from kvasir.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from kvasir.entrypoints.openai.tool_parsers.llama import Llama3JsonToolParser
from kvasir.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from kvasir.sampling_params import StructuredOutputsParams

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}

__all__ = [
    "TOOL_PARSERS",
    "ExtractedToolCalls",
    "ResolvedToolChoice",
    "ToolCall",
    "ToolCallStreamer",
    "ToolParser",
    "get_tool_parser",
    "make_tool_call_id",
    "parse_constrained_output",
    "resolve_tool_choice",
    "tool_call_dict",
    "tool_choice_constraint",
]


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; choose from {sorted(TOOL_PARSERS)}"
        ) from None


class ResolvedToolChoice(NamedTuple):
    mode: str  # "none" | "auto" | "required" | "named"
    functions: dict[str, dict[str, Any]]  # name -> {"name", "description", "parameters"}
    named: str | None  # the forced function (mode "named")


def _functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}].type must be 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"tools[{i}].function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        if name in out:
            raise ValueError(f"tools[{i}].function.name {name!r} is given twice")
        out[name] = {**fn, "parameters": params}
    return out


def resolve_tool_choice(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    auto_enabled: bool,
) -> ResolvedToolChoice:
    """Check ``tools`` and ``tool_choice`` (ValueError naming ``tools[i]...`` or
    ``tool_choice``). ``tool_choice`` None means "auto" when tools are given and the
    server parses calls (``--enable-auto-tool-choice``), else "none"."""
    functions = _functions(tools)
    if tool_choice is None:
        mode = "auto" if functions and auto_enabled else "none"
        return ResolvedToolChoice(mode, functions, None)
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                f"got {tool_choice!r}"
            )
        if tool_choice != "none" and not functions:
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        if tool_choice == "auto" and not auto_enabled:
            raise ValueError(
                'tool_choice "auto" needs the server to run with --enable-auto-tool-choice '
                "and --tool-call-parser"
            )
        return ResolvedToolChoice(tool_choice, functions, None)
    if not isinstance(tool_choice, dict):
        raise ValueError("tool_choice must be a string or an object")
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ValueError('tool_choice must be {"type": "function", "function": {"name": ...}}')
    if name not in functions:
        raise ValueError(f"tool_choice names {name!r}, which is not in tools")
    return ResolvedToolChoice("named", functions, name)


def tool_choice_constraint(
    choice: ResolvedToolChoice, parallel_tool_calls: bool = True
) -> StructuredOutputsParams | None:
    """The structured-output constraint that forces the calls (None for none/auto)."""
    if choice.mode == "named":
        assert choice.named is not None
        return StructuredOutputsParams(json=choice.functions[choice.named]["parameters"])
    if choice.mode != "required":
        return None
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [name]},
                "parameters": fn["parameters"],
            },
            "required": ["name", "parameters"],
        }
        for name, fn in choice.functions.items()
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": items[0] if len(items) == 1 else {"anyOf": items},
    }
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def parse_constrained_output(choice: ResolvedToolChoice, text: str) -> list[ToolCall]:
    """The calls in the output of a ``tool_choice_constraint`` request. Empty when the
    output is cut short (finish_reason "length") and does not parse."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return []
    if choice.mode == "named":
        assert choice.named is not None
        return [ToolCall(choice.named, json.dumps(obj, ensure_ascii=False))]
    if not isinstance(obj, list):
        return []
    return [
        ToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))
        for item in obj
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]
