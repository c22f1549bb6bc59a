"""Paged prefill / extend attention over varlen batches against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import ON_GPU, make_paged_batch, rel_err

from kvasir.kernels.prefill_attention import (
    PrefillConfig,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)


def _run(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, config=None):
    b = make_paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    md = b.metadata
    out = torch.full_like(b.query, float("nan"))
    paged_prefill_attention(
        b.query, b.kv_cache, md.query_start_loc, md.seq_lens, md.block_table,
        scale=head_dim**-0.5, max_query_len=md.max_query_len, out=out, config=config,
    )  # fmt: skip
    ref = paged_prefill_attention_ref(
        b.query, b.kv_cache, md.query_start_loc, md.seq_lens, md.block_table, head_dim**-0.5
    )
    return out, ref


# (q_lens, seq_lens): fresh prompts, cached prefixes (seq_len > q_len), decode rows
# (q_len 1) mixed in, a single token, chunks crossing block boundaries.
BATCHES = [
    ([7, 20, 1], [7, 20, 1]),
    ([5, 1, 18, 1], [40, 33, 18, 2]),
    ([1], [1]),
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", [(4, 4, 64), (8, 2, 128), (8, 1, 64)])
def test_prefill_varlen(batch, shape):
    out, ref = _run(*batch, *shape, 16, torch.float32)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    "config",
    [PrefillConfig(32, 16, 4, 1), PrefillConfig(16, 32, 4, 1), PrefillConfig(16, 16, 4, 1)],
)
def test_prefill_tile_shapes_and_prefix(config):
    # Long cached prefix, q tiles straddling the diagonal, page size 8 != tile sizes.
    out, ref = _run([37, 2, 1], [70, 2, 50], 4, 2, 64, 8, torch.float32, config)
    assert rel_err(out, ref) < 1e-5


def test_prefill_head_dim_not_power_of_two():
    out, ref = _run([9, 4], [9, 12], 2, 1, 96, 16, torch.float32)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(32, 8, 128), (16, 16, 64), (32, 4, 128)])
def test_prefill_gpu_bf16(shape):
    q_lens = [1000, 1, 300, 1, 77, 2048]
    seq_lens = [1000, 900, 1500, 4000, 77, 3000]
    out, ref = _run(q_lens, seq_lens, *shape, 16, torch.bfloat16)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_prefill_gpu_fp32_is_not_tf32():
    out, ref = _run([300, 1], [500, 20], 8, 2, 128, 16, torch.float32)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("config", [PrefillConfig(16, 16, 4, 1), PrefillConfig(32, 16, 4, 1)])
def test_prefill_graph_padded_batch(config):
    """A CUDA-graph-shaped batch: requests with no query rows (q_len 0, seq_len 0)
    between and after the real ones, and trailing rows of no request, which stay
    untouched. Tiles are numbered flat across requests, so every request must still find
    its own rows."""
    q_lens, seq_lens = [3, 0, 33, 1, 0, 17, 0, 0], [40, 0, 33, 9, 0, 50, 0, 0]
    b = make_paged_batch(q_lens, seq_lens, 4, 2, 64, 8, torch.float32, pad_tokens=11)
    md = b.metadata
    out = torch.full_like(b.query, float("nan"))
    paged_prefill_attention(
        b.query, b.kv_cache, md.query_start_loc, md.seq_lens, md.block_table,
        scale=0.125, max_query_len=33, out=out, config=config,
    )  # fmt: skip
    ref = paged_prefill_attention_ref(
        b.query, b.kv_cache, md.query_start_loc, md.seq_lens, md.block_table, 0.125
    )
    n = sum(q_lens)
    assert rel_err(out[:n], ref[:n]) < 1e-5
    assert out[n:].isnan().all()
