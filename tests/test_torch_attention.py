"""Torch attention backend vs. a float64 per-request attention over contiguous K/V."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from model_utils import build_attn_metadata

from kvasir.attention.backend import get_backend_cls
from kvasir.attention.torch_backend import TorchAttentionBackend, paged_attention_ref


def naive_attention(
    q: torch.Tensor,  # [q_len, num_heads, head_dim]
    k: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    v: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:  # [q_len, num_heads, head_dim] float64
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    out = torch.empty(q_len, num_heads, q.shape[-1], dtype=torch.float64)
    for i in range(q_len):
        pos = seq_len - q_len + i
        for h in range(num_heads):
            s = (k[: pos + 1, h] @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, dim=0) @ v[: pos + 1, h]
    return out


class Case(NamedTuple):
    out: torch.Tensor  # backend output
    ref: torch.Tensor  # float64 reference
    kv_cache: torch.Tensor  # after the step
    query: torch.Tensor
    metadata: object


def run_case(
    reqs: list[tuple[int, int]],  # (num_computed_tokens, num_new_tokens) per request
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    num_padding_tokens: int = 0,
    seed: int = 0,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil((c + n) / block_size) for c, n in reqs) + 3
    # Shuffled block ids: requests' blocks are neither contiguous nor in order.
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables, full_kv = [], []
    for c, n in reqs:
        nb = math.ceil((c + n) / block_size)
        block_tables.append(perm[:nb])
        perm = perm[nb:]
        k = torch.randn(c + n, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(c + n, num_kv_heads, head_dim, generator=gen)
        full_kv.append((k.to(dtype), v.to(dtype)))
    # Never-written slots hold NaN: reading one would poison the output.
    kv_cache = torch.full(
        (2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype
    )
    for table, (c, _), (k, v) in zip(block_tables, reqs, full_kv, strict=True):
        for p in range(c):  # the prefix computed by earlier steps
            kv_cache[0, table[p // block_size], p % block_size] = k[p]
            kv_cache[1, table[p // block_size], p % block_size] = v[p]
    new = [n for _, n in reqs]
    md = build_attn_metadata(block_tables, [c for c, _ in reqs], new, block_size, device)
    num_tokens = sum(new)
    q = torch.randn(num_tokens + num_padding_tokens, num_heads, head_dim, generator=gen).to(dtype)
    key = torch.cat([k[c:] for (c, _), (k, _) in zip(reqs, full_kv, strict=True)])
    value = torch.cat([v[c:] for (c, _), (_, v) in zip(reqs, full_kv, strict=True)])
    pad = torch.zeros(num_padding_tokens, num_kv_heads, head_dim, dtype=dtype)
    key, value = torch.cat([key, pad]), torch.cat([value, pad])
    scale = head_dim**-0.5
    backend = TorchAttentionBackend(num_heads, head_dim, num_kv_heads, scale)
    kv_dev = kv_cache.to(device)
    out = backend.forward(q.to(device), key.to(device), value.to(device), kv_dev, md).cpu()
    assert out.dtype == dtype and out.shape == q.shape
    ref = []
    start = 0
    for (_, n), (k, v) in zip(reqs, full_kv, strict=True):
        ref.append(naive_attention(q[start : start + n], k, v, scale))
        start += n
    ref.append(torch.zeros(num_padding_tokens, num_heads, head_dim, dtype=torch.float64))
    return Case(out, torch.cat(ref), kv_dev.cpu(), q, md)


GQA_SHAPES = [(2, 2), (8, 2), (16, 2), (4, 1)]  # (num_heads, num_kv_heads): ratios 1/4/8/MQA


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    # prefill, decode, extend across block boundaries, prefill of exactly one block
    reqs = [(0, 5), (7, 1), (13, 9), (0, 16), (31, 2)]
    out, ref, *_ = run_case(reqs, num_heads, num_kv_heads, head_dim, block_size=16)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_decode_batch_split_into_length_groups() -> None:
    """Very different context lengths: the decode batch runs as several length groups
    (less padding), with the same result as the reference."""
    from kvasir.attention.torch_backend import _length_groups

    lens = [3, 700, 5, 9, 650, 2, 40, 8, 720, 6, 4, 30, 690, 7, 1, 12]
    groups = _length_groups([c + 1 for c in lens])
    assert len(groups) > 1
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))  # each row once
    out, ref, *_ = run_case([(c, 1) for c in lens], 8, 2, 64, block_size=16)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert _length_groups([100] * 16) == [list(range(16))]  # nothing to gain


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA_SHAPES)
def test_speculative_verify_batch(num_heads: int, num_kv_heads: int) -> None:
    # 1 + k query tokens over cached prefixes of very different lengths (several
    # length groups, queries padded to the longest), beside decodes, a fresh prompt and
    # a query just past the batched limit (looped).
    lens = [3, 700, 5, 9, 650, 2, 40, 8, 720, 6, 4, 30, 690, 7, 1, 12]
    reqs = [(c, 1 + i % 5) for i, c in enumerate(lens)] + [(0, 6), (50, 18), (17, 17)]
    out, ref, *_ = run_case(reqs, num_heads, num_kv_heads, 64, block_size=16)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA_SHAPES)
def test_mixed_batch_with_several_decode_rows(num_heads: int, num_kv_heads: int) -> None:
    # Decode rows (batched together) interleaved with prefill chunks (looped).
    reqs = [(7, 1), (0, 5), (20, 1), (13, 9), (33, 1), (15, 1)]
    out, ref, *_ = run_case(reqs, num_heads, num_kv_heads, 64, block_size=16)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_only_batch(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    # seq_lens 1, a block end, a block start, long and ragged
    reqs = [(0, 1), (15, 1), (16, 1), (40, 1), (3, 1)]
    out, ref, *_ = run_case(reqs, num_heads, num_kv_heads, head_dim, block_size=16)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reqs", [[(0, 1)], [(5, 1)], [(0, 7)], [(4, 4), (0, 1)]])
@pytest.mark.parametrize("block_size", [1, 4])
def test_small_cases_and_block_sizes(reqs: list[tuple[int, int]], block_size: int) -> None:
    out, ref, *_ = run_case(reqs, 4, 2, 64, block_size=block_size)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_kv_written_at_slots_and_padding_ignored() -> None:
    reqs = [(3, 2), (0, 6)]
    block_size = 4
    out, ref, kv_cache, *_ = run_case(reqs, 4, 2, 64, block_size, num_padding_tokens=3, seed=3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[-3:] == 0)
    # exactly the slots of the 3 + 2 + 6 real tokens are written; padding wrote nothing
    written = ~torch.isnan(kv_cache[0, :, :, 0, 0])
    assert int(written.sum()) == 11


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype: torch.dtype) -> None:
    out, ref, *_ = run_case([(9, 1), (0, 6), (20, 3)], 8, 2, 64, block_size=16, dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_paged_attention_ref_reads_existing_cache() -> None:
    # paged_attention_ref assumes the step's K/V are already in the cache (as after the
    # backend's write); on that cache it must reproduce the reference.
    case = run_case([(6, 3), (0, 4)], 4, 2, 64, block_size=4, seed=7)
    out = paged_attention_ref(case.query, case.kv_cache, case.metadata, 64**-0.5)
    torch.testing.assert_close(out.double(), case.ref, atol=1e-5, rtol=1e-5)


def test_registered_as_torch() -> None:
    assert get_backend_cls("torch") is TorchAttentionBackend
    assert TorchAttentionBackend.name == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(dtype: torch.dtype) -> None:
    reqs = [(0, 5), (7, 1), (13, 9), (0, 16), (31, 2)]
    out, ref, *_ = run_case(reqs, 16, 2, 128, block_size=16, dtype=dtype, device="cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    out, ref, *_ = run_case([(15, 1), (40, 1)], 16, 2, 128, 16, dtype=dtype, device="cuda")
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
