"""The tool-parser interface: text a model wrote -> tool calls (whole or streamed)."""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from typing import Any, NamedTuple


class ToolCall(NamedTuple):
    name: str
    arguments: str  # JSON text of the arguments object


class ExtractedToolCalls(NamedTuple):
    tool_calls: list[ToolCall]
    content: str | None  # the text around the calls (None when there is none)

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


def make_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_dict(call: ToolCall, call_id: str | None = None) -> dict[str, Any]:
    """A call as the OpenAI API returns it in ``message.tool_calls``."""
    return {
        "id": call_id or make_tool_call_id(),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def call_from_json(
    obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")
) -> ToolCall | None:
    """``{"name": ..., "arguments"|"parameters": {...}}`` -> ToolCall (None if not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser(ABC):
    """Parses one model family's tool-call format.

    ``extract(text, final)`` returns the calls in ``text``; with ``final=False`` (a
    stream still running) only calls that are certainly complete, so the streamed calls
    are a prefix of the final ones and equal them once the stream ends. ``start_markers``
    are the strings that begin a tool-call region: a stream holds back content from the
    first one on (and any suffix of the text that could be the start of one).
    """

    name: str = ""
    start_markers: tuple[str, ...] = ()
    # Whether the format's markers are special tokens that detokenisation must keep.
    needs_special_tokens: bool = False

    @abstractmethod
    def extract(self, text: str, final: bool = True) -> ExtractedToolCalls: ...

    def tool_region_start(self, text: str) -> int | None:
        """Index where the tool-call region begins in ``text`` (None: not yet)."""
        hits = [i for m in self.start_markers if (i := text.find(m)) >= 0]
        return min(hits) if hits else None

    def safe_content_end(self, text: str) -> int:
        """How much of ``text`` (which has no complete start marker) may be streamed
        as content: all but a suffix that could begin a marker."""
        keep = 0
        for m in self.start_markers:
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    keep = max(keep, k)
                    break
        return len(text) - keep


class ToolCallStreamer:
    """Turns a stream of text deltas into OpenAI chat-completion deltas: content until
    the parser's tool-call region starts, then ``tool_calls`` deltas (one with the id,
    type and name and empty arguments, one with the arguments) as each call completes.
    At the end, if the region held no call after all, it is sent as content."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.content_sent = 0  # characters of text streamed as content
        self.region: int | None = None
        self.calls_sent: list[ToolCall] = []

    def _call_deltas(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out = []
        for call in calls[len(self.calls_sent) :]:
            index = len(self.calls_sent)
            out.append(
                {
                    "index": index,
                    "id": make_tool_call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            )
            out.append({"index": index, "function": {"arguments": call.arguments}})
            self.calls_sent.append(call)
        return out

    def feed(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool_calls deltas) for one text delta."""
        self.text += delta
        content = ""
        if self.region is None:
            self.region = self.parser.tool_region_start(self.text)
            end = (
                self.region if self.region is not None else self.parser.safe_content_end(self.text)
            )
            if final and self.region is None:
                end = len(self.text)
            content = self.text[self.content_sent : end]
            self.content_sent = max(self.content_sent, end)
        if self.region is None:
            return content, []
        extracted = self.parser.extract(self.text, final=final)
        deltas = self._call_deltas(extracted.tool_calls)
        if final and not self.calls_sent:
            content += self.text[self.content_sent :]  # not a tool call after all
            self.content_sent = len(self.text)
        return content, deltas
