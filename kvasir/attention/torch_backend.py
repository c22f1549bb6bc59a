"""Plain-torch attention over the paged KV cache: the CPU backend and the reference the
Triton kernels are tested against. Runs on any device and float dtype; scores and
softmax are computed in float32."""

from __future__ import annotations

import torch

from kvasir.attention.backend import AttentionBackend, AttentionMetadata, register_backend


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_actual_tokens] int64
) -> None:
    """Store each token's K/V at its slot (``block_id * block_size + offset``)."""
    num_tokens = slot_mapping.shape[0]
    _, _, _, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)  # [2, num_slots, num_kv_heads, head_dim]
    flat[0].index_copy_(0, slot_mapping, key[:num_tokens].to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value[:num_tokens].to(kv_cache.dtype))


def _attend(
    query: torch.Tensor,  # [batch, q_len, num_heads, head_dim]
    key: torch.Tensor,  # [batch, kv_len, num_kv_heads, head_dim]
    value: torch.Tensor,  # [batch, kv_len, num_kv_heads, head_dim]
    mask: torch.Tensor,  # [batch, q_len, kv_len] bool, True = may attend
    scale: float,
) -> torch.Tensor:  # [batch, q_len, num_heads, head_dim] float32
    """Masked attention. Every key/value slot must hold a finite value, masked or not
    (a zero probability times NaN is NaN): callers gather written slots only."""
    k = key.float().transpose(1, 2)  # [b, kvh, kv_len, d]
    v = value.float().transpose(1, 2)  # [b, kvh, kv_len, d]
    q = query.float().transpose(1, 2)  # [b, num_heads, q_len, d]
    # SDPA's fused CPU/GPU kernels; GQA handled inside without repeating K/V.
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True
    )  # [b, num_heads, q_len, d]
    return out.transpose(1, 2)


