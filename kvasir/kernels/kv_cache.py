"""Writing this step's K/V into the paged cache, optionally fused with rotary embedding.

KV cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (0 = K, 1 = V);
token ``t`` goes to slot ``slot_mapping[t] = block_id * block_size + offset``. A negative
slot (vLLM's ``PAD_SLOT_ID = -1``, used for CUDA-graph padding) is skipped.

Rotary format (the fused kernel): ``cos_sin_cache`` is ``[max_position, rotary_dim]``
float32, ``torch.cat((cos, sin), dim=-1)`` of the angles ``pos * inv_freq`` (so
``[:, :rotary_dim // 2]`` is cos and ``[:, rotary_dim // 2:]`` is sin), exactly what
``kvasir.layers.rotary_embedding.RotaryEmbedding.cos_sin_cache`` holds and vLLM uses. The
rotation is the HF / neox half split: dims ``[0, r/2)`` pair with ``[r/2, r)`` for
``r = rotary_dim``; dims ``[r, head_dim)`` pass through. Math runs in float32 and rounds
once to the tensor's dtype, as the torch rotary layer does.

FP8 cache (``kv_cache`` in ``float8_e4m3fn`` / ``float8_e5m2``): both writers take
``kv_scales = (k_scale, v_scale)``, float32 ``[num_kv_heads]`` (a per-tensor scale
repeated per head), and store ``clamp(x / scale)`` in the cache's dtype; readers
multiply by the same scale (``dequantize_kv``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvasir.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_kwargs, use_pdl

FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit
def _to_cache(x, scale_ptr, offs_h, mask_h, QUANT: tl.constexpr, QMAX: tl.constexpr):
    """``x`` [heads, dims] as stored: divided by its head's scale and clamped (FP8)."""
    if QUANT:
        s = tl.load(scale_ptr + offs_h, mask=mask_h, other=1.0)
        x = x.to(tl.float32) / s[:, None]
        x = tl.minimum(tl.maximum(x, -QMAX), QMAX)
    return x


