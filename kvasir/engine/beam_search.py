"""Beam search over the engine, one token per step (``LLM.beam_search``, ``use_beam_search``).

The search itself is plain Python over the top-k logprobs of each live beam: each step
submits every beam as a prompt for one token with ``logprobs=k``. The beams of one
prompt share their KV through the prefix cache: the full blocks of a common prefix are
the same blocks in the block pool, held by reference count by every beam that extends
them, and a beam that diverges inside a block gets a fresh block for its tail (copy on
write, by recomputing at most one block of tokens); finished requests give their blocks
back, so nothing is left allocated when the search ends. (With prefix caching off the
result is the same, only slower: every step recomputes each beam's prefix.)

Selection follows HF transformers' ``generate(num_beams=k, do_sample=False)`` with its
default ``early_stopping=False``: per step the best ``max(2, 1 + num_eos) * k``
continuations over all beams; the first ``k`` of them that end (EOS, or the token
limit) become finished hypotheses scored ``cum_logprob / num_generated ** length_penalty``;
the best ``k`` that do not end are the next beams; the search stops when no beam
is left, or when all ``k`` hypothesis slots are full and the best beam's score, at its
current length, cannot beat the worst of them. (vLLM's own beam search ranks by a
length over prompt + output; HF's is the reference we test against.)
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from kvasir.sampling_params import SamplingParams

# Per beam to extend: (token id, logprob) of its best next tokens, most likely first.
TopLogprobs = list[tuple[int, float]]
MAX_TOP_LOGPROBS = 20


@dataclass
class BeamSearchParams:
    """vLLM's ``BeamSearchParams``. ``temperature`` is accepted for compatibility: beams
    are ranked by the model's raw logprobs."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")


@dataclass
class BeamSearchSequence:
    """One hypothesis: ``tokens`` are prompt + generated ids (as in vLLM)."""

    tokens: list[int]
    num_prompt_tokens: int
    cum_logprob: float
    score: float  # cum_logprob / num_generated ** length_penalty
    finish_reason: str  # "stop" (EOS) | "length"
    logprobs: list[float] = field(default_factory=list)  # per generated token
    text: str | None = None  # the generated text (set by the caller)

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first, at most beam_width


@dataclass
class _Beam:
    tokens: list[int]  # generated so far
    logprobs: list[float]
    score: float  # cumulative logprob


class BeamSearch:
    """The search state of one prompt. ``pending()`` are the beams to extend next;
    ``advance(tops)`` takes each one's top logprobs (same order); ``done`` says when
    to stop; ``result()`` the hypotheses."""

    def __init__(
        self,
        prompt_token_ids: list[int],
        params: BeamSearchParams,
        eos_token_ids: Sequence[int],
        max_model_len: int,
    ) -> None:
        self.prompt = list(prompt_token_ids)
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.width = params.beam_width
        self.num_candidates = max(2, 1 + len(self.eos)) * self.width
        self.max_new = min(params.max_tokens, max_model_len - len(self.prompt))
        if self.max_new < 1:
            raise ValueError(
                f"prompt of {len(self.prompt)} tokens leaves no room to generate within "
                f"max_model_len ({max_model_len})"
            )
        self.beams = [_Beam([], [], 0.0)]
        self.finished: list[tuple[float, int, _Beam, str]] = []  # (score, seq, beam, reason)
        self._seq = 0
        self.num_generated = 0
        self.done = False
        self.improvable = True

    def pending(self) -> list[list[int]]:
        return [self.prompt + b.tokens for b in self.beams]

    def advance(self, tops: list[TopLogprobs]) -> None:
        assert not self.done and len(tops) == len(self.beams)
        cands = [
            (beam.score + lp, i, tok, lp)
            for i, (beam, top) in enumerate(zip(self.beams, tops, strict=True))
            for tok, lp in top
        ]
        # Best first; ties go to the lower beam index, then the lower token id (HF's
        # topk over the flattened beams x vocabulary).
        cands = heapq.nsmallest(self.num_candidates, cands, key=lambda c: (-c[0], c[1], c[2]))
        new_len = self.num_generated + 1
        at_limit = new_len >= self.max_new
        running: list[_Beam] = []
        lp_norm = new_len**self.params.length_penalty
        all_end = True
        for rank, (score, i, tok, lp) in enumerate(cands):
            parent = self.beams[i]
            ends = at_limit or tok in self.eos
            all_end &= ends
            if ends:
                if rank < self.width and self.improvable:
                    beam = _Beam(parent.tokens + [tok], parent.logprobs + [lp], score)
                    reason = "stop" if tok in self.eos else "length"
                    self._add_finished(score / lp_norm, beam, reason)
            elif len(running) < self.width:
                running.append(_Beam(parent.tokens + [tok], parent.logprobs + [lp], score))
        self.num_generated = new_len
        self.beams = running
        if running and len(self.finished) == self.width:
            best = running[0].score / new_len**self.params.length_penalty
            if best <= min(f[0] for f in self.finished):
                self.improvable = False
        self.done = all_end or not running or not self.improvable

    def _add_finished(self, score: float, beam: _Beam, reason: str) -> None:
        self.finished.append((score, self._seq, beam, reason))
        self._seq += 1
        self.finished.sort(key=lambda f: (-f[0], f[1]))
        del self.finished[self.width :]

    def result(self) -> BeamSearchOutput:
        n = len(self.prompt)
        return BeamSearchOutput(
            [
                BeamSearchSequence(
                    tokens=self.prompt + beam.tokens,
                    num_prompt_tokens=n,
                    cum_logprob=beam.score,
                    score=score,
                    finish_reason=reason,
                    logprobs=beam.logprobs,
                )
                for score, _, beam, reason in self.finished
            ]
        )


