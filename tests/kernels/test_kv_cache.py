"""Cache write and fused RoPE + cache write against plain-torch references."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import DEVICE, ON_GPU

from kvasir.kernels.kv_cache import (
    reshape_and_cache,
    reshape_and_cache_ref,
    rotary_embedding_and_cache,
    rotary_embedding_ref,
)


def _cos_sin_cache(max_pos: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    # The format kvasir.layers.rotary_embedding builds: cat(cos, sin), [max_pos, rot].
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _inputs(num_tokens, num_heads, num_kv_heads, head_dim, num_blocks, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # K/V as strided views of one fused qkv projection, as the model produces them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g)
    qkv = qkv.to(DEVICE, dtype)
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[1] = -1  # a padding token: must be skipped
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    return q, k, v, slots.to(DEVICE), cache.to(DEVICE, dtype)


@pytest.mark.parametrize("shape", [(4, 1, 64), (8, 2, 128), (9, 3, 64)])
@pytest.mark.parametrize("block_size", [1, 16])
def test_reshape_and_cache(shape, block_size):
    num_heads, num_kv_heads, head_dim = shape
    q, k, v, slots, cache = _inputs(
        11, num_heads, num_kv_heads, head_dim, 8, block_size, torch.float32, 0
    )
    ref = cache.clone()
    reshape_and_cache(k, v, cache, slots)
    reshape_and_cache_ref(k, v, ref, slots)
    assert torch.equal(cache, ref)


@pytest.mark.parametrize("shape", [(4, 1, 64), (8, 2, 128), (9, 3, 64)])
@pytest.mark.parametrize("rotary_dim_frac", [1.0, 0.5])
def test_rotary_embedding_and_cache(shape, rotary_dim_frac):
    num_heads, num_kv_heads, head_dim = shape
    q, k, v, slots, cache = _inputs(7, num_heads, num_kv_heads, head_dim, 4, 16, torch.float32, 1)
    cos_sin = _cos_sin_cache(4096, int(head_dim * rotary_dim_frac)).to(DEVICE)
    positions = torch.tensor([0, 1, 5, 17, 100, 2047, 4095], device=DEVICE)
    q_ref = rotary_embedding_ref(positions, q, cos_sin)
    k_ref = rotary_embedding_ref(positions, k, cos_sin)
    cache_ref = cache.clone()
    reshape_and_cache_ref(k_ref, v, cache_ref, slots)
    rotary_embedding_and_cache(positions, q, k, v, cos_sin, cache, slots)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, cache_ref, rtol=1e-5, atol=1e-5)


def test_rotary_matches_layer_format():
    # The layer's own table and rotation agree with the kernel (the format contract).
    from kvasir.layers.rotary_embedding import RotaryEmbedding

    rope = RotaryEmbedding(64, 512, 10000.0)
    q, k, v, slots, cache = _inputs(5, 4, 2, 64, 4, 16, torch.float32, 2)
    positions = torch.tensor([3, 9, 0, 511, 77], device=DEVICE)
    cos_sin = rope.cos_sin_cache.to(DEVICE)
    q_ref, k_ref = rope.to(DEVICE)(positions, q.clone(), k.clone())
    rotary_embedding_and_cache(positions, q, k, v, cos_sin, cache, slots)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_rotary_and_cache_gpu_bf16():
    q, k, v, slots, cache = _inputs(4096, 32, 8, 128, 512, 16, torch.bfloat16, 3)
    cos_sin = _cos_sin_cache(8192, 128).to(DEVICE)
    positions = torch.randint(0, 8192, (4096,), device=DEVICE)
    q_ref = rotary_embedding_ref(positions, q, cos_sin)
    k_ref = rotary_embedding_ref(positions, k, cos_sin)
    cache_ref = cache.clone()
    reshape_and_cache_ref(k_ref, v, cache_ref, slots)
    rotary_embedding_and_cache(positions, q, k, v, cos_sin, cache, slots)
    # Both round once from float32; FMA contraction may differ by one bf16 ulp.
    torch.testing.assert_close(q, q_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(cache, cache_ref, rtol=1e-2, atol=1e-2)
