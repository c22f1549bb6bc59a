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
    # Masked-out slots may hold stale or never-written memory (NaN/inf); zero them so
    # a 0 probability times garbage cannot poison the sum.
    slot_valid = mask.any(dim=1)[:, :, None, None]  # [batch, kv_len, 1, 1]
    k = torch.where(slot_valid, key.float(), 0.0).transpose(1, 2)  # [b, kvh, kv_len, d]
    v = torch.where(slot_valid, value.float(), 0.0).transpose(1, 2)  # [b, kvh, kv_len, d]
    q = query.float().transpose(1, 2)  # [b, num_heads, q_len, d]
    # SDPA's fused CPU/GPU kernels; GQA handled inside without repeating K/V.
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True
    )  # [b, num_heads, q_len, d]
    return out.transpose(1, 2)


def _decode_attention(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim] float32
    num_reqs = metadata.num_reqs
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_blocks = (metadata.max_seq_len + block_size - 1) // block_size
    block_table = metadata.block_table[:num_reqs, :num_blocks].long()  # [num_reqs, num_blocks]
    max_len = num_blocks * block_size
    # One gather for the whole batch: [num_reqs, num_blocks * block_size, kvh, head_dim]
    key = kv_cache[0][block_table].view(num_reqs, max_len, num_kv_heads, head_dim)
    value = kv_cache[1][block_table].view(num_reqs, max_len, num_kv_heads, head_dim)
    positions = torch.arange(max_len, device=query.device)
    mask = positions[None, :] < metadata.seq_lens[:num_reqs, None]  # [num_reqs, max_len]
    out = _attend(query[:, None], key, value, mask[:, None, :], scale)
    return out[:, 0]


def _varlen_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place
) -> None:
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    query_start_loc = metadata.query_start_loc_cpu.tolist()
    seq_lens = metadata.seq_lens_cpu.tolist()
    for i in range(metadata.num_reqs):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len, seq_len = end - start, seq_lens[i]
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = metadata.block_table[i, :num_blocks].long()
        # [seq_len, num_kv_heads, head_dim]: this request's tokens in position order
        key = kv_cache[0][blocks].view(-1, num_kv_heads, head_dim)[:seq_len]
        value = kv_cache[1][blocks].view(-1, num_kv_heads, head_dim)[:seq_len]
        # Query j sits at absolute position seq_len - q_len + j and sees keys <= it.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        o = _attend(query[None, start:end], key[None], value[None], mask[None], scale)
        out[start:end] = o[0].to(out.dtype)


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
        num_reqs = metadata.num_reqs
        out[:num_reqs] = _decode_attention(query[:num_reqs], kv_cache, metadata, scale).to(
            query.dtype
        )
    else:
        _varlen_attention(query, kv_cache, metadata, scale, out)
    return out


@register_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    """Reference backend in plain torch: correct everywhere, fast nowhere. Decode-only
    steps run as one batched gather + attention; other steps loop over requests."""

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