def step_params(search: BeamSearch) -> SamplingParams:
    """The one-token request that extends a beam: its top logprobs are the candidates."""
    if search.num_candidates > MAX_TOP_LOGPROBS:
        raise ValueError(
            f"beam_width is too large: {search.width} beams need the top "
            f"{search.num_candidates} logprobs per step, at most {MAX_TOP_LOGPROBS}"
        )
    return SamplingParams(
        temperature=0.0, max_tokens=1, logprobs=search.num_candidates, ignore_eos=True
    )


def run_beam_search(
    searches: list[BeamSearch],
    generate: Callable[[list[list[int]], SamplingParams], list[TopLogprobs]],
) -> list[BeamSearchOutput]:
    """Step all searches together: one batch of one-token requests per step."""
    while True:
        live = [s for s in searches if not s.done]
        if not live:
            return [s.result() for s in searches]
        prompts, owners = _batch(live)
        tops = generate(prompts, step_params(max(live, key=lambda s: s.num_candidates)))
        _dispatch(live, owners, tops)


async def run_beam_search_async(
    searches: list[BeamSearch],
    generate: Callable[[list[list[int]], SamplingParams], Awaitable[list[TopLogprobs]]],
) -> list[BeamSearchOutput]:
    while True:
        live = [s for s in searches if not s.done]
        if not live:
            return [s.result() for s in searches]
        prompts, owners = _batch(live)
        tops = await generate(prompts, step_params(max(live, key=lambda s: s.num_candidates)))
        _dispatch(live, owners, tops)


def _batch(live: list[BeamSearch]) -> tuple[list[list[int]], list[int]]:
    prompts: list[list[int]] = []
    owners: list[int] = []
    for j, s in enumerate(live):
        p = s.pending()
        prompts += p
        owners += [j] * len(p)
    return prompts, owners


def _dispatch(live: list[BeamSearch], owners: list[int], tops: list[TopLogprobs]) -> None:
    per: list[list[TopLogprobs]] = [[] for _ in live]
    for j, top in zip(owners, tops, strict=True):
        per[j].append(top[: live[j].num_candidates])
    for s, t in zip(live, per, strict=True):
        s.advance(t)


def top_logprobs_of(position: dict, k: int) -> TopLogprobs:
    """The k most likely (token id, logprob) of one output position's ``Logprob`` dict."""
    items = sorted(position.items(), key=lambda kv: (kv[1].rank, kv[0]))
    return [(int(t), float(lp.logprob)) for t, lp in items[:k]]