def _decode_attention(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]: each request's one query
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_reqs, >= blocks of the longest] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim] float32
    """One batched gather + attention for requests with a single query token each."""
    num_reqs = query.shape[0]
    _, num_blocks_total, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_blocks = (max_seq_len + block_size - 1) // block_size
    max_len = num_blocks * block_size
    block_table = block_table[:, :num_blocks].long()  # [num_reqs, num_blocks]
    positions = torch.arange(max_len, device=query.device)
    mask = positions[None, :] < seq_lens[:, None]  # [num_reqs, max_len]
    # Slot of every (request, position); positions past a request's length read its
    # position 0 instead (always written), so the padded gather holds only finite values
    # and needs no cleaning pass over K/V (the mask then gives them probability 0).
    pos = torch.where(mask, positions[None, :], 0)  # [num_reqs, max_len]
    slots = block_table.gather(1, pos // block_size) * block_size + pos % block_size
    flat = kv_cache.view(2, num_blocks_total * block_size, num_kv_heads, head_dim)
    slots = slots.view(-1)
    # index_select per cache half: the fastest gather on the CPU (about 2x advanced
    # indexing of both halves at once for 32 requests x 400 tokens).
    key = flat[0].index_select(0, slots).view(num_reqs, max_len, num_kv_heads, head_dim)
    value = flat[1].index_select(0, slots).view(num_reqs, max_len, num_kv_heads, head_dim)
    out = _attend(query[:, None], key, value, mask[:, None, :], scale)
    return out[:, 0]


def _varlen_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place
) -> None:
    """Mixed steps: the single-token rows (decodes) in one batched call, then a loop
    over the requests with several query tokens (prefill chunks)."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    query_start_loc = metadata.query_start_loc_cpu.tolist()
    seq_lens = metadata.seq_lens_cpu.tolist()
    num_reqs = metadata.num_reqs
    singles = [i for i in range(num_reqs) if query_start_loc[i + 1] - query_start_loc[i] == 1]
    if len(singles) > 1:
        idx = torch.tensor(singles, device=query.device)
        rows = torch.tensor([query_start_loc[i] for i in singles], device=query.device)
        out[rows] = _decode_attention(
            query.index_select(0, rows), kv_cache, metadata.block_table.index_select(0, idx),
            metadata.seq_lens.index_select(0, idx), max(seq_lens[i] for i in singles), scale,
        ).to(out.dtype)  # fmt: skip
        batched = set(singles)
    else:
        batched = set()
    for i in range(num_reqs):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len, seq_len = end - start, seq_lens[i]
        if q_len == 0 or i in batched:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = metadata.block_table[i, :num_blocks].long()
        # [seq_len, num_kv_heads, head_dim]: this request's tokens in position order
        key = kv_cache[0].index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:seq_len]
        value = kv_cache[1].index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:seq_len]
        # Query j sits at absolute position seq_len - q_len + j and sees keys <= it.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        o = _attend(query[None, start:end], key[None], value[None], mask[None], scale)
        out[start:end] = o[0].to(out.dtype)


# Padding a decode batch to its longest context costs gather + attention work on every
# padded slot; each extra group costs a few more ops (about 1k slots' worth on a CPU).
_GROUP_OVERHEAD_SLOTS = 1024
_MAX_GROUPS = 4


def _length_groups(
    seq_lens: list[int], device: torch.device
) -> list[tuple[torch.Tensor, int]]:
    """Decode rows split into up to four groups of similar context length (equal-count
    chunks of the rows sorted by length), when that saves more padded slots than the
    extra calls cost. Returns ``[(row indices, max seq_len), ...]``; one group means the
    whole batch in order."""
    n = len(seq_lens)
    order = sorted(range(n), key=seq_lens.__getitem__)
    best_g, best_cost = 1, n * max(seq_lens, default=0)
    for g in range(2, min(_MAX_GROUPS, n // 4) + 1):
        bounds = [round(i * n / g) for i in range(g + 1)]
        cost = sum((bounds[i + 1] - bounds[i]) * seq_lens[order[bounds[i + 1] - 1]]
                   for i in range(g)) + (g - 1) * _GROUP_OVERHEAD_SLOTS  # fmt: skip
        if cost < best_cost:
            best_g, best_cost = g, cost
    if best_g == 1:
        return [(torch.arange(n, device=device), max(seq_lens, default=0))]
    bounds = [round(i * n / best_g) for i in range(best_g + 1)]
    return [
        (torch.tensor(order[bounds[i] : bounds[i + 1]], device=device),
         seq_lens[order[bounds[i + 1] - 1]])
        for i in range(best_g)
    ]  # fmt: skip


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], query's dtype
    """Causal attention of each query token over its request's cached K/V (this step's
    K/V must already be in ``kv_cache``). Rows past ``num_actual_tokens`` are zero."""
    out = torch.zeros_like(query)
    if metadata.num_reqs == 0:
        return out
    if metadata.max_query_len == 1:
        n = metadata.num_reqs
        groups = metadata.scratch.get("torch_decode_groups")
        if groups is None:
            groups = metadata.scratch["torch_decode_groups"] = _length_groups(
                metadata.seq_lens_cpu[:n].tolist(), query.device
            )
        if len(groups) == 1:
            out[:n] = _decode_attention(
                query[:n], kv_cache, metadata.block_table[:n], metadata.seq_lens[:n],
                metadata.max_seq_len, scale,
            ).to(query.dtype)  # fmt: skip
        for rows, max_len in groups if len(groups) > 1 else ():
            out[rows] = _decode_attention(
                query.index_select(0, rows), kv_cache, metadata.block_table.index_select(0, rows),
                metadata.seq_lens.index_select(0, rows), max_len, scale,
            ).to(query.dtype)  # fmt: skip
    else:
        _varlen_attention(query, kv_cache, metadata, scale, out)
    return out


@register_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    """Reference backend in plain torch: correct everywhere, fast nowhere. Single-token
    rows (decodes) run as one batched gather + attention; requests with several query
    tokens loop one by one."""

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        assert rotary is None, "the torch backend does not fuse rotary (fuses_rotary=False)"
        num_actual = attn_metadata.num_actual_tokens
        write_kv_cache(key, value, kv_cache, attn_metadata.slot_mapping[:num_actual])
        return paged_attention_ref(query, kv_cache, attn_metadata, self.scale)
