"""Plain-torch attention over the paged KV cache: the CPU backend and the reference the
Triton kernels are tested against. Runs on any device and float dtype; scores and
softmax are computed in float32."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from kvasir.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionMetadataBuilder,
    register_backend,
)
from kvasir.kernels.kv_cache import dequantize_kv, quantize_kv

KVScales = tuple[torch.Tensor, torch.Tensor] | None  # FP8 cache: [num_kv_heads] K, V scales


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_actual_tokens] int64
    kv_scales: KVScales = None,
) -> None:
    """Store each token's K/V at its slot (``block_id * block_size + offset``); an FP8
    cache gets them divided by their head's scale."""
    num_tokens = slot_mapping.shape[0]
    _, _, _, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)  # [2, num_slots, num_kv_heads, head_dim]
    k, v = key[:num_tokens], value[:num_tokens]
    if kv_scales is not None:
        k = quantize_kv(k, kv_scales[0], kv_cache.dtype)
        v = quantize_kv(v, kv_scales[1], kv_cache.dtype)
    if kv_cache.dtype.itemsize == 1:  # index_copy_ has no FP8 kernel: copy the bytes
        flat, k, v = flat.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


def _gather_kv(
    half: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """``half[blocks]`` ([n, block_size, kvh, d]), an FP8 cache dequantised to float32."""
    if scale is None:
        return half.index_select(0, blocks)
    raw = half.view(torch.uint8).index_select(0, blocks).view(half.dtype)
    return dequantize_kv(raw, scale)


def _attend(
    query: torch.Tensor,  # [batch, q_len, num_heads, head_dim]
    key: torch.Tensor,  # [batch, kv_len, num_kv_heads, head_dim]
    value: torch.Tensor,  # [batch, kv_len, num_kv_heads, head_dim]
    mask: torch.Tensor | None,  # [batch, q_len, kv_len] bool, True = may attend
    scale: float,
    is_causal: bool = False,  # instead of a mask: q_len == kv_len, causal
) -> torch.Tensor:  # [batch, q_len, num_heads, head_dim] float32
    """Masked attention. Every key/value slot must hold a finite value, masked or not
    (a zero probability times NaN is NaN): callers gather written slots only."""
    k = key.float().transpose(1, 2)  # [b, kvh, kv_len, d]
    v = value.float().transpose(1, 2)  # [b, kvh, kv_len, d]
    q = query.float().transpose(1, 2)  # [b, num_heads, q_len, d]
    # SDPA's fused CPU/GPU kernels; GQA handled inside without repeating K/V.
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else mask[:, None], scale=scale,
        is_causal=is_causal, enable_gqa=True,
    )  # fmt: skip
    return out.transpose(1, 2)


@dataclass
class DecodeGroup:
    """Requests with few query tokens (decodes, and the 1 + k tokens a speculative
    step verifies) of similar context length, attended in one batched call. Queries
    are padded to the group's longest, ``max_q``: padded slot j of request i repeats
    its last query row and is never written back."""

    rows: torch.Tensor  # [g * max_q] int64: query row in the flat batch of every slot
    mask: torch.Tensor  # [g, max_q, max_len] bool: key position may be attended
    blocks: torch.Tensor  # [g * max_len / block_size] int64: cache block of every span
    stale: torch.Tensor  # [n] int64: gathered positions past their request's length
    max_q: int = 1
    valid: torch.Tensor | None = None  # [t] padded slots that are real queries (max_q > 1)
    out_rows: torch.Tensor | None = None  # [t] their flat-batch rows


# Requests with up to this many query tokens attend batched (a speculative verify step
# has 1 + k); longer ones (prefill chunks) loop one request at a time.
MAX_BATCHED_QUERY = 17


# Padding a decode batch to its longest context costs gather + attention work on every
# padded slot; each extra group costs a few more ops, counted here in padded slots
# (benchmarks/RESULTS.md, "Measurements that used to live in docstrings").
_GROUP_OVERHEAD_SLOTS = 1024
_MAX_GROUPS = 4


