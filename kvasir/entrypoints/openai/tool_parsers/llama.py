"""Llama 3.1 / 3.2 JSON calls: the reply is ``{"name": ..., "parameters": {...}}``
(optionally after ``<|python_tag|>``), several separated by ``;``."""

from __future__ import annotations

import json

from kvasir.entrypoints.openai.tool_parsers.base import (
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    call_from_json,
)

_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_markers = (_TAG, "{")
    needs_special_tokens = True

    def tool_region_start(self, text: str) -> int | None:
        # Only a reply that *starts* with a call is one (a "{" later is prose).
        stripped = text.lstrip()
        if stripped.startswith(_TAG) or stripped.startswith("{"):
            return len(text) - len(stripped)
        if stripped and not _TAG.startswith(stripped):
            return None
        return None

    def safe_content_end(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or _TAG.startswith(stripped):
            return 0  # could still become a call
        return len(text)

    def extract(self, text: str, final: bool = True) -> ExtractedToolCalls:
        start = self.tool_region_start(text)
        if start is None:
            return ExtractedToolCalls([], text)
        body = text[start:]
        if body.startswith(_TAG):
            body = body[len(_TAG) :]
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        pos = 0
        while True:
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
            if pos >= len(body):
                break
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                if final:
                    return ExtractedToolCalls([], text)
                break
            call = call_from_json(obj, ("parameters", "arguments"))
            if call is None:
                return ExtractedToolCalls([], text) if final else ExtractedToolCalls(calls, None)
            calls.append(call)
        if final and not calls:
            return ExtractedToolCalls([], text)
        return ExtractedToolCalls(calls, None)
