"""The worker's side: a step's rows of the grammar bitmask, applied in the sampler."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvasir.core.outputs import SchedulerOutput


def rows_bitmask(
    so: SchedulerOutput,
    row_req_ids: Sequence[str],
    vocab_size: int,
    device: torch.device,
    row_offsets: Sequence[int] | None = None,
) -> torch.Tensor | None:
    """The bitmask rows of a batch of logits: row ``i`` belongs to ``row_req_ids[i]``
    at draft position ``row_offsets[i]`` (0 without speculative decoding). Unconstrained
    rows hold -1 (every bit set). None when no row is constrained.

    Returns [len(row_req_ids), ceil(vocab_size / 32)] int32 on ``device``.
    """
    first_rows = so.structured_output_request_ids
    if not first_rows or so.grammar_bitmask is None:
        return None
    num_words = (vocab_size + 31) // 32
    step_mask = np.frombuffer(so.grammar_bitmask, dtype=np.int32).reshape(-1, num_words)
    src: list[int] = []
    dst: list[int] = []
    for i, rid in enumerate(row_req_ids):
        first = first_rows.get(rid)
        if first is not None:
            src.append(first + (row_offsets[i] if row_offsets is not None else 0))
            dst.append(i)
    if not dst:
        return None
    out = np.full((len(row_req_ids), num_words), -1, dtype=np.int32)
    out[dst] = step_mask[src]
    return torch.from_numpy(out).to(device, non_blocking=True)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Logits with the tokens a row's bitmask forbids set to -inf, in one batched call
    (xgrammar's kernel for the device). Returns a new tensor; ``logits`` is unchanged.

    logits: [B, V] float32; bitmask: [B, ceil(V / 32)] int32 (bit set = allowed).
    """
    import xgrammar as xgr

    out = logits.clone()
    xgr.apply_token_bitmask_inplace(out, bitmask.to(out.device), vocab_size=out.shape[-1])
    return out