def _length_groups(seq_lens: list[int]) -> list[list[int]]:
    """Indices into ``seq_lens`` split into up to four groups of similar length
    (equal-count chunks of the indices sorted by length) when that saves more padded
    slots than the extra calls cost; otherwise one group, in order (none if empty)."""
    n = len(seq_lens)
    if n == 0:
        return []
    order = sorted(range(n), key=seq_lens.__getitem__)
    best_g, best_cost = 1, n * max(seq_lens, default=0)
    for g in range(2, min(_MAX_GROUPS, n // 4) + 1):
        bounds = [round(i * n / g) for i in range(g + 1)]
        cost = sum((bounds[i + 1] - bounds[i]) * seq_lens[order[bounds[i + 1] - 1]]
                   for i in range(g)) + (g - 1) * _GROUP_OVERHEAD_SLOTS  # fmt: skip
        if cost < best_cost:
            best_g, best_cost = g, cost
    if best_g == 1:
        return [list(range(n))]
    bounds = [round(i * n / best_g) for i in range(best_g + 1)]
    return [order[bounds[i] : bounds[i + 1]] for i in range(best_g)]


def decode_groups(metadata: AttentionMetadata, block_size: int) -> list[DecodeGroup]:
    """The step's requests with at most ``MAX_BATCHED_QUERY`` query tokens that attend
    to a cached prefix, in length groups, with their gather blocks and masks
    (``block_size``: the KV cache's). Derived once per step by the builder and shared
    by every layer."""
    device = metadata.block_table.device
    qsl = metadata.query_start_loc_cpu.tolist()
    seq_lens = metadata.seq_lens_cpu.tolist()
    batched = [i for i in range(metadata.num_reqs) if is_batched_query(qsl, seq_lens, i)]
    # Decodes apart from longer queries: padding a decode's query to a verify step's
    # 1 + k would multiply its attention work by 1 + k.
    singles = [i for i in batched if qsl[i + 1] - qsl[i] == 1]
    multi = [i for i in batched if qsl[i + 1] - qsl[i] > 1]
    parts = [[subset[j] for j in members]
             for subset in (singles, multi)
             for members in _length_groups([seq_lens[i] for i in subset])]  # fmt: skip
    groups = []
    for reqs in parts:
        req_ids = torch.tensor(reqs, device=device)
        num_blocks = (max(seq_lens[i] for i in reqs) + block_size - 1) // block_size
        max_len = num_blocks * block_size
        table = metadata.block_table.index_select(0, req_ids)[:, :num_blocks].long()
        lens = metadata.seq_lens.index_select(0, req_ids)[:, None]  # [g, 1]
        # Table entries past a request's own blocks may be stale: read its first block
        # again (written in full once the request has a block's worth of tokens).
        own = torch.arange(num_blocks, device=device)[None, :] * block_size < lens
        table = torch.where(own, table, table[:, :1])
        positions = torch.arange(max_len, device=device)[None, :]
        mask = positions < lens  # [g, max_len]
        own_end = (lens + block_size - 1) // block_size * block_size
        # Positions that may hold unwritten data: the tail of a request's last block,
        # and every padded one while its first block is still partial.
        stale = ~mask & ((positions < own_end) | (lens < block_size))
        stale = torch.nonzero(stale.view(-1)).squeeze(1)
        q_lens = [qsl[i + 1] - qsl[i] for i in reqs]
        max_q = max(q_lens)
        if max_q == 1:
            rows = torch.tensor([qsl[i] for i in reqs], device=device)
            groups.append(DecodeGroup(rows, mask[:, None, :], table.view(-1), stale))
            continue
        # Query j of request i sits at position seq_len - q_len + j: keys up to it.
        slot_j = torch.arange(max_q, device=device)[None, :]  # [1, max_q]
        ql = torch.tensor(q_lens, device=device)[:, None]  # [g, 1]
        start = torch.tensor([qsl[i] for i in reqs], device=device)[:, None]
        rows = start + torch.minimum(slot_j, ql - 1)  # [g, max_q]
        q_pos = lens - ql + torch.minimum(slot_j, ql - 1)  # [g, max_q]
        full_mask = mask[:, None, :] & (positions[:, None, :] <= q_pos[:, :, None])
        valid = torch.nonzero((slot_j < ql).view(-1)).squeeze(1)
        out_rows = (start + slot_j).view(-1).index_select(0, valid)
        groups.append(
            DecodeGroup(rows.view(-1), full_mask, table.view(-1), stale, max_q, valid, out_rows)
        )
    return groups


def is_batched_query(qsl: list[int], seq_lens: list[int], i: int) -> bool:
    """Whether request ``i`` attends in a ``DecodeGroup``: a decode, or a short query
    over a cached prefix (a fresh short prompt takes the causal path without a gather)."""
    q_len = qsl[i + 1] - qsl[i]
    return q_len == 1 or (1 < q_len <= MAX_BATCHED_QUERY and seq_lens[i] > q_len)


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    """``AttentionMetadata`` plus what the torch backend derives once per step."""

    block_size: int  # of the KV cache the decode groups index
    decode_groups: list[DecodeGroup]  # single-token requests, by length

    @classmethod
    def from_common(cls, metadata: AttentionMetadata, block_size: int) -> TorchAttentionMetadata:
        """``metadata`` with its decode groups derived (the builder's derivation)."""
        common = {f.name: getattr(metadata, f.name) for f in fields(AttentionMetadata)}
        groups = decode_groups(metadata, block_size)
        return cls(**common, block_size=block_size, decode_groups=groups)


class TorchAttentionMetadataBuilder(AttentionMetadataBuilder):
    """Step metadata with the decode length groups derived once for every layer. No
    CUDA graphs: the backend reads host-side metadata a replay could not refresh."""

    supports_cuda_graphs = False

    def build(
        self, num_reqs: int, num_tokens: int, max_query_len: int, max_seq_len: int
    ) -> TorchAttentionMetadata:
        common = super().build(num_reqs, num_tokens, max_query_len, max_seq_len)
        return TorchAttentionMetadata.from_common(common, self.buffers.block_size)

    def build_for_capture(
        self, num_reqs: int, num_tokens: int, max_query_len: int, max_seq_len: int
    ) -> AttentionMetadata:
        raise RuntimeError("the torch attention backend runs no CUDA graphs (host-side metadata)")


def _decode_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    metadata: TorchAttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place
    kv_scales: KVScales = None,
) -> None:
    """Every single-token request (decodes): one gather + attention per length group.

    K/V are gathered whole blocks at a time (index_select per cache half: far fewer
    index operations than gathering the same bytes slot by slot). Slots past a
    request's length that may never have been written are then zeroed: they may hold
    anything, NaN included, and a zero probability times NaN would still be NaN."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    assert metadata.block_size == block_size, "decode groups built for another block size"
    for g in metadata.decode_groups:
        num_reqs, max_q, max_len = g.mask.shape
        ks, vs = kv_scales if kv_scales is not None else (None, None)
        key = _gather_kv(kv_cache[0], g.blocks, ks)  # [g * blocks, block_size, kvh, d]
        value = _gather_kv(kv_cache[1], g.blocks, vs)
        if g.stale.numel():
            key.view(-1, num_kv_heads, head_dim).index_fill_(0, g.stale, 0.0)
            value.view(-1, num_kv_heads, head_dim).index_fill_(0, g.stale, 0.0)
        key = key.view(num_reqs, max_len, num_kv_heads, head_dim)
        value = value.view(num_reqs, max_len, num_kv_heads, head_dim)
        # One query token per request: the query heads sharing a KV head become that
        # head's query rows (plain SDPA, measured faster on the CPU than SDPA's
        # enable_gqa: benchmarks/RESULTS.md, "Measurements that used to live in docstrings").
        num_heads = query.shape[1]
        group = num_heads // num_kv_heads
        q = query.index_select(0, g.rows).float()  # [g * max_q, num_heads, head_dim]
        if max_q == 1:
            q = q.view(num_reqs, num_kv_heads, group, head_dim)
            attn_mask = g.mask[:, :, None, :]  # [g, 1, 1, max_len]
        else:
            # [g, max_q, kvh, group, d] -> [g, kvh, group * max_q, d]; mask to match.
            q = q.view(num_reqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
            q = q.reshape(num_reqs, num_kv_heads, group * max_q, head_dim)
            attn_mask = g.mask[:, None, None].expand(num_reqs, 1, group, max_q, max_len)
            attn_mask = attn_mask.reshape(num_reqs, 1, group * max_q, max_len)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, key.float().transpose(1, 2), value.float().transpose(1, 2),
            attn_mask=attn_mask, scale=scale,
        )  # fmt: skip
        if max_q > 1:
            o = o.view(num_reqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
            o = o.reshape(num_reqs * max_q, num_heads, head_dim)
            assert g.valid is not None and g.out_rows is not None
            out.index_copy_(0, g.out_rows, o.index_select(0, g.valid).to(out.dtype))
            continue
        # index_copy_, not out[rows] = ...: advanced-index assignment is slower (RESULTS.md).
        out.index_copy_(0, g.rows, o.reshape(num_reqs, num_heads, head_dim).to(out.dtype))


def _prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,  # [num_tokens, kvh, d] each
    kv_scales: KVScales = None,
) -> None:
    """Requests with several query tokens (prefill chunks), one at a time. ``fresh``:
    this step's K/V (as written to the cache); a request with no earlier tokens attends
    to them directly, causally, with no gather from the cache."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    query_start_loc = metadata.query_start_loc_cpu.tolist()
    seq_lens = metadata.seq_lens_cpu.tolist()
    for i in range(metadata.num_reqs):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len, seq_len = end - start, seq_lens[i]
        if q_len == 0 or is_batched_query(query_start_loc, seq_lens, i):
            continue  # none, or attended in a decode group (_decode_attention)
        if fresh is not None and seq_len == q_len:
            k, v = fresh[0][None, start:end], fresh[1][None, start:end]
            o = _attend(query[None, start:end], k, v, None, scale, is_causal=True)
            out[start:end] = o[0].to(out.dtype)
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = metadata.block_table[i, :num_blocks].long()
        # [seq_len, num_kv_heads, head_dim]: this request's tokens in position order
        ks, vs = kv_scales if kv_scales is not None else (None, None)
        key = _gather_kv(kv_cache[0], blocks, ks).view(-1, num_kv_heads, head_dim)[:seq_len]
        value = _gather_kv(kv_cache[1], blocks, vs).view(-1, num_kv_heads, head_dim)[:seq_len]
        # Query j sits at absolute position seq_len - q_len + j and sees keys <= it.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        o = _attend(query[None, start:end], key[None], value[None], mask[None], scale)
        out[start:end] = o[0].to(out.dtype)


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    metadata: TorchAttentionMetadata,
    scale: float,
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv_scales: KVScales = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], query's dtype
    """Causal attention of each query token over its request's cached K/V (this step's
    K/V must already be in ``kv_cache``). Rows past ``num_actual_tokens`` are zero.
    ``fresh``: this step's key and value, as written (see ``_prefill_attention``)."""
    out = torch.zeros_like(query)
    if metadata.num_reqs == 0:
        return out
    _decode_attention(query, kv_cache, metadata, scale, out, kv_scales)
    if metadata.max_query_len > 1:
        _prefill_attention(query, kv_cache, metadata, scale, out, fresh, kv_scales)
    return out


@register_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    """Reference backend in plain torch: correct everywhere, fast nowhere. Decodes and
    short queries over a cached prefix (speculative verification) run batched, in
    groups of similar context length; longer ones (prefill chunks) loop one by one. Reads ``TorchAttentionMetadata`` (its
    builder's decode groups)."""

    @classmethod
    def get_builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return TorchAttentionMetadataBuilder

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
        if not isinstance(attn_metadata, TorchAttentionMetadata):
            raise TypeError(
                "the torch attention backend reads TorchAttentionMetadata (built by "
                f"TorchAttentionMetadataBuilder), got {type(attn_metadata).__name__}"
            )
        num_actual = attn_metadata.num_actual_tokens
        self.maybe_calculate_kv_scales(key, value, num_actual)
        scales = self.kv_scales if kv_cache.dtype == self.kv_cache_dtype else None
        write_kv_cache(key, value, kv_cache, attn_metadata.slot_mapping[:num_actual], scales)
        # An FP8 cache: attend to the K/V as stored (rounded), as every later step will.
        fresh = (key, value) if key.dtype == kv_cache.dtype else None
        return paged_attention_ref(query, kv_cache, attn_metadata, self.scale, fresh, scales)
