"""What the model runner remembers about each request between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvasir.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    """The runner's copy of a request: token ids, block table and sampling state.

    Kept across preemption (the generator must continue where it stopped, so a seeded
    request samples the same tokens whether or not it was preempted); dropped when the
    scheduler reports the request finished.
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None = None
    # Prompt positions whose logprobs were already produced (prompt_logprobs only).
    prompt_logprobs_done: int = 0
    all_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
