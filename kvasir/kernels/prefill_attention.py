"""Paged prefill / extend attention over a varlen batch (FlashAttention-2 style).

Request ``r`` owns query rows ``query_start_loc[r]:query_start_loc[r+1]`` (``q_len`` of
them), which are the last ``q_len`` of its ``seq_lens[r]`` tokens: query ``i`` sits at
absolute position ``seq_len - q_len + i`` and attends causally to every key at a
position <= its own. All keys, a cached prefix and this chunk alike, are read through
``block_table`` from the paged cache (this step's K/V is written there first), so
chunked prefill, prefix caching and mixed decode rows (``q_len == 1``) are one path.

One program owns ``BLOCK_M`` query rows of one (request, query head). Its key loop runs
in two stages: keys every row of the tile may see (no mask), then the few tiles on the
causal diagonal (masked). Programs of one KV group sit next to each other in the grid
so their shared K/V tiles come from L2.

The query tiles of all requests are numbered in one flat grid axis: request ``r``'s
tiles start at ``query_start_loc[r] // BLOCK_M + r`` (at most one tile more than it
needs), and each program finds its request by binary search over ``query_start_loc``.
The grid is then sized by the flat batch alone (``num_tokens // BLOCK_M + num_reqs``
tiles), not by ``max_query_len * num_reqs``: a chunk of 8k tokens beside 200 decode rows
launches ~260 tiles per head instead of ~13k, and a CUDA graph captured for a token
budget serves any mix of requests within it.

An FP8 cache (``kv_scales``) is dequantised in the kernel: K and V tiles converted to the
query's dtype, the KV head's K scale folded into the softmax scale, its V scale into
the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape of the prefill kernel (``default_prefill_config`` picks one)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3


@triton.jit
def _load_kv(ptrs, mask_n, mask_d, MASK_N: tl.constexpr, PAD_D: tl.constexpr):
    # Masks only where needed: an all-true mask can still cost vectorised loads.
    # other=0: never-written slots may hold NaN, and 0 * NaN would poison acc.
    if MASK_N:
        if PAD_D:
            return tl.load(ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        return tl.load(ptrs, mask=mask_n[:, None], other=0.0)
    if PAD_D:
        return tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attn_tile(
    acc,
    l_i,
    m_i,
    q,
    n0,
    q_pos,
    seq_len,
    k_cache_ptr,
    v_cache_ptr,
    bt_row,
    head_off,
    offs_d,
    mask_d,
    qk_scale,
    stride_c_blk,
    stride_c_tok,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seq_len
    if MASKED:
        block_ids = tl.load(bt_row + offs_n // PAGE_SIZE, mask=mask_n, other=0)
    else:
        block_ids = tl.load(bt_row + offs_n // PAGE_SIZE)
    tok_off = block_ids.to(tl.int64) * stride_c_blk + (offs_n % PAGE_SIZE) * stride_c_tok
    kv_off = tok_off[:, None] + head_off + offs_d[None, :]  # [BLOCK_N, HEAD_DIM_PAD]
    k = _load_kv(k_cache_ptr + kv_off, mask_n, mask_d, MASKED, PAD_D)
    if KV_FP8:
        k = k.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if MASKED:
        causal = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        s = tl.where(causal, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet
        p = tl.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_kv(v_cache_ptr + kv_off, mask_n, mask_d, MASKED, PAD_D)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_start_loc_ptr,  # [num_reqs + 1] int32
    seq_lens_ptr,  # [num_reqs] int32
    block_table_ptr,  # [num_reqs, max_num_blocks] int32
    k_scale_ptr,  # [num_kv_heads] float32 (KV_FP8)
    v_scale_ptr,
    num_reqs,
    qk_scale,  # softmax scale * log2(e)
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_c_blk,
    stride_c_tok,
    stride_c_head,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PAD_D: tl.constexpr,  # HEAD_DIM != HEAD_DIM_PAD
    GROUP_SIZE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    head = tl.program_id(0)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + head // GROUP_SIZE)
    # Heaviest (last, longest-context) query tiles first, for a shorter tail.
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    # The request owning the tile: the last r with query_start_loc[r] // BLOCK_M + r
    # <= tile (strictly increasing in r, so unique).
    lo = 0
    hi = num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns = tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid <= tile
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    req = lo
    q_start = tl.load(query_start_loc_ptr + req)
    m_tile = tile - (q_start // BLOCK_M + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if m_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len  # tokens before this chunk

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = ctx_len + offs_m  # absolute positions of this tile's queries

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
    head_off = (head // GROUP_SIZE) * stride_c_head

    # -- stage 1: keys at positions <= the tile's first query: visible to every row --
    full_end = (ctx_len + m_tile * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, n0, q_pos, seq_len, k_cache_ptr, v_cache_ptr, bt_row,
            head_off, offs_d, mask_d, qk_scale, stride_c_blk, stride_c_tok,
            PAGE_SIZE, BLOCK_N, False, PAD_D, DOT_PRECISION, KV_FP8,
        )  # fmt: skip
    # -- stage 2: the causal diagonal ---------------------------------------------
    diag_end = tl.minimum(ctx_len + (m_tile + 1) * BLOCK_M, seq_len)
    for n0 in range(full_end, diag_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, n0, q_pos, seq_len, k_cache_ptr, v_cache_ptr, bt_row,
            head_off, offs_d, mask_d, qk_scale, stride_c_blk, stride_c_tok,
            PAGE_SIZE, BLOCK_N, True, PAD_D, DOT_PRECISION, KV_FP8,
        )  # fmt: skip

    # -- epilogue -------------------------------------------------------------------
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr + head // GROUP_SIZE)
    tl.store(
        out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def default_prefill_config(
    max_query_len: int, device: torch.device, dtype: torch.dtype, head_dim: int = 128
) -> PrefillConfig:
    """Tile shape by case. Long prompts, head_dim <= 128: 128x128 tiles, 8 warps, 3
    stages, the fastest of the H200 prefill sweep (benchmarks/KERNELS_NOTES.md, run 1;
    benchmarks/RESULTS.md, "Measurements that used to live in docstrings"). head_dim > 128
    halves the key tile to fit shared memory; float32 runs three tf32 products per dot and
    needs smaller tiles; the CPU interpreter wants small tiles (every element costs Python
    time)."""
    if device.type != "cuda":
        return PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    wide = head_dim > 128
    if max_query_len >= 128:
        if wide:
            return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=3)
        return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    block_m = min(64, max(16, triton.next_power_of_2(max_query_len)))
    return PrefillConfig(block_m=block_m, block_n=32 if wide else 64, num_warps=4, num_stages=3)


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    block_table: torch.Tensor,  # [num_reqs, max_num_blocks] int32
    scale: float,
    max_query_len: int,
    num_reqs: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    config: PrefillConfig | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # FP8 cache: [kvh] each
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]; rows of no request untouched
    """Causal varlen attention over the paged cache; ``max_query_len`` (a host int)
    sizes the grid. Never synchronises with the host."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, page_size = kv_cache.shape[3], kv_cache.shape[2]
    assert num_heads % num_kv_heads == 0, "num_kv_heads must divide num_heads"
    assert query.stride(2) == 1 and kv_cache.stride(4) == 1, "head_dim must be contiguous"
    num_reqs = seq_lens.shape[0] if num_reqs is None else num_reqs
    if out is None:
        out = torch.empty_like(query)
    if num_reqs == 0 or max_query_len == 0:
        return out
    config = config or default_prefill_config(max_query_len, query.device, query.dtype, head_dim)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    # fp32 would otherwise silently run its dots in tf32 (~1e-3); tf32x3 is ~fp32.
    precision = "tf32x3" if query.dtype == torch.float32 else "tf32"
    # Flat tiles (module docstring): query_start_loc[num_reqs] <= num_tokens.
    grid = (num_heads, query.shape[0] // config.block_m + num_reqs)
    kv_fp8 = kv_scales is not None
    assert kv_fp8 == (kv_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
    k_scale, v_scale = kv_scales if kv_scales is not None else (out, out)
    _prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        query_start_loc,
        seq_lens,
        block_table,
        k_scale,
        v_scale,
        num_reqs,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_table.stride(0),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        PAD_D=head_dim != triton.next_power_of_2(head_dim),
        GROUP_SIZE=num_heads // num_kv_heads,
        PAGE_SIZE=page_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=precision,
        KV_FP8=kv_fp8,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def paged_prefill_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    block_table: torch.Tensor,  # [num_reqs, max_num_blocks] int32
    scale: float,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # FP8 cache
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim] float64, on the CPU
    """Plain-torch float64 reference: per request, gather K/V token by token (an FP8
    cache dequantised first) and run masked softmax attention. Rows belonging to no
    request are zero."""
    num_heads = query.shape[1]
    page_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    qsl = query_start_loc.cpu().tolist()
    out = torch.zeros(query.shape, dtype=torch.float64)
    for r in range(seq_lens.shape[0]):
        start, end, seq_len = qsl[r], qsl[r + 1], int(seq_lens[r])
        q_len = end - start
        if q_len == 0:
            continue
        pos = torch.arange(seq_len)
        blocks = block_table[r].long().cpu()[pos // page_size]
        k = kv_cache[0].cpu()[blocks, pos % page_size].double()  # [seq_len, kvh, head_dim]
        v = kv_cache[1].cpu()[blocks, pos % page_size].double()
        if kv_scales is not None:
            k = k * kv_scales[0].cpu().double()[:, None]
            v = v * kv_scales[1].cpu().double()[:, None]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q = query[start:end].cpu().double()  # [q_len, num_heads, head_dim]
        s = torch.einsum("qhd,lhd->hql", q, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len)
        s = s.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hql,lhd->qhd", torch.softmax(s, dim=-1), v)
    return out


__all__ = [
    "PrefillConfig",
    "default_prefill_config",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
]
