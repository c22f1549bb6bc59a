"""Shared builders for the kernel tests: a random paged KV cache and a varlen batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvasir.attention.backend import AttentionMetadata
from kvasir.attention.torch_backend import TorchAttentionMetadata

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN in out gives NaN, which fails any bound)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]: this step's keys
    value: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    metadata: AttentionMetadata


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device = DEVICE,
    seed: int = 0,
    write_current: bool = True,
    pad_tokens: int = 0,
) -> PagedBatch:
    """Random varlen batch over a paged cache whose blocks are scattered at random.

    Cached prefixes (the first ``seq_len - q_len`` tokens) hold random K/V; unused blocks
    and slots hold NaN, so a kernel that reads outside a request's tokens fails loudly.
    With ``write_current`` the step's own K/V are in the cache too (as after the cache
    write). ``pad_tokens`` appends rows with slot -1 (CUDA-graph padding). The metadata
    carries the torch backend's derived fields too, so either backend takes it.
    """
    g = torch.Generator().manual_seed(seed)
    num_reqs = len(q_lens)
    blocks_per_req = [(s + block_size - 1) // block_size for s in seq_lens]
    max_blocks = max(blocks_per_req + [1]) + 1
    num_blocks = sum(blocks_per_req) + 3
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.zeros(num_reqs, max_blocks, dtype=torch.int32)
    used = 0
    for r, nb in enumerate(blocks_per_req):
        block_table[r, :nb] = perm[used : used + nb].int()
        block_table[r, nb:] = perm[-1].int()  # a NaN block past the end
        used += nb
    num_tokens = sum(q_lens)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=g)
    query = torch.randn(num_tokens + pad_tokens, num_heads, head_dim, generator=g)
    key = torch.randn(num_tokens + pad_tokens, num_kv_heads, head_dim, generator=g)
    value = torch.randn(num_tokens + pad_tokens, num_kv_heads, head_dim, generator=g)
    valid = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    slots = []
    for r, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        pos = torch.arange(seq_len)
        req_slots = block_table[r, pos // block_size].long() * block_size + pos % block_size
        valid[req_slots] = True
        slots.append(req_slots[seq_len - q_len :])
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[:, ~valid] = float("nan")
    slot_mapping = torch.full((num_tokens + pad_tokens,), -1, dtype=torch.int64)
    slot_mapping[:num_tokens] = torch.cat(slots) if slots else slot_mapping[:0]
    if write_current:
        flat[0, slot_mapping[:num_tokens]] = key[:num_tokens]
        flat[1, slot_mapping[:num_tokens]] = value[:num_tokens]
    else:
        flat[:, slot_mapping[:num_tokens]] = float("nan")
    qsl = torch.zeros(num_reqs + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    common = AttentionMetadata(
        num_reqs=num_reqs,
        num_actual_tokens=num_tokens,
        max_query_len=max(q_lens + [0]),
        max_seq_len=max(seq_lens + [0]),
        query_start_loc=qsl.to(device),
        seq_lens=sl.to(device),
        block_table=block_table.to(device),
        slot_mapping=slot_mapping.to(device),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=sl,
    )
    metadata = TorchAttentionMetadata.from_common(common, block_size)
    return PagedBatch(
        query=query.to(device, dtype),
        key=key.to(device, dtype),
        value=value.to(device, dtype),
        kv_cache=kv_cache.to(device, dtype),
        metadata=metadata,
    )
