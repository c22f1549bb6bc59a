"""Paged decode attention (one query token per request), GQA-aware, with split-K.

One program handles every query head of one KV head (a "group") for one slice of one
request's context, so each KV block is read from memory once per group, not once per
query head. Contexts are cut into up to ``num_splits`` slices (flash-decoding); each
slice writes a partial (normalised output, log-sum-exp) and a second kernel combines
them. Slices are cut per request on the device from ``seq_lens`` (never shorter than
``min_split_len`` tokens, so short contexts leave the extra slices empty and cheap).
The split count depends only on the batch shape (``num_reqs``, ``num_kv_heads``, the
GPU's multiprocessor count), never on context lengths: an eager warm-up and a CUDA-graph
capture of the same batch size compile and launch the same kernels.

KV cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (0 = K, 1 = V).
An FP8 cache (``kv_scales`` given) is dequantised in the kernel: its K and V tiles are
converted to the query's dtype (exact), the K scale folded into the softmax scale and
the V scale into the output, one scalar per KV head (each program holds one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvasir.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_kwargs, use_pdl

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32


@dataclass(frozen=True)
class DecodeConfig:
    """Tile shape of the decode kernel: ``block_n`` keys per iteration. Slices shorter
    than ``min_split_len`` tokens (a multiple of ``block_n``) cost more in the partial
    round trip than their parallelism gains."""

    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    min_split_len: int = 256


def default_decode_config(
    head_dim: int, num_groups: int | None = None, num_sms: int | None = None
) -> DecodeConfig:
    """128 keys per tile: close to the copy bandwidth and steady across split counts,
    where 64-key tiles swing with the wave count (benchmarks/KERNELS_NOTES.md). head_dim
    > 128 halves the tile to keep three stages in shared memory.

    A batch with fewer (request, KV head) groups than half the multiprocessors (batch-1
    decode: 8 groups) is latency-bound, not bandwidth-bound: 64-key slices spread even a
    short context over several programs that each do one tile (figures: benchmarks/RESULTS.md, "Measurements that used to live in docstrings")."""
    small = num_groups is not None and num_sms is not None and 2 * num_groups <= num_sms
    if small:
        return DecodeConfig(block_n=64 if head_dim <= 128 else 32, num_stages=2,
                            min_split_len=64)  # fmt: skip
    return DecodeConfig(block_n=128 if head_dim <= 128 else 64)


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [num_reqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_reqs, max_num_blocks] int32
    seq_lens_ptr,  # [num_reqs] int32
    out_ptr,  # [num_reqs, num_heads, head_dim] (NUM_SPLITS == 1)
    mid_o_ptr,  # [num_reqs, num_heads, NUM_SPLITS, head_dim] float32
    mid_lse_ptr,  # [num_reqs, num_heads, NUM_SPLITS] float32 (log2 domain)
    k_scale_ptr,  # [num_kv_heads] float32 (KV_FP8)
    v_scale_ptr,
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
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16 so tl.dot has a legal M
    PAGE_SIZE: tl.constexpr,  # tokens per KV block
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,  # a multiple of BLOCK_N
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    if USE_PDL:  # see kvasir.kernels.pdl: nothing is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)

    seq_len = tl.load(seq_lens_ptr + req)
    # Per-request slice length, rounded to whole tiles so slices never share a tile.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    split_len = tl.maximum(split_len, MIN_SPLIT_LEN)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_g = offs_g < GROUP_SIZE
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP_SIZE + offs_g  # [GROUP_PAD] query heads of this group
    q_ptrs = q_ptr + req.to(tl.int64) * stride_q_tok + heads[:, None] * stride_q_head
    q = tl.load(q_ptrs + offs_d[None, :], mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
    head_off = kv_head * stride_c_head
    # -- main loop over this slice's keys ---------------------------------------------
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block_ids = tl.load(bt_row + offs_n // PAGE_SIZE, mask=mask_n, other=0)
        tok_off = block_ids.to(tl.int64) * stride_c_blk + (offs_n % PAGE_SIZE) * stride_c_tok
        kv_off = tok_off[:, None] + head_off + offs_d[None, :]  # [BLOCK_N, HEAD_DIM_PAD]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # other=0: never-written slots may hold NaN, and 0 * NaN would poison acc.
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A group row with nothing seen yet has m_new = -inf: keep exp2's argument finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if KV_FP8:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # -- epilogue -------------------------------------------------------------------
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # empty slice or seq_len 0: output 0
    o = acc / l_safe[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr + kv_head)
    out_mask = mask_g[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + req.to(tl.int64) * stride_o_tok + heads[:, None] * stride_o_head
        tl.store(o_ptrs + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (req.to(tl.int64) * (GROUP_SIZE * tl.num_programs(1)) + heads) * NUM_SPLITS + split
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=out_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(mid_lse_ptr + row, lse, mask=mask_g)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr,  # [num_reqs, num_heads, NUM_SPLITS, head_dim] float32
    mid_lse_ptr,  # [num_reqs, num_heads, NUM_SPLITS] float32
    out_ptr,  # [num_reqs, num_heads, head_dim]
    stride_o_tok,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see kvasir.kernels.pdl: nothing is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    req = tl.program_id(0)
    head = tl.program_id(1)
    row = req.to(tl.int64) * tl.num_programs(1) + head
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(mid_lse_ptr + row * NUM_SPLITS + offs_s, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)  # [SPLITS_PAD]; empty slices weigh 0
    o = tl.load(
        mid_o_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    w_sum = tl.sum(w, axis=0)
    o = tl.sum(o * w[:, None], axis=0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    o_ptrs = out_ptr + req.to(tl.int64) * stride_o_tok + head * stride_o_head + offs_d
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask_d)


def choose_num_splits(num_reqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Slices per request so that about four programs run per multiprocessor on long
    contexts. Deliberately independent of context length (see the module docstring)."""
    programs = max(1, num_reqs * num_kv_heads)
    return max(1, min(triton.cdiv(4 * num_sms, programs), _MAX_SPLITS))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few slices still exercise the reduction
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_decode_attention(
    query: torch.Tensor,  # [>= num_reqs, num_heads, head_dim]; row r belongs to request r
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [>= num_reqs, max_num_blocks] int32
    seq_lens: torch.Tensor,  # [>= num_reqs] int32
    scale: float,
    num_reqs: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # [>= num_reqs, num_heads, head_dim]
    config: DecodeConfig | None = None,
    pdl: bool = True,  # launch with PDL where supported (kvasir.kernels.pdl)
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # FP8 cache: [kvh] each
) -> torch.Tensor:  # [query.shape[0], num_heads, head_dim], rows >= num_reqs untouched
    """Attention of each request's single query token over its first ``seq_lens[r]``
    cached tokens. ``num_splits=None`` picks the split count from the batch shape. A
    request with ``seq_len == 0`` gets a zero output. Never synchronises with the host;
    safe to capture in a CUDA graph once warmed up at the same ``num_reqs``."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    page_size = kv_cache.shape[2]
    assert num_heads % num_kv_heads == 0, "num_kv_heads must divide num_heads"
    assert query.stride(2) == 1 and kv_cache.stride(4) == 1, "head_dim must be contiguous"
    num_reqs = query.shape[0] if num_reqs is None else num_reqs
    if out is None:
        out = torch.empty_like(query)
    if num_reqs == 0:
        return out
    num_sms = _num_sms(query.device)
    config = config or default_decode_config(head_dim, num_reqs * num_kv_heads, num_sms)
    if num_splits is None:
        num_splits = choose_num_splits(num_reqs, num_kv_heads, num_sms)
    assert config.min_split_len % config.block_n == 0, "min_split_len must be whole tiles"
    group = num_heads // num_kv_heads
    head_dim_pad = triton.next_power_of_2(head_dim)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    pdl = use_pdl(query, pdl)
    if num_splits > 1:
        mid_o = torch.empty(
            (num_reqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
        mid_lse = torch.empty(
            (num_reqs, num_heads, num_splits), dtype=torch.float32, device=query.device
        )
    else:
        mid_o = mid_lse = out  # unused by the kernel
    kv_fp8 = kv_scales is not None
    assert kv_fp8 == (kv_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
    k_scale, v_scale = kv_scales if kv_scales is not None else (out, out)
    _decode_split_kernel[(num_reqs, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        out,
        mid_o,
        mid_lse,
        k_scale,
        v_scale,
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
        HEAD_DIM_PAD=head_dim_pad,
        GROUP_SIZE=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        PAGE_SIZE=page_size,
        BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits,
        MIN_SPLIT_LEN=config.min_split_len,
        # fp32 would otherwise silently run its dots in tf32 (~1e-3); tf32x3 is ~fp32.
        DOT_PRECISION="tf32x3" if query.dtype == torch.float32 else "tf32",
        USE_PDL=pdl,
        KV_FP8=kv_fp8,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_kwargs(pdl),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_reqs, num_heads)](
            mid_o,
            mid_lse,
            out,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            USE_PDL=pdl,
            num_warps=4,
            **launch_kwargs(pdl),
        )
    return out


def paged_decode_attention_ref(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_reqs, max_num_blocks] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    scale: float,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # FP8 cache
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim] float64
    """Plain-torch float64 reference: gathers each request's K/V token by token (an FP8
    cache dequantised first)."""
    num_reqs, num_heads, head_dim = query.shape
    page_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_reqs, num_heads, head_dim, dtype=torch.float64)
    for r in range(num_reqs):
        seq_len = int(seq_lens[r])
        if seq_len == 0:
            continue
        pos = torch.arange(seq_len)
        blocks = block_table[r].long().cpu()[pos // page_size]
        k = kv_cache[0].cpu()[blocks, pos % page_size].double()  # [seq_len, kvh, head_dim]
        v = kv_cache[1].cpu()[blocks, pos % page_size].double()
        if kv_scales is not None:
            k = k * kv_scales[0].cpu().double()[:, None]
            v = v * kv_scales[1].cpu().double()[:, None]
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        s = torch.einsum("hd,lhd->hl", query[r].cpu().double(), k) * scale
        out[r] = torch.einsum("hl,lhd->hd", torch.softmax(s, dim=-1), v)
    return out


__all__ = [
    "DecodeConfig",
    "choose_num_splits",
    "default_decode_config",
    "paged_decode_attention",
    "paged_decode_attention_ref",
]
