"""The batched LoRA products, per token: shrink ``s = x A[slot]^T`` and expand
``y += s B[slot]^T``, with a slot index per token (-1: the base model, no delta).

Two ways to find each token's adapter, as in Punica / S-LoRA:

* BGMV (gather): every token reads its own slot; for decode steps (one token per
  request) and for CUDA graphs (the index lives in a persistent buffer);
* SGMV (segmented): runs of consecutive tokens with the same slot (a prefill chunk)
  share one weight tile; segment starts and slots are per step.

The plain-torch functions here are the references the Triton kernels
(``kvasir.kernels.lora``) are tested against, and the CPU path: ``segmented_delta``
loops over the (at most ``max_loras``) slots present in the step.
"""

from __future__ import annotations

import torch


def bgmv_shrink_ref(
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, K, in]
    token_slots: torch.Tensor,  # [num_tokens] int, -1: none
) -> torch.Tensor:  # [num_tokens, K] float32; zero rows for -1
    valid = token_slots >= 0
    a = lora_a[token_slots.clamp(min=0).long()].float()  # [num_tokens, K, in]
    out = torch.einsum("ti,tki->tk", x.float(), a)
    return out * valid.unsqueeze(1)


def bgmv_expand_ref(
    s: torch.Tensor,  # [num_tokens, K]
    lora_b: torch.Tensor,  # [num_slots, N, K]
    token_slots: torch.Tensor,  # [num_tokens]
    y: torch.Tensor,  # [num_tokens, N], added into
) -> torch.Tensor:
    valid = token_slots >= 0
    b = lora_b[token_slots.clamp(min=0).long()].float()  # [num_tokens, N, K]
    delta = torch.einsum("tk,tnk->tn", s.float(), b) * valid.unsqueeze(1)
    y += delta.to(y.dtype)
    return y


def sgmv_shrink_ref(
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, K, in]
    seg_starts: list[int],  # [num_segments + 1] token offsets (empty segments allowed)
    seg_slots: list[int],  # [num_segments] slot per segment, -1: none
) -> torch.Tensor:  # [num_tokens, K] float32
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for i, slot in enumerate(seg_slots):
        lo, hi = seg_starts[i], seg_starts[i + 1]
        if slot >= 0 and hi > lo:
            out[lo:hi] = x[lo:hi].float() @ lora_a[slot].float().T
    return out


def sgmv_expand_ref(
    s: torch.Tensor,  # [num_tokens, K]
    lora_b: torch.Tensor,  # [num_slots, N, K]
    seg_starts: list[int],
    seg_slots: list[int],
    y: torch.Tensor,  # [num_tokens, N], added into
) -> torch.Tensor:
    for i, slot in enumerate(seg_slots):
        lo, hi = seg_starts[i], seg_starts[i + 1]
        if slot >= 0 and hi > lo:
            y[lo:hi] += (s[lo:hi].float() @ lora_b[slot].float().T).to(y.dtype)
    return y


class PaddedGroups:
    """A step's tokens grouped by slot and padded to the largest group, for the CPU's
    batched path: ``rows [G * M]`` token rows (padding repeats row 0), ``mask [G * M, 1]``
    (0 on padding), ``slots [G]``."""

    def __init__(self, token_slots: list[int] | torch.Tensor, slots: list[int]) -> None:
        ts = torch.as_tensor(token_slots)
        groups = [torch.nonzero(ts == s).flatten() for s in slots]
        m = max(len(g) for g in groups)
        rows = torch.zeros(len(groups), m, dtype=torch.int64)
        mask = torch.zeros(len(groups), m, 1)
        for i, g in enumerate(groups):
            rows[i, : len(g)] = g
            mask[i, : len(g)] = 1.0
        self.rows = rows.flatten()
        self.mask = mask.flatten(0, 1)
        self.slots = torch.tensor(slots, dtype=torch.int64)
        self.num_groups, self.max_len = len(groups), m
        # Every slot, in order: the slot buffers are used as they are (no gather).
        self.all_slots = slots == list(range(len(slots)))


def batched_delta(
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, K, in]
    lora_b: torch.Tensor,  # [num_slots, N, K]
    groups: PaddedGroups,
    y: torch.Tensor,  # [num_tokens, N], added into
) -> torch.Tensor:
    """The CPU path for many slots in one step: two batched products over the padded
    groups instead of two products per slot (the op count no longer grows with it)."""
    g, m = groups.num_groups, groups.max_len
    xs = x.index_select(0, groups.rows).view(g, m, -1)  # [G, M, in]
    if groups.all_slots and g == lora_a.shape[0]:
        a, b = lora_a, lora_b
    else:
        a = lora_a.index_select(0, groups.slots)  # [G, K, in]
        b = lora_b.index_select(0, groups.slots)  # [G, N, K]
    s = torch.bmm(xs, a.transpose(1, 2))  # [G, M, K]
    d = torch.bmm(s, b.transpose(1, 2)).view(g * m, -1)  # [G * M, N]
    y.index_add_(0, groups.rows, d * groups.mask.to(d.dtype))
    return y


def segmented_delta(
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, K, in]
    lora_b: torch.Tensor,  # [num_slots, N, K]
    slot_indices: list[tuple[int, torch.Tensor | None]],  # (slot, token rows or None: all)
    y: torch.Tensor,  # [num_tokens, N], added into
) -> torch.Tensor:
    """The CPU path: for each slot in the step, shrink and expand its tokens' rows (in
    the model's dtype; float32 on the CPU)."""
    for slot, rows in slot_indices:
        if rows is None:
            y.addmm_(x @ lora_a[slot].T, lora_b[slot].T)
        else:
            xs = x.index_select(0, rows)  # [rows, in]
            y.index_add_(0, rows, (xs @ lora_a[slot].T) @ lora_b[slot].T)
    return y
