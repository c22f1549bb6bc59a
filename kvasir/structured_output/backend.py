"""The xgrammar backend: grammar construction (validation), compilation, matchers."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from kvasir.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar as xgr


def _choice_ebnf(choices: list[str]) -> str:
    # Each choice is a JSON string literal: a valid EBNF string with escapes.
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def grammar_of(params: StructuredOutputsParams) -> xgr.Grammar:
    """The xgrammar ``Grammar`` of a constraint (parsing, no tokenizer). Raises
    ``ValueError`` naming ``structured_outputs.<field>`` when it does not parse."""
    import xgrammar as xgr

    kind = params.kind
    try:
        if kind == "json":
            assert params.json is not None
            text = params.json if isinstance(params.json, str) else json.dumps(params.json)
            schema = json.loads(text)
            if not isinstance(schema, dict) and not isinstance(schema, bool):
                raise ValueError("a JSON schema must be an object")
            return xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if kind == "regex":
            assert params.regex is not None
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            assert params.choice is not None
            return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice))
        assert params.grammar is not None
        return xgr.Grammar.from_ebnf(params.grammar)
    except (RuntimeError, ValueError, json.JSONDecodeError) as e:
        msg = str(e).strip().splitlines()
        # xgrammar prefixes "[hh:mm:ss] /path/file.cc:line: ": keep what follows.
        text = msg[0].split(": ", 1)[-1] if msg and msg[0].startswith("[") else " ".join(msg)
        raise ValueError(f"structured_outputs.{kind} is invalid: {text}") from None


def validate(params: StructuredOutputsParams) -> None:
    """Raise ``ValueError`` naming the field if the schema, regex or grammar does not
    parse. Cheap (no tokenizer, no token-level compilation)."""
    grammar_of(params)


class XgrammarBackend:
    """One tokenizer's compiler. ``compile`` is thread-safe and cached by xgrammar (by
    grammar text) and by us (by kind and spec), so a schema compiles once."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], xgr.CompiledGrammar] = {}

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        key = (params.kind, json.dumps(params.spec, sort_keys=True))
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        compiled = self.compiler.compile_grammar(grammar_of(params))
        with self._lock:
            self._cache[key] = compiled
        return compiled

    def matcher(self, compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)
