"""The Triton backend against the torch reference backend, end to end: cache write,
then decode or prefill attention, on decode-only, prefill and mixed batches."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import ON_GPU, make_paged_batch, rel_err

from kvasir.attention.backend import get_backend_cls
from kvasir.layers.rotary_embedding import RotaryEmbedding


def _compare(q_lens, seq_lens, shape, block_size, dtype, pad_tokens=0, tol=1e-5):
    num_heads, num_kv_heads, head_dim = shape
    b = make_paged_batch(
        q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
        write_current=False, pad_tokens=pad_tokens,
    )  # fmt: skip
    scale = head_dim**-0.5
    backend = get_backend_cls("triton")(num_heads, head_dim, num_kv_heads, scale)
    ref_backend = get_backend_cls("torch")(num_heads, head_dim, num_kv_heads, scale)
    cache, ref_cache = b.kv_cache.clone(), b.kv_cache.clone()
    out = backend.forward(b.query, b.key, b.value, cache, b.metadata)
    ref = ref_backend.forward(b.query, b.key, b.value, ref_cache, b.metadata)
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0, equal_nan=True)
    assert out.dtype == b.query.dtype and out.shape == b.query.shape
    assert rel_err(out, ref) < tol
    if pad_tokens:
        assert not bool(out[-pad_tokens:].any())


@pytest.mark.parametrize("shape", [(4, 4, 64), (8, 2, 128), (8, 1, 64)])
def test_backend_decode(shape):
    _compare([1, 1, 1, 1], [1, 17, 40, 64], shape, 16, torch.float32, pad_tokens=2)


@pytest.mark.parametrize("shape", [(4, 4, 64), (8, 1, 128)])
def test_backend_mixed_prefill_and_decode(shape):
    # A fresh prompt, a prefix-cache hit, two decode rows and a chunked-prefill chunk.
    _compare([9, 4, 1, 1, 12], [9, 30, 21, 5, 40], shape, 16, torch.float32, pad_tokens=1)


@pytest.mark.parametrize("rotary_dim", [None, 32])
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_backend_fused_rotary(rotary_dim, fused_qkv):
    """rotary=(positions, cos_sin_cache): the backend rotates q and k in place fused with
    the cache write; same cache and output as the torch rotary layer + torch backend.
    ``fused_qkv``: q/k/v are strided column slices of one projection output, as in the
    model."""
    num_heads, num_kv_heads, head_dim, bs = 8, 2, 64, 16
    q_lens, seq_lens = [9, 4, 1, 1, 12], [9, 30, 21, 5, 40]
    b = make_paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, bs,
                         torch.float32, write_current=False, pad_tokens=2)  # fmt: skip
    rope = RotaryEmbedding(head_dim, max_position_embeddings=64, base=10000.0,
                           rotary_dim=rotary_dim).to(b.query.device)  # fmt: skip
    pos = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens, strict=True)])
    positions = torch.cat([pos, torch.zeros(2, dtype=torch.long)]).to(b.query.device)
    scale = head_dim**-0.5
    n = b.query.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if fused_qkv:
        qkv = torch.cat([b.query.reshape(n, -1), b.key.reshape(n, -1), b.value.reshape(n, -1)],
                        dim=1)  # fmt: skip
        q, k, v = (t.view(n, -1, head_dim) for t in qkv.split([q_size, kv_size, kv_size], 1))
    else:
        q, k, v = b.query.clone(), b.key.clone(), b.value.clone()
    backend = get_backend_cls("triton")(num_heads, head_dim, num_kv_heads, scale)
    assert backend.fuses_rotary
    cache, ref_cache = b.kv_cache.clone(), b.kv_cache.clone()
    out = backend.forward(q, k, v, cache, b.metadata, (positions, rope.cos_sin_cache))
    rq, rk = rope(positions, b.query.reshape(n, -1), b.key.reshape(n, -1))
    ref = get_backend_cls("torch")(num_heads, head_dim, num_kv_heads, scale).forward(
        rq.view(n, num_heads, head_dim), rk.view(n, num_kv_heads, head_dim), b.value,
        ref_cache, b.metadata,
    )  # fmt: skip
    torch.testing.assert_close(cache, ref_cache, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(q[:-2], rq.view(n, num_heads, head_dim)[:-2], rtol=1e-6,
                               atol=1e-6)  # fmt: skip
    assert rel_err(out[:-2], ref[:-2]) < 1e-5
    assert not bool(out[-2:].any())


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "q_lens,seq_lens",
    [([1] * 32, [4096] * 16 + [1, 77] * 8), ([2000, 1, 1, 500], [2000, 3000, 17, 9000])],
)
def test_backend_gpu_bf16(q_lens, seq_lens):
    _compare(q_lens, seq_lens, (32, 8, 128), 16, torch.bfloat16, pad_tokens=3, tol=1e-2)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_backend_decode_cuda_graph_replay_with_longer_contexts():
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    capture = make_paged_batch([1] * 8, [5] * 8, num_heads, num_kv_heads, head_dim, 16,
                               torch.bfloat16, write_current=False)  # fmt: skip
    later = make_paged_batch([1] * 8, [3000, 1, 17, 4096, 999, 64, 65, 2500], num_heads,
                             num_kv_heads, head_dim, 16, torch.bfloat16, seed=1,
                             write_current=False)  # fmt: skip
    backend = get_backend_cls("triton")(num_heads, head_dim, num_kv_heads, head_dim**-0.5)
    # Static buffers sized for the later step; the capture step uses a prefix of them.
    md = capture.metadata
    static_cache = later.kv_cache.clone()
    md.block_table = torch.zeros_like(later.metadata.block_table)
    md.seq_lens = md.seq_lens.clone()
    md.slot_mapping = torch.full_like(md.slot_mapping, -1)  # capture writes nothing
    q, k, v = later.query.clone(), later.key.clone(), later.value.clone()
    backend.forward(q, k, v, static_cache, md)  # warm-up compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, static_cache, md)
    # Replay with the later step's contents copied into the same buffers.
    md.block_table.copy_(later.metadata.block_table)
    md.seq_lens.copy_(later.metadata.seq_lens)
    md.slot_mapping.copy_(later.metadata.slot_mapping)
    static_cache.copy_(later.kv_cache)
    graph.replay()
    torch.cuda.synchronize()
    ref_cache = later.kv_cache.clone()
    ref = get_backend_cls("torch")(num_heads, head_dim, num_kv_heads, head_dim**-0.5).forward(
        later.query, later.key, later.value, ref_cache, later.metadata
    )
    torch.testing.assert_close(static_cache, ref_cache, rtol=0, atol=0, equal_nan=True)
    assert rel_err(out, ref) < 1e-2
