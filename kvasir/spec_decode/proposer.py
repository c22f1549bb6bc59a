"""The proposer interface: what the runner asks of a draft source after each step.

A proposer runs once per step, after the step's sampled tokens are known on the host,
for the requests that sampled. It returns up to ``max_drafts[i]`` draft tokens per
request for the next step to verify and, when its drafts were sampled from a
distribution (a draft model with a random request), that distribution ``q`` so the
verification stays lossless. Model-based proposers may own KV caches (laid out on the
target's block table: same block ids, their own tensors) and write KV past the step's
tokens (``num_lookahead_tokens`` slots, which the scheduler keeps allocated).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvasir.core.kv_cache_spec import KVCacheSpec
from kvasir.layers.sampler import argmax_rows, compute_probs, exponential_race

if TYPE_CHECKING:
    from kvasir.layers.sampler import SamplingMetadata
    from kvasir.worker.input_buffers import StepInputs
    from kvasir.worker.model_runner import ModelRunner
    from kvasir.worker.request_state import CachedRequestState


@dataclass
class ProposeInputs:
    """One step, after verification, seen from the requests that sampled in it.

    ``sample_idx[i]`` is request i's index in ``step``; its known tokens (sampled ones
    included) are ``runner.input_batch.token_ids[rows[i], :num_tokens[i]]`` and the
    target computed KV for the first ``num_tokens[i] - 1`` of them.
    ``num_new_tokens[i]`` of its known tokens are new this step (accepted drafts plus
    the one sampled token); ``hidden_states`` are the target's final hidden states of
    the step's flat batch (for proposers that read them: EAGLE, Medusa).
    """

    runner: ModelRunner
    step: StepInputs
    hidden_states: torch.Tensor | None  # [step.num_tokens, hidden]
    sample_idx: np.ndarray  # [S] index into the step's requests
    states: list[CachedRequestState]  # [S]
    rows: np.ndarray  # [S] InputBatch rows
    num_tokens: np.ndarray  # [S] known tokens after this step
    num_new_tokens: np.ndarray  # [S]
    max_drafts: np.ndarray  # [S] the most drafts each may get (0: none)
    sampling_metadata: SamplingMetadata  # of the S requests, one row each


@dataclass
class Proposal:
    drafts: np.ndarray  # [S, k] int64, padded with -1
    num_drafts: np.ndarray  # [S] int64
    # [S, k, V] float32: the distribution each draft was sampled from (rows of greedy
    # requests and of padding are unused); None: drafts are point masses (n-gram) or
    # every request is greedy.
    draft_probs: torch.Tensor | None = None


class Proposer(ABC):
    """A source of draft tokens; one per runner."""

    # KV slots past a sampling step's tokens that ``propose`` writes.
    num_lookahead_tokens: int = 0
    name: str = ""
    # True: ``ProposeInputs.hidden_states`` must be the target's (the runner then runs
    # decode-only steps without the decode CUDA graphs, which return logits only).
    needs_hidden_states: bool = False

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """Specs of the caches the proposer needs beside the target's (one block table)."""
        return []

    def bind_kv_caches(self, caches: list[torch.Tensor]) -> None:
        """The caches of ``kv_cache_specs()``, allocated with the target's."""
        self.kv_caches = caches

    def capture_graphs(self, sizes: list[int], pool, stream) -> None:  # type: ignore[no-untyped-def]  # noqa: B027
        """Capture the proposer's own CUDA graphs (decode batch ``sizes``) with the
        target's, in its graph pool and capture stream. Default: none."""

    def remove(self, req_id: str) -> None:  # noqa: B027 - most proposers keep no state
        """The request finished: drop what the proposer keeps for it."""

    @abstractmethod
    def propose(self, inputs: ProposeInputs) -> Proposal: ...


# ---------------------------------------------------------------- shared by drafting models
def draw(logits: torch.Tensor, md: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy rows: the argmax; random rows: a sample from the draft's distribution
    under the request's temperature and filters, which is returned [S, V]."""
    logits = logits.float()
    greedy = argmax_rows(logits)
    if md.all_greedy:
        return greedy, None
    q = compute_probs(logits, md)
    sampled = exponential_race(q, md.generators)
    return torch.where(md.temperature < 1e-5, greedy, sampled), q


def subset_metadata(md: SamplingMetadata, idx: np.ndarray) -> SamplingMetadata:
    """The sampling metadata of requests ``idx`` (of the S proposing ones)."""
    if md.all_greedy:
        return md
    t = torch.from_numpy(idx).to(md.temperature.device)
    gens = {j: md.generators[int(i)] for j, i in enumerate(idx.tolist()) if int(i) in md.generators}
    return replace(
        md,
        temperature=md.temperature.index_select(0, t),
        top_k=None if md.top_k is None else md.top_k.index_select(0, t),
        top_p=None if md.top_p is None else md.top_p.index_select(0, t),
        min_p=None if md.min_p is None else md.min_p.index_select(0, t),
        generators=gens,
    )


def stack_probs(steps: list[torch.Tensor], md: SamplingMetadata, k: int) -> torch.Tensor | None:
    """[S, k, V] of the per-draft distributions, zero-padded to k (None: all greedy)."""
    if not steps or md.all_greedy:
        return None
    probs = torch.stack(steps, dim=1)
    if probs.shape[1] < k:
        probs = torch.nn.functional.pad(probs, (0, 0, 0, k - probs.shape[1]))
    return probs
