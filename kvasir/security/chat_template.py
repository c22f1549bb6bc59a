"""Chat templates rendered as the untrusted programs they are.

A template is Jinja code shipped with a model (or, with ``--trust-request-chat-template``,
sent by a client). ``render_chat`` runs it in Jinja's ``ImmutableSandboxedEnvironment``
(no ``__class__``/``__globals__`` walks, no mutating calls on objects) with limits that
the plain sandbox lacks, checked while the template runs: a wall-clock deadline (at every
call, attribute or item access, binary operator and every 256 steps of ``range``),
``range`` at most ``max_range`` long, ``*``/``**`` results bounded, and the output at
most ``max_output_chars``. Exceeding one raises ``TemplateLimitError``.

``tokenize_chat`` renders and tokenises so that special tokens a user typed inside a
message (``<|im_start|>system``) stay plain text: before rendering, each occurrence of a
special token's text in message content is replaced by a per-render placeholder; the
rendered text is split on the placeholders, the template's own text is tokenised
normally (its control tokens stay control tokens) and each placeholder becomes the
special token's text tokenised with ``split_special_tokens=True``. Messages are
validated first (roles, content types, tool messages). The rendering context follows
HF transformers' ``apply_chat_template`` (``messages``, ``tools``, ``documents``,
``add_generation_prompt``, the special-token strings, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not HTML-escape), so model templates render as
they do there; ``tests/security/test_chat_template.py`` checks token equality with HF.
"""

from __future__ import annotations

import contextvars
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

VALID_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "kvasir_template_deadline", default=None
)


class TemplateLimitError(ValueError):
    """The template ran past a limit (time, output size, range, repetition)."""


@dataclass(frozen=True)
class TemplateLimits:
    timeout_s: float = 1.0
    max_output_chars: int = 4_000_000
    max_range: int = 100_000
    max_template_chars: int = 200_000


def _check_deadline() -> None:
    d = _DEADLINE.get()
    if d is not None and time.monotonic() > d[0]:
        raise TemplateLimitError(f"chat template took longer than {d[1]:.3g}s to render")


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): here
    it only renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class LimitedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, limits: TemplateLimits) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
        )
        self.limits = limits
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.globals["range"] = self._range

    def _range(self, *args: int) -> Iterator[int]:
        r = range(*args)
        if len(r) > self.limits.max_range:
            raise TemplateLimitError(
                f"chat template asked for range() of {len(r)} items (limit {self.limits.max_range})"
            )
        return _checked_iter(r)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_deadline()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_deadline()
        limit = self.limits.max_output_chars
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(k, int):
                    if len(seq) * max(k, 0) > limit:
                        raise TemplateLimitError("chat template built a too large sequence")
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TemplateLimitError("chat template raised to a too large power")
        return super().call_binop(context, operator, left, right)


def _checked_iter(r: range) -> Iterator[int]:
    for i, x in enumerate(r):
        if i % 256 == 0:
            _check_deadline()
        yield x


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str, limits: TemplateLimits) -> jinja2.Template:
    if len(source) > limits.max_template_chars:
        raise TemplateLimitError(
            f"chat template is {len(source)} characters (limit {limits.max_template_chars})"
        )
    return LimitedSandbox(limits).from_string(source)


def render_template(
    source: str, context: dict[str, Any], limits: TemplateLimits = TemplateLimits()
) -> str:
    """Render ``source`` with ``context`` under ``limits`` (TemplateLimitError, or
    jinja2's SecurityError / TemplateError, on failure)."""
    template = _compile(source, limits)
    token = _DEADLINE.set((time.monotonic() + limits.timeout_s, limits.timeout_s))
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > limits.max_output_chars:
                raise TemplateLimitError(
                    f"chat template output exceeds {limits.max_output_chars} characters"
                )
            out.append(chunk)
            _check_deadline()
        return "".join(out)
    finally:
        _DEADLINE.reset(token)


