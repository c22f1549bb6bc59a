"""Reasoning parsers (``--reasoning-parser``): split a reply's ``<think>...</think>``
into ``reasoning_content`` and the rest into ``content``, whole or streamed.

- ``deepseek_r1``: everything up to ``</think>`` is reasoning (the template may have
  opened ``<think>`` in the prompt, so the start tag is optional); no end tag: all
  reasoning.
- ``qwen3``: reasoning only between an explicit ``<think>`` and ``</think>``; a reply
  without ``<think>`` (``enable_thinking=False``) is all content.
"""

from __future__ import annotations

from typing import NamedTuple

_START, _END = "<think>", "</think>"


class Reasoning(NamedTuple):
    reasoning: str | None
    content: str | None


class ReasoningParser:
    """Splits text into reasoning and content; ``feed`` does it for a stream of deltas,
    holding back any suffix that could be the start of a tag."""

    name = ""
    start_required = False

    def __init__(self) -> None:
        self._text = ""
        self._sent_reasoning = 0  # characters of the reasoning part already sent
        self._sent_content = 0

    def extract(self, text: str) -> Reasoning:
        reasoning, content, _ = self._split(text, final=True)
        return Reasoning(reasoning or None, content or None)

    def _split(self, text: str, final: bool) -> tuple[str, str, int]:
        """(reasoning, content, number of trailing characters held back)."""
        lead = text.lstrip()
        offset = len(text) - len(lead)
        if not final and len(lead) < len(_START) and _START.startswith(lead):
            return "", "", len(text)  # could still become "<think>"
        if lead.startswith(_START):
            body = lead[len(_START) :]
        elif self.start_required:
            return "", text, 0
        else:
            body = text if offset == 0 else lead
        end = body.find(_END)
        if end >= 0:
            return body[:end], body[end + len(_END) :].lstrip("\n"), 0
        if self.start_required and not lead.startswith(_START):
            return "", text, 0
        hold = 0
        if not final:
            for k in range(min(len(_END) - 1, len(body)), 0, -1):
                if body.endswith(_END[:k]):
                    hold = k
                    break
        return body[: len(body) - hold], "", hold

    def feed(self, delta: str, final: bool = False) -> Reasoning:
        """The reasoning and content deltas of one text delta."""
        self._text += delta
        reasoning, content, _ = self._split(self._text, final)
        r = reasoning[self._sent_reasoning :]
        c = content[self._sent_content :]
        self._sent_reasoning = max(self._sent_reasoning, len(reasoning))
        self._sent_content = max(self._sent_content, len(content))
        return Reasoning(r or None, c or None)


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    start_required = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown reasoning parser {name!r}; choose from {sorted(REASONING_PARSERS)}"
        ) from None
