"""Paged decode attention (GQA-grouped, split-K) against a float64 torch reference."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import ON_GPU, make_paged_batch, rel_err

from kvasir.kernels.decode_attention import (
    DecodeConfig,
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)

# (num_heads, num_kv_heads, head_dim): GQA ratios 1, 4 and 8; head dims 64 and 128.
SHAPES = [(4, 4, 64), (8, 2, 128), (8, 1, 64)]
# Small slices so that the interpreter's short contexts really split.
SMALL_SLICES = DecodeConfig(block_n=16, num_warps=4, num_stages=1, min_split_len=16)


def _run(seq_lens, num_heads, num_kv_heads, head_dim, block_size, num_splits, dtype,
         config=SMALL_SLICES, seed=0):  # fmt: skip
    b = make_paged_batch(
        [1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
        seed=seed,
    )  # fmt: skip
    md = b.metadata
    out = torch.full_like(b.query, float("nan"))  # every row must be written
    paged_decode_attention(
        b.query, b.kv_cache, md.block_table, md.seq_lens, scale=head_dim**-0.5,
        num_splits=num_splits, out=out, config=config,
    )  # fmt: skip
    ref = paged_decode_attention_ref(
        b.query, b.kv_cache, md.block_table, md.seq_lens, head_dim**-0.5
    )
    return out, ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_ragged(shape, num_splits):
    # A single token, one exactly filling a block, block-crossing and longer contexts.
    out, ref = _run([1, 16, 17, 45, 70], *shape, 16, num_splits, torch.float32)
    assert rel_err(out, ref) < 1e-5


def test_default_config_small_batches_use_short_slices():
    from kvasir.kernels.decode_attention import default_decode_config

    assert default_decode_config(128, 8, 132).min_split_len == 64  # batch 1, 8 KV heads
    assert default_decode_config(128, 256, 132) == DecodeConfig()  # bandwidth-bound
    assert default_decode_config(128) == DecodeConfig()


def test_decode_default_config():
    out, ref = _run([1, 16, 17, 130], 8, 2, 64, 16, None, torch.float32, config=None)
    assert rel_err(out, ref) < 1e-5


def test_decode_small_blocks_many_splits():
    # More splits than tiles for some requests: empty slices must weigh nothing.
    out, ref = _run([3, 33, 9], 8, 2, 64, 4, 8, torch.float32, seed=1)
    assert rel_err(out, ref) < 1e-5


def test_decode_min_split_len_leaves_slices_empty():
    cfg = DecodeConfig(block_n=16, num_warps=4, num_stages=1, min_split_len=32)
    out, ref = _run([5, 40, 100], 4, 2, 64, 16, 6, torch.float32, config=cfg)
    assert rel_err(out, ref) < 1e-5


def test_decode_zero_length_request_gives_zeros():
    # CUDA-graph padding rows have seq_len 0: defined output (zeros), no NaN.
    out, ref = _run([0, 20], 4, 2, 64, 16, 2, torch.float32)
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0]).cpu())
    assert rel_err(out[1], ref[1]) < 1e-5


def test_choose_num_splits_fills_the_gpu():
    assert choose_num_splits(32, 8, 132) == 3  # 768 programs for 132 SMs
    assert choose_num_splits(1, 8, 132) == 32  # capped
    assert choose_num_splits(512, 8, 132) == 1


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(32, 8, 128), (32, 32, 128), (16, 2, 64)])
@pytest.mark.parametrize("num_splits", [1, None])
def test_decode_gpu_bf16(shape, num_splits):
    g = torch.Generator().manual_seed(3)
    seq_lens = torch.randint(1, 3000, (24,), generator=g).tolist() + [1, 8192]
    out, ref = _run(seq_lens, *shape, 16, num_splits, torch.bfloat16, config=None)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_decode_gpu_fp32_is_not_tf32():
    out, ref = _run([1, 700, 2100], 8, 2, 128, 16, None, torch.float32, config=None)
    assert rel_err(out, ref) < 1e-5
