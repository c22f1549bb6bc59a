"""Mistral calls: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3 tokenizers)
or ``[TOOL_CALLS]name[ARGS]{...}`` per call (v11+ tokenizers)."""

from __future__ import annotations

import json

from kvasir.entrypoints.openai.tool_parsers.base import (
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    call_from_json,
)

_BOT = "[TOOL_CALLS]"
_ARGS = "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    start_markers = (_BOT,)
    needs_special_tokens = True

    def extract(self, text: str, final: bool = True) -> ExtractedToolCalls:
        start = text.find(_BOT)
        if start < 0:
            return ExtractedToolCalls([], text)
        content = text[:start].strip() or None
        parts = [p for p in text[start:].split(_BOT) if p.strip()]
        calls: list[ToolCall] = []
        decoder = json.JSONDecoder()
        for part in parts:
            part = part.strip()
            if _ARGS in part:  # name[ARGS]{...}
                name, args = part.split(_ARGS, 1)
                try:
                    obj, _ = decoder.raw_decode(args.strip())
                except json.JSONDecodeError:
                    if final:
                        return ExtractedToolCalls([], text)
                    break
                if not isinstance(obj, dict):
                    return (
                        ExtractedToolCalls([], text)
                        if final
                        else ExtractedToolCalls(calls, content)
                    )
                calls.append(ToolCall(name.strip(), json.dumps(obj, ensure_ascii=False)))
                continue
            try:
                obj, _ = decoder.raw_decode(part)
            except json.JSONDecodeError:
                if final:
                    return ExtractedToolCalls([], text)
                break
            items = obj if isinstance(obj, list) else [obj]
            for item in items:
                call = call_from_json(item)
                if call is None:
                    return (
                        ExtractedToolCalls([], text)
                        if final
                        else ExtractedToolCalls(calls, content)
                    )
                calls.append(call)
        return ExtractedToolCalls(calls, content)
