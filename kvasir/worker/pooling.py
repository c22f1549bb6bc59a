"""Embedding requests in the model runner: pool the final hidden states of a prompt's
positions (across prefill chunks) instead of sampling a token.

Only steps that hold an embedding request come here (``InputBatch.num_pooling``); the
rows of the step that finish their prompt get their pooled vector, truncated to
``dimensions`` and L2-normalised as their ``PoolingParams`` say, and are taken out of
the rows that sample.
"""

from __future__ import annotations

import numpy as np
import torch

from kvasir.worker.input_buffers import StepInputs


def pool_step(
    step: StepInputs, hidden: torch.Tensor, sample_idx: np.ndarray
) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """``hidden``: [num_tokens, hidden_size] of the step's flat batch. Returns the
    sample indices without the embedding rows, and request id -> pooled [dims] float32
    for the requests whose prompt ends in this step."""
    pooled: dict[str, torch.Tensor] = {}
    is_pooling = np.zeros(len(step.states), dtype=bool)
    for i, st in enumerate(step.states):
        pp = st.pooling_params
        if pp is None:
            continue
        is_pooling[i] = True
        start, n = int(step.query_start_loc[i]), int(step.num_scheduled[i])
        h = hidden[start : start + n].float()  # [n, hidden]
        if pp.needs_all_positions:
            part = h.sum(dim=0)
            st.pool_sum = part if st.pool_sum is None else st.pool_sum + part
        if int(step.num_computed[i]) + n < st.num_prompt_tokens:
            continue  # a prefill chunk short of the end
        if pp.needs_all_positions:
            assert st.pool_sum is not None
            vec = st.pool_sum / st.num_prompt_tokens
        else:
            vec = h[-1]
        if pp.dimensions is not None:
            vec = vec[: pp.dimensions]
        if pp.normalize:
            vec = torch.nn.functional.normalize(vec, p=2.0, dim=0)
        pooled[st.req_id] = vec
        st.pool_sum = None
    keep = sample_idx[~is_pooling[sample_idx]]
    return keep, pooled
