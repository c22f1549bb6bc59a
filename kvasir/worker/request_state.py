"""What the model runner remembers about each request between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvasir.pooling_params import PoolingParams
from kvasir.sampling_params import SamplingParams


@dataclass(eq=False)
class CachedRequestState:
    """The runner's handle on a request; its token ids and block table live in its row
    of the persistent ``InputBatch`` (``row``; -1 while it is not in the batch).

    Kept across preemption (the generator must continue where it stopped, so a seeded
    request samples the same tokens whether or not it was preempted); dropped when the
    scheduler reports the request finished. A resumed request gets a *new* state object
    (same generator), so work still in flight for the old one can tell it is stale.
    """

    req_id: str
    sampling_params: SamplingParams
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    # EOS / stop token ids masked while fewer than min_tokens are out (min_tokens only).
    min_tokens_stop_ids: list[int] = field(default_factory=list)
    # Prompt positions whose logprobs were already produced (prompt_logprobs only).
    prompt_logprobs_done: int = 0
    # Embedding requests: how to pool, and the running sum of hidden states (MEAN).
    pooling_params: PoolingParams | None = None
    pool_sum: torch.Tensor | None = None
    row: int = -1
    state_slot: int = -1  # state-space layers: this request's state slot
    lora_id: int = 0  # its LoRA adapter (0: the base model)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return (
            self.sampling_params.prompt_logprobs is not None
            and self.prompt_logprobs_done < self.num_prompt_tokens - 1
        )
