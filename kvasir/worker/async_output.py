"""The result of a launched step, read back from the device only when asked for.

``ModelRunner.execute_model_async`` queues a step on the device and returns one of
these at once: the sampled token ids (and logprobs) are being copied into pinned host
memory behind the step's kernels, and a CUDA event marks when they have landed. The
engine core asks for the output one step later, after launching the next step, so
the host's bookkeeping of step N overlaps the device's work on step N + 1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kvasir.core.outputs import ModelRunnerOutput, TokenLogprobs
from kvasir.layers.sampler import LogprobsTensors
from kvasir.worker.request_state import CachedRequestState


class AsyncModelRunnerOutput:
    """One launched step. ``get_output()`` waits for it (once) and returns the
    ``ModelRunnerOutput``; steps of one runner are read back in launch order (asking
    for a later one first reads back the earlier ones)."""

    def __init__(
        self,
        req_ids: list[str],
        sample_indices: np.ndarray,  # [S] batch index of each sampled row
        sampled_states: list[CachedRequestState],  # [S]
        sampled_token_ids: torch.Tensor,  # [S] int64, host (pinned) or still filling
        logprobs: LogprobsTensors | None,  # host tensors, rows as sampled_token_ids
        prompt_logprobs: dict[str, list[TokenLogprobs]],
        event: torch.cuda.Event | None,
        on_ready: Callable[[AsyncModelRunnerOutput], None],
    ) -> None:
        self.req_ids = req_ids
        self.sample_indices = sample_indices
        self.sampled_states = sampled_states
        self.sampled_token_ids = sampled_token_ids
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.event = event
        self._on_ready = on_ready
        self._output: ModelRunnerOutput | None = None
        self.token_ids_np: np.ndarray | None = None
        self.pooled: dict[str, torch.Tensor] = {}  # embedding requests done this step

    @classmethod
    def completed(cls, output: ModelRunnerOutput) -> AsyncModelRunnerOutput:
        """A step whose output is already on the host (speculative decoding)."""
        handle = cls(
            output.req_ids, np.zeros(0, dtype=np.int64), [], torch.empty(0, dtype=torch.int64),
            None, output.prompt_logprobs, None, lambda _: None,
        )  # fmt: skip
        handle._output = output
        return handle

    @property
    def ready(self) -> bool:
        return self._output is not None

    def get_output(self) -> ModelRunnerOutput:
        if self._output is None:
            self._on_ready(self)  # the runner reads back older steps first, then this
        assert self._output is not None
        return self._output

    def materialize(self) -> np.ndarray:
        """Wait for the step and build its output; returns the sampled ids [S]."""
        if self.event is not None:
            self.event.synchronize()
        tokens_np = self.sampled_token_ids.numpy()
        tokens = tokens_np.tolist()
        n, num_sampled = len(self.req_ids), len(tokens)
        if num_sampled == n:
            sampled = [[t] for t in tokens]
        else:
            sampled = [[] for _ in range(n)]
            for j, i in enumerate(self.sample_indices.tolist()):
                sampled[i] = [tokens[j]]
        logprobs: dict[str, list[TokenLogprobs]] = {}
        if self.logprobs is not None:
            lp_lists = logprobs_to_lists(self.logprobs)
            for j, st in enumerate(self.sampled_states):
                k = st.sampling_params.logprobs
                if k is not None:
                    logprobs[st.req_id] = [lp_lists[j][: k + 1]]
        self._output = ModelRunnerOutput(
            req_ids=self.req_ids,
            sampled_token_ids=sampled,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            pooled_outputs={rid: v.tolist() for rid, v in self.pooled.items()},
        )
        # Drop the device-side references; the host copies are all that is needed now.
        self.event = None
        self.logprobs = None
        return tokens_np


def logprobs_to_lists(lp: LogprobsTensors) -> list[TokenLogprobs]:
    """Per position: [(sampled or actual token, logprob, rank), (top-1, lp, 1), ...]."""
    ids = lp.logprob_token_ids.tolist()
    vals = lp.logprobs.tolist()
    ranks = lp.selected_token_ranks.tolist()
    out: list[TokenLogprobs] = []
    for row_ids, row_vals, rank in zip(ids, vals, ranks, strict=True):
        entry = [(row_ids[0], row_vals[0], int(rank))]
        entry += [
            (t, v, r + 1) for r, (t, v) in enumerate(zip(row_ids[1:], row_vals[1:], strict=True))
        ]
        out.append(entry)
    return out
