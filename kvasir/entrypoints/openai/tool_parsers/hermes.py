"""Hermes-style calls (Qwen2/2.5/3, SmolLM2, Hermes): ``<tool_call>{"name": ...,
"arguments": {...}}</tool_call>``, one block per call."""

from __future__ import annotations

import json
import re

from kvasir.entrypoints.openai.tool_parsers.base import (
    ExtractedToolCalls,
    ToolParser,
    call_from_json,
)

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_OPEN = "<tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    start_markers = (_OPEN,)

    def extract(self, text: str, final: bool = True) -> ExtractedToolCalls:
        start = text.find(_OPEN)
        if start < 0:
            return ExtractedToolCalls([], text)
        bodies = [m.group(1) for m in _BLOCK.finditer(text)]
        closed_end = max((m.end() for m in _BLOCK.finditer(text)), default=start)
        tail = text[closed_end:]
        if final and _OPEN in tail:  # the model stopped before the closing tag
            bodies.append(tail.split(_OPEN, 1)[1])
        calls = []
        for body in bodies:
            try:
                call = call_from_json(json.loads(body.strip()))
            except json.JSONDecodeError:
                call = None
            if call is None:
                if final:  # a malformed block: the text stays content
                    return ExtractedToolCalls([], text)
                break
            calls.append(call)
        content = text[:start].strip() or None
        return ExtractedToolCalls(calls, content)
