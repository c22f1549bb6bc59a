"""Per-request sampling parameters, validated at the edge (vLLM names and defaults)."""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MAX_LOGPROBS = 20


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries all text/tokens so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's ``StructuredOutputsParams``): exactly
    one of a JSON schema (``json``, a dict or its JSON text), any JSON object
    (``json_object``), a regular expression, a list of choices, or an EBNF/GBNF
    ``grammar``. Enforced by ``kvasir.structured_output`` (xgrammar) in the engine.

    ``json`` is kept as JSON text (the grammar cache's key; property order is kept, as
    it is the order the object is generated in).
    Whether the schema, regex or grammar compiles is checked by the input processor
    (``kvasir.structured_output.validate``), not here: this layer imports no backend.
    """

    json: str | dict[str, Any] | None = None  # kept as str after __post_init__
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, str):
            try:
                self.json = json.dumps(self.json)  # key order kept: it is the output's
            except (TypeError, ValueError) as e:
                raise ValueError(f"structured_outputs.json must be a JSON schema: {e}") from None
        kinds = self.kinds()
        if len(kinds) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, json_object, regex, "
                f"choice, grammar; got {kinds or 'none'}"
            )
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or any(not isinstance(c, str) for c in self.choice)
        ):
            raise ValueError(
                f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}"
            )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")

    def kinds(self) -> list[str]:
        names = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        return names + (["json_object"] if self.json_object else [])

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    @property
    def spec(self) -> Any:
        return True if self.kind == "json_object" else getattr(self, self.kind)


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature == 0`` means greedy.

    Raises ``ValueError`` naming the parameter and its allowed range on bad input.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives besides the sampled token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Sampling extras (OpenAI / vLLM). logit_bias: token id -> bias added to its logit,
    # in [-100, 100]; allowed_token_ids: only these may be sampled; bad_words: words
    # never generated (a multi-token word is cut at its last token once its prefix is
    # out). bad_words_token_ids is filled from bad_words by the input processor.
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    # best_of >= n candidates are sampled; the n with the highest cumulative logprob
    # are returned.
    best_of: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = _token_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, allowed: str, value: object) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {value!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1", self.n)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "in (0, 2]", self.repetition_penalty)
        if self.temperature < 0.0:
            raise bad("temperature", ">= 0", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or self.top_k < -1 or self.top_k == 0:
            raise bad("top_k", "-1 (disabled) or an integer >= 1", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]", self.min_p)
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer", self.seed)
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", "an integer >= 1", self.max_tokens)
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and not 0 <= self.logprobs <= _MAX_LOGPROBS:
            raise bad("logprobs", f"in [0, {_MAX_LOGPROBS}]", self.logprobs)
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= _MAX_LOGPROBS:
            raise bad("prompt_logprobs", f"in [0, {_MAX_LOGPROBS}]", self.prompt_logprobs)
        assert isinstance(self.stop, list)
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "a list of non-empty strings", self.stop)
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids or []):
            raise bad("stop_token_ids", "a list of non-negative integers", self.stop_token_ids)
        self._validate_extras(bad)

    def _validate_extras(self, bad: Callable[[str, str, object], ValueError]) -> None:
        for t, b in (self.logit_bias or {}).items():
            if t < 0:
                raise bad("logit_bias", "keyed by non-negative token ids", t)
            if not -100.0 <= b <= 100.0:
                raise bad("logit_bias", f"values in [-100, 100] (token {t})", b)
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids or any(_not_token_id(t) for t in self.allowed_token_ids)
        ):
            raise bad(
                "allowed_token_ids", "a non-empty list of non-negative integers",
                self.allowed_token_ids,
            )  # fmt: skip
        if self.bad_words is not None and any(
            not isinstance(w, str) or not w.strip() for w in self.bad_words
        ):
            raise bad("bad_words", "a list of non-empty strings", self.bad_words)
        if self.best_of is not None:
            if not isinstance(self.best_of, int) or self.best_of < self.n:
                raise bad("best_of", f"an integer >= n ({self.n})", self.best_of)
            if self.best_of > self.n and self.output_kind == RequestOutputKind.DELTA:
                raise bad("best_of", f"== n ({self.n}) when streaming", self.best_of)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def num_candidates(self) -> int:
        """Sequences to sample: best_of when set, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def has_token_masks(self) -> bool:
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids)

    def clone(self) -> SamplingParams:
        import copy

        return copy.deepcopy(self)


def _not_token_id(t: object) -> bool:
    return isinstance(t, bool) or not isinstance(t, int) or t < 0


def _token_bias(bias: dict) -> dict[int, float]:
    """``{token id: bias}``; keys may be strings of integers (the OpenAI API's JSON)."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a map of token id -> bias, got {bias!r}")
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            t = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids (integers), got {k!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"logit_bias values must be numbers, got {v!r}")
        out[t] = float(v)
    return out
