"""One chat choice's text -> the assistant message: reasoning (``--reasoning-parser``)
split off first, then tool calls (parsed in ``auto`` mode, read back from the
constrained output for ``required`` / named), whole or as streamed deltas."""

from __future__ import annotations

from typing import Any

from kvasir.entrypoints.openai.reasoning_parsers import ReasoningParser, get_reasoning_parser
from kvasir.entrypoints.openai.tool_parsers import (
    ResolvedToolChoice,
    ToolCallStreamer,
    ToolParser,
    get_tool_parser,
    make_tool_call_id,
    parse_constrained_output,
    tool_call_dict,
)


class ChatOutputBuilder:
    """Per choice. ``message`` for a whole reply; ``delta`` for each streamed piece
    (the streamed deltas reassemble into the same message, ids aside)."""

    def __init__(
        self,
        choice: ResolvedToolChoice,
        tool_parser: str | None,
        reasoning_parser: str | None,
    ) -> None:
        self.choice = choice
        self.tool_parser: ToolParser | None = None
        if choice.mode == "auto" and tool_parser:
            self.tool_parser = get_tool_parser(tool_parser)
        self.reasoning_name = reasoning_parser
        self.reasoning: ReasoningParser | None = (
            get_reasoning_parser(reasoning_parser) if reasoning_parser else None
        )
        self._streamer = ToolCallStreamer(self.tool_parser) if self.tool_parser else None
        self._constrained_text = ""
        self._named_started = False
        self.num_calls_sent = 0

    # ------------------------------------------------------------------ whole
    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        content: str | None = text
        if self.reasoning_name:
            r = get_reasoning_parser(self.reasoning_name).extract(text)
            msg["reasoning_content"] = r.reasoning
            content = r.content
        calls = []
        mode = self.choice.mode
        if mode in ("required", "named"):
            calls = parse_constrained_output(self.choice, content or "")
            if calls:
                content = None
        elif self.tool_parser is not None and content:
            extracted = self.tool_parser.extract(content, final=True)
            calls, content = extracted.tool_calls, extracted.content
        msg["content"] = content if content is not None or not calls else None
        if calls:
            msg["tool_calls"] = [tool_call_dict(c) for c in calls]
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        return msg, finish_reason

    # ------------------------------------------------------------------ streamed
    def delta(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        final = finish_reason is not None
        out: dict[str, Any] = {}
        content: str | None = text
        if self.reasoning is not None:
            r = self.reasoning.feed(text, final)
            if r.reasoning:
                out["reasoning_content"] = r.reasoning
            content = r.content or ""
        calls: list[dict[str, Any]] = []
        mode = self.choice.mode
        if mode == "named":
            assert self.choice.named is not None
            if not self._named_started:  # the call's header first, then its arguments
                self._named_started = True
                calls.append(
                    {
                        "index": 0,
                        "id": make_tool_call_id(),
                        "type": "function",
                        "function": {"name": self.choice.named, "arguments": ""},
                    }
                )
                self.num_calls_sent = 1
            if content:
                calls.append({"index": 0, "function": {"arguments": content}})
            content = None
        elif mode == "required":
            self._constrained_text += content or ""
            content = None
            if final:  # the array is only known to be complete at the end
                parsed = parse_constrained_output(self.choice, self._constrained_text)
                for i, call in enumerate(parsed):
                    calls.append({"index": i, **tool_call_dict(call)})
                    calls[-1]["function"] = {"name": call.name, "arguments": ""}
                    calls.append({"index": i, "function": {"arguments": call.arguments}})
                self.num_calls_sent = len(parsed)
        elif self._streamer is not None:
            content, calls = self._streamer.feed(content or "", final)
            self.num_calls_sent = len(self._streamer.calls_sent)
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
        if final and self.num_calls_sent and finish_reason == "stop":
            finish_reason = "tool_calls"
        return out, finish_reason