def _kv_scale_args(kv_cache: torch.Tensor, kv_scales, num_kv_heads: int):  # noqa: ANN001, ANN202
    """(k_scale, v_scale, QUANT, QMAX) kernel arguments for ``kv_cache``'s dtype."""
    if kv_cache.dtype not in FP8_KV_DTYPES:
        return kv_cache, kv_cache, False, 1.0
    assert kv_scales is not None, "an FP8 KV cache needs kv_scales"
    k_scale, v_scale = kv_scales
    assert k_scale.shape == (num_kv_heads,) and v_scale.shape == (num_kv_heads,)
    assert k_scale.dtype == torch.float32 and v_scale.dtype == torch.float32
    return k_scale, v_scale, True, float(torch.finfo(kv_cache.dtype).max)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens] int64
    k_scale_ptr,  # [num_kv_heads] float32 (QUANT)
    v_scale_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_blk,
    stride_c_tok,
    stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
    QMAX: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    dst = (
        (slot // PAGE_SIZE) * stride_c_blk
        + (slot % PAGE_SIZE) * stride_c_tok
        + offs_h[:, None] * stride_c_head
        + offs_d[None, :]
    )
    src_k = tok * stride_k_tok + offs_h[:, None] * stride_k_head + offs_d[None, :]
    src_v = tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :]
    mask_h = offs_h < NUM_KV_HEADS
    k = _to_cache(tl.load(key_ptr + src_k, mask=mask), k_scale_ptr, offs_h, mask_h, QUANT, QMAX)
    v = _to_cache(tl.load(value_ptr + src_v, mask=mask), v_scale_ptr, offs_h, mask_h, QUANT, QMAX)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = skip
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # FP8 cache: [kvh] each
) -> None:
    """Store token ``t``'s K and V at slot ``slot_mapping[t]`` (one program per token).
    Only the first ``slot_mapping.shape[0]`` rows of ``key``/``value`` are read."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, _, page_size, num_kv_heads, head_dim = kv_cache.shape
    assert key.shape[0] >= num_tokens and value.shape[0] >= num_tokens
    assert key.stride(2) == 1 and value.stride(2) == 1 and kv_cache.stride(4) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_scale, v_scale, quant, qmax = _kv_scale_args(kv_cache, kv_scales, num_kv_heads)
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale,
        v_scale,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        PAGE_SIZE=page_size,
        QUANT=quant,
        QMAX=qmax,
        num_warps=4,
    )


@triton.jit
def _rotate_heads(
    x_ptr,  # this token's row of a [num_tokens, num_heads, head_dim] tensor
    stride_head,
    cos,  # [1, HALF_PAD] float32
    sin,  # [1, HALF_PAD] float32
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    offs_h = tl.arange(0, HEADS_PAD)
    offs_r = tl.arange(0, HALF_PAD)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_r[None, :] < HALF)
    ptr1 = x_ptr + offs_h[:, None] * stride_head + offs_r[None, :]  # first half
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    return o1, o2, ptr1, mask


@triton.jit
def _rope_and_cache_kernel(
    positions_ptr,  # [num_tokens] int64
    query_ptr,  # [num_tokens, num_heads, head_dim], rotated in place
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_ptr,  # [max_position, rotary_dim] float32: cat(cos, sin)
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens] int64
    k_scale_ptr,  # [num_kv_heads] float32 (QUANT)
    v_scale_ptr,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_cs,
    stride_c_blk,
    stride_c_tok,
    stride_c_head,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    USE_PDL: tl.constexpr,
    QUANT: tl.constexpr,
    QMAX: tl.constexpr,
):
    if USE_PDL:  # see kvasir.kernels.pdl: nothing is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok)
    offs_r = tl.arange(0, HALF_PAD)
    cs_row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(cs_row + offs_r, mask=offs_r < HALF, other=0.0)[None, :]
    sin = tl.load(cs_row + HALF + offs_r, mask=offs_r < HALF, other=0.0)[None, :]

    # -- q: rotate in place -------------------------------------------------------------
    q1, q2, q_ptr1, q_mask = _rotate_heads(
        query_ptr + tok * stride_q_tok, stride_q_head, cos, sin,
        NUM_HEADS, HEADS_PAD, HALF, HALF_PAD,
    )  # fmt: skip
    tl.store(q_ptr1, q1.to(query_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_ptr1 + HALF, q2.to(query_ptr.dtype.element_ty), mask=q_mask)

    # -- k: rotate in place ---------------------------------------------------------------
    k1, k2, k_ptr1, k_mask = _rotate_heads(
        key_ptr + tok * stride_k_tok, stride_k_head, cos, sin,
        NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD,
    )  # fmt: skip
    k1 = k1.to(key_ptr.dtype.element_ty)
    k2 = k2.to(key_ptr.dtype.element_ty)
    tl.store(k_ptr1, k1, mask=k_mask)
    tl.store(k_ptr1 + HALF, k2, mask=k_mask)

    # -- k, v: into the cache -------------------------------------------------------------
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot >= 0:
        dst_row = (slot // PAGE_SIZE) * stride_c_blk + (slot % PAGE_SIZE) * stride_c_tok
        offs_h = tl.arange(0, KV_HEADS_PAD)
        mh = offs_h < NUM_KV_HEADS
        # The cache holds the rotated key as rounded to the key's dtype (as unfused).
        c1 = _to_cache(k1, k_scale_ptr, offs_h, mh, QUANT, QMAX)
        c2 = _to_cache(k2, k_scale_ptr, offs_h, mh, QUANT, QMAX)
        dst1 = k_cache_ptr + dst_row + offs_h[:, None] * stride_c_head + offs_r[None, :]
        tl.store(dst1, c1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(dst1 + HALF, c2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask_h = offs_h[:, None] < NUM_KV_HEADS
        full_mask = mask_h & (offs_d[None, :] < HEAD_DIM)
        if 2 * HALF < HEAD_DIM:
            # Dims past rotary_dim pass through unrotated.
            pass_mask = mask_h & (offs_d[None, :] >= 2 * HALF) & (offs_d[None, :] < HEAD_DIM)
            k_src = key_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head
            k_pass = tl.load(k_src + offs_d[None, :], mask=pass_mask)
            k_pass = _to_cache(k_pass, k_scale_ptr, offs_h, mh, QUANT, QMAX)
            k_dst = k_cache_ptr + dst_row + offs_h[:, None] * stride_c_head + offs_d[None, :]
            tl.store(k_dst, k_pass.to(k_cache_ptr.dtype.element_ty), mask=pass_mask)
        v_src = value_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head
        v = tl.load(v_src + offs_d[None, :], mask=full_mask)
        v = _to_cache(v, v_scale_ptr, offs_h, mh, QUANT, QMAX)
        v_dst = v_cache_ptr + dst_row + offs_h[:, None] * stride_c_head + offs_d[None, :]
        tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=full_mask)


def rotary_embedding_and_cache(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32 = cat(cos, sin)
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = skip the cache write
    pdl: bool = True,  # launch with PDL where supported (kvasir.kernels.pdl)
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # FP8 cache: [kvh] each
) -> None:
    """Apply neox/HF RoPE to ``query`` and ``key`` in place and store the rotated key
    and ``value`` into ``kv_cache``, all in one kernel (one program per token).

    Positions must lie in ``[0, max_position)``. The attention backend's own cache write
    then has nothing left to do for these tokens (rewriting the same values is harmless).
    """
    num_tokens = positions.shape[0]
    if num_tokens == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, _, page_size, num_kv_heads, _ = kv_cache.shape
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, "bad rotary_dim"
    assert slot_mapping.shape[0] >= num_tokens
    for t in (query, key, value):
        assert t.stride(2) == 1, "head_dim must be contiguous"
    assert cos_sin_cache.stride(1) == 1 and kv_cache.stride(4) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    half = rotary_dim // 2
    heads_pad = triton.next_power_of_2(num_heads)
    pdl = use_pdl(query, pdl)
    k_scale, v_scale, quant, qmax = _kv_scale_args(kv_cache, kv_scales, num_kv_heads)
    _rope_and_cache_kernel[(num_tokens,)](
        positions,
        query,
        key,
        value,
        cos_sin_cache,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale,
        v_scale,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=heads_pad,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        PAGE_SIZE=page_size,
        USE_PDL=pdl,
        QUANT=quant,
        QMAX=qmax,
        num_warps=4 if heads_pad * head_dim <= 4096 else 8,
        **launch_kwargs(pdl),
    )


def reshape_and_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], in place
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = skip
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Plain-torch reference: a loop over tokens with explicit block/offset indexing."""
    page_size = kv_cache.shape[2]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k, v = key[t], value[t]  # [num_kv_heads, head_dim]
        if kv_scales is not None:
            k, v = (
                quantize_kv(k, kv_scales[0], kv_cache.dtype),
                quantize_kv(v, kv_scales[1], kv_cache.dtype),
            )
        kv_cache[0, slot // page_size, slot % page_size] = k.to(kv_cache.dtype)
        kv_cache[1, slot // page_size, slot % page_size] = v.to(kv_cache.dtype)


def quantize_kv(
    x: torch.Tensor,  # [..., num_kv_heads, head_dim]
    scale: torch.Tensor,  # [num_kv_heads] float32
    dtype: torch.dtype,  # an FP8 dtype
) -> torch.Tensor:  # x / scale, clamped, in ``dtype``
    m = torch.finfo(dtype).max
    return (x.float() / scale[:, None]).clamp(-m, m).to(dtype)


def dequantize_kv(
    x: torch.Tensor,  # [..., num_kv_heads, head_dim] FP8
    scale: torch.Tensor,  # [num_kv_heads] float32
) -> torch.Tensor:  # float32
    return x.float() * scale[:, None]


def rotary_embedding_ref(
    positions: torch.Tensor,  # [num_tokens] int64
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] = cat(cos, sin)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], x's dtype
    """Plain-torch reference of the neox/HF rotation in float32 (HF's rotate_half form)."""
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [num_tokens, rot/2]
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]  # HF layout: [num_tokens, 1, rot]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]
    rot = x[..., :rotary_dim].float()
    half = rotary_dim // 2
    rotate_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = (rot * cos + rotate_half * sin).to(x.dtype)
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)


__all__ = [
    "FP8_KV_DTYPES",
    "dequantize_kv",
    "quantize_kv",
    "reshape_and_cache",
    "reshape_and_cache_ref",
    "rotary_embedding_and_cache",
    "rotary_embedding_ref",
]
