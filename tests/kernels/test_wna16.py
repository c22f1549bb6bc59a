"""W4A16 / W8A16 GEMM and GEMV (``kvasir.kernels.wna16``) against the plain-torch
reference that dequantises first: 4 and 8 bits, group sizes giving an odd number of
groups and one group per column, explicit ``g_idx`` (unequal groups), bias, and the
fused SiLU-and-mul GEMV."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import DEVICE, ON_GPU, rel_err

from kvasir.kernels.gemv import FUSE_NONE, FUSE_SILU_MUL_OUT
from kvasir.kernels.wna16 import (
    dequantize_wna16,
    pack_along_k,
    unpack_along_k,
    wna16_gemv,
    wna16_matmul,
    wna16_matmul_ref,
)

ACT_DTYPE = torch.bfloat16 if ON_GPU else torch.float32
TOL = 1e-2 if ON_GPU else 1e-5


def _quantised(n: int, k: int, bits: int, group_size: int, seed: int = 0, g_idx=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    num_groups = -(-k // group_size) if g_idx is None else int(g_idx.max()) + 1
    scales = torch.rand(num_groups, n, generator=g) * 0.02 + 0.005
    zeros = torch.randint(0, 2**bits, (num_groups, n), generator=g).float()
    qweight = pack_along_k(q, bits)
    return q, [t.to(DEVICE) for t in (qweight, scales, zeros)]


def test_pack_unpack_round_trip_and_reference_dequant() -> None:
    # A hand-computed word: values 1..8 at nibbles 0..7 of one column.
    q = torch.arange(1, 9)[:, None]
    word = pack_along_k(q, 4)
    assert word.item() == int("87654321", 16) - 2**32  # 0x87654321 as int32
    assert torch.equal(unpack_along_k(word, 8, 4), q.int())
    qv, (qw, s, z) = _quantised(24, 40, 4, 16)  # 40 = 5 words, 3 groups (last partial)
    assert torch.equal(unpack_along_k(qw.cpu(), 40, 4), qv.int())
    w = dequantize_wna16(qw.cpu(), s.cpu(), z.cpu(), 40, 16)
    g = torch.arange(40) // 16
    expect = ((qv.float() - z.cpu()[g]) * s.cpu()[g]).T
    assert torch.equal(w, expect)


# (N, K, group): odd group counts (K / group = 3, 5), one group per column (-1 -> K),
# K not a multiple of the tile.
CASES = [(40, 96, 32), (72, 320, 64), (17, 192, 192), (130, 136, 8)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("n,k,group", CASES)
def test_matmul_matches_reference(bits, m, n, k, group) -> None:
    _, (qw, s, z) = _quantised(n, k, bits, group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, ACT_DTYPE)
    bias = torch.randn(n).to(DEVICE, ACT_DTYPE) if m == 7 else None
    y = wna16_matmul(x, qw, s, z, group, bits, bias=bias)
    assert y.shape == (m, n) and y.dtype == ACT_DTYPE
    assert rel_err(y, wna16_matmul_ref(x, qw, s, z, group, bits, bias=bias)) < TOL


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fusion", [FUSE_NONE, FUSE_SILU_MUL_OUT])
@pytest.mark.parametrize("n,k,group", CASES)
def test_gemv_matches_reference(bits, fusion, n, k, group) -> None:
    _, (qw, s, z) = _quantised(2 * n, k, bits, group)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).to(DEVICE, ACT_DTYPE)
    bias = torch.randn(2 * n).to(DEVICE, ACT_DTYPE) if n % 2 == 0 else None
    y = wna16_gemv(x, qw, s, z, group, bits, bias=bias, fusion=fusion)
    ref = wna16_matmul_ref(x, qw, s, z, group, bits, bias=bias, fusion=fusion)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < TOL


def test_explicit_g_idx_unequal_groups() -> None:
    # Sorted but unequal groups (sizes 5, 40, 19): the kernel reads each row's group.
    k, n = 64, 48
    g_idx = torch.tensor([0] * 5 + [1] * 40 + [2] * 19, dtype=torch.int32)
    _, (qw, s, z) = _quantised(n, k, 4, 1, g_idx=g_idx)
    gi = g_idx.to(DEVICE)
    for m in (1, 9):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, ACT_DTYPE)
        ref = wna16_matmul_ref(x, qw, s, z, k, 4, g_idx=gi)
        assert rel_err(wna16_matmul(x, qw, s, z, k, 4, g_idx=gi), ref) < TOL
        if m == 1:
            assert rel_err(wna16_gemv(x, qw, s, z, k, 4, g_idx=gi), ref) < TOL
