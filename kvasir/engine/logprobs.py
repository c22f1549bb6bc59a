"""Engine-core logprob tuples -> user-facing ``PositionLogprobs`` dicts (client side).

The engine core sends, per position, ``[(token_id, logprob, rank), ...]`` with the
sampled (or actual prompt) token first and the top-k after it. Users get one dict per
position, token id -> ``Logprob`` with the token's text, as in vLLM.
"""

from __future__ import annotations

from typing import Any

from kvasir.core.outputs import EngineCoreOutput, TokenLogprobs
from kvasir.outputs import Logprob, PositionLogprobs


class TokenTextCache:
    """Text of single token ids (``tokenizer.decode([id])``, special tokens kept),
    memoised: a vocabulary is small and the same ids come back all the time."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._texts: dict[int, str] = {}

    def get(self, token_ids: list[int]) -> list[str | None]:
        """The text of each id; ``None`` for every id when there is no tokenizer."""
        if self._tokenizer is None:
            return [None] * len(token_ids)
        texts = self._texts
        missing = [t for t in dict.fromkeys(token_ids) if t not in texts]
        if missing:
            if self._backend is not None:
                decoded = self._backend.decode_batch(
                    [[t] for t in missing], skip_special_tokens=False
                )
            else:
                decoded = [self._tokenizer.decode([t]) for t in missing]
            texts.update(zip(missing, decoded, strict=True))
        return [texts[t] for t in token_ids]


def to_position_logprobs(entry: TokenLogprobs, texts: TokenTextCache) -> PositionLogprobs:
    """One position's tuples -> ``{token_id: Logprob}``. The sampled token comes first;
    when it is also among the top-k the dict holds it once."""
    decoded = texts.get([token_id for token_id, _, _ in entry])
    return {
        token_id: Logprob(logprob=logprob, rank=rank, decoded_token=text)
        for (token_id, logprob, rank), text in zip(entry, decoded, strict=True)
    }


def to_logprobs_list(entries: list[TokenLogprobs], texts: TokenTextCache) -> list[PositionLogprobs]:
    return [to_position_logprobs(entry, texts) for entry in entries]


def sum_sampled_logprobs(entries: list[TokenLogprobs]) -> float:
    """Sum of the sampled tokens' logprobs (the first tuple of every position)."""
    return sum(entry[0][1] for entry in entries)


class LogprobsProcessor:
    """Accumulates one sequence's sample and prompt logprobs across engine-core outputs.

    ``logprobs`` / ``cumulative_logprob`` are ``None`` unless the request asked for
    ``logprobs``; ``prompt_logprobs`` is ``None`` unless it asked for ``prompt_logprobs``
    and starts with ``None`` for the first prompt token (nothing predicts it).
    """

    def __init__(
        self, texts: TokenTextCache, num_logprobs: int | None, num_prompt_logprobs: int | None
    ) -> None:
        self._texts = texts
        self.logprobs: list[PositionLogprobs] | None = [] if num_logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if num_logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if num_prompt_logprobs is not None else None
        )

    def update_from_output(self, output: EngineCoreOutput) -> None:
        if output.new_logprobs and self.logprobs is not None:
            self.logprobs.extend(to_logprobs_list(output.new_logprobs, self._texts))
            assert self.cumulative_logprob is not None
            self.cumulative_logprob += sum_sampled_logprobs(output.new_logprobs)
        if output.new_prompt_logprobs and self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(to_logprobs_list(output.new_prompt_logprobs, self._texts))