def validate_messages(messages: Any) -> None:
    """Roles and structure: a non-empty list of objects with a known ``role``; content a
    string, a list of text parts, or null (assistant tool calls only); a tool message
    names the call it answers."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be an object with a 'role'")
        role = m["role"]
        if role not in VALID_ROLES:
            raise ValueError(
                f"messages[{i}].role must be one of {sorted(VALID_ROLES)}, got {role!r}"
            )
        content = m.get("content")
        if content is None:
            if role != "assistant" or not m.get("tool_calls"):
                raise ValueError(f"messages[{i}].content is required")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("text", ""), str):
                    raise ValueError(f"messages[{i}].content[{j}] must be a text part")
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        if role == "tool" and m.get("tool_call_id") is not None:
            if not isinstance(m["tool_call_id"], str):
                raise ValueError(f"messages[{i}].tool_call_id must be a string")


def special_token_strings(tokenizer: Any) -> list[str]:
    """The text of every special (control) token, longest first."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False) and getattr(tok, "content", ""):
            out.add(tok.content)
    return sorted((s for s in out if s), key=len, reverse=True)


class _Escaper:
    """Replaces special-token text inside user-controlled strings by placeholders."""

    def __init__(self, specials: list[str]) -> None:
        self.nonce = secrets.token_hex(4)
        self.found: list[str] = []
        self._re = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        self.split_re = re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")

    def __call__(self, s: str) -> str:
        if self._re is None:
            return s

        def repl(m: re.Match[str]) -> str:
            self.found.append(m.group(0))
            return f"\ue000{self.nonce}:{len(self.found) - 1}\ue001"

        return self._re.sub(repl, s)

    def message(self, m: dict[str, Any]) -> dict[str, Any]:
        m = dict(m)
        for field in ("content", "reasoning_content", "reasoning", "name"):
            v = m.get(field)
            if isinstance(v, str):
                m[field] = self(v)
            elif field == "content" and isinstance(v, list):
                m[field] = [
                    {**p, "text": self(p["text"])} if isinstance(p.get("text"), str) else p
                    for p in v
                ]
        return m


def _template_context(tokenizer: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, str):
            ctx[name] = v
    ctx.update(kwargs)
    return ctx


def tokenize_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
    allow_special_tokens: bool = False,
    limits: TemplateLimits = TemplateLimits(),
    **kwargs: Any,
) -> list[int]:
    """Token ids of ``messages`` rendered with ``chat_template`` (default: the
    tokenizer's) under ``limits``; typed special tokens stay text unless
    ``allow_special_tokens``."""
    validate_messages(messages)
    source = chat_template if chat_template is not None else tokenizer.chat_template
    if not isinstance(source, str):
        raise ValueError("this model's tokenizer has no chat template")
    esc = _Escaper([] if allow_special_tokens else special_token_strings(tokenizer))
    msgs = [esc.message(m) for m in messages]
    try:  # HF's aliases of reasoning fields (reasoning / reasoning_content / thinking)
        from transformers.utils.chat_template_utils import _alias_reasoning_fields

        msgs = _alias_reasoning_fields(msgs)
    except ImportError:
        pass
    tag = f"\ue002{esc.nonce}\ue003"
    if continue_final_message:
        last = msgs[-1]
        if not isinstance(last.get("content"), str):
            raise ValueError("continue_final_message needs the last message's content as text")
        msgs[-1] = {**last, "content": last["content"] + tag}
    text = render_template(
        source,
        _template_context(tokenizer, kwargs)
        | {
            "messages": msgs,
            "tools": tools,
            "documents": documents,
            "add_generation_prompt": add_generation_prompt,
        },
        limits,
    )
    if continue_final_message:
        cut = text.rfind(tag)
        if cut < 0:
            raise ValueError("continue_final_message: the template did not render the last message")
        text = text[:cut]
    ids: list[int] = []
    pos = 0
    for m in esc.split_re.finditer(text):
        if m.start() > pos:
            ids += tokenizer.encode(text[pos : m.start()], add_special_tokens=False)
        ids += tokenizer.encode(
            esc.found[int(m.group(1))], add_special_tokens=False, split_special_tokens=True
        )
        pos = m.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:], add_special_tokens=False)
    return [int(t) for t in ids]
