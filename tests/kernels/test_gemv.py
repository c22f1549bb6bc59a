"""The single-row GEMV (optionally with SiLU-and-mul fused in) against the plain-torch
reference."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import DEVICE, ON_GPU, rel_err

from kvasir.kernels.gemv import (
    FUSE_NONE,
    FUSE_SILU_MUL_OUT,
    default_gemv_config,
    gemv,
    gemv_ref,
)

# (N, K): ragged N and K (not multiples of the tiles), a single output row, K < BLOCK_K.
CPU_SHAPES = [(40, 96), (1, 576), (1000, 1100), (17, 8)]
# Llama-3-8B's qkv, o, gate_up and down projections.
GPU_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)] if ON_GPU else []


@pytest.mark.parametrize("fusion", [FUSE_NONE, FUSE_SILU_MUL_OUT])
@pytest.mark.parametrize(
    "shape,dtype,bias",
    [(s, torch.float32, i % 2 == 0) for i, s in enumerate(CPU_SHAPES)]
    + [(s, torch.bfloat16, False) for s in GPU_SHAPES],
)
def test_gemv(fusion, shape, dtype, bias):
    n, k = shape
    if fusion == FUSE_SILU_MUL_OUT:
        n *= 2  # [gate; up]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, k, generator=g) * 2).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    x0 = x.clone()
    y = gemv(x, w, b, fusion)
    assert y.shape == (1, n // 2 if fusion == FUSE_SILU_MUL_OUT else n) and y.dtype == dtype
    assert rel_err(y, gemv_ref(x, w, b, fusion)) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(x, x0)  # input untouched


def test_gemv_config_override_and_bad_shapes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, generator=g).to(DEVICE)
    w = torch.randn(33, 64, generator=g).to(DEVICE)
    y = gemv(x, w, config=(8, 16, 1))  # several K iterations, a ragged last N tile
    assert rel_err(y, gemv_ref(x, w)) < 1e-5
    with pytest.raises(AssertionError):
        gemv(torch.cat([x, x]), w)  # one row only
    with pytest.raises(AssertionError):
        gemv(torch.cat([x, x], dim=1), w)  # K mismatch
    with pytest.raises(AssertionError):
        gemv(x, w, fusion=FUSE_SILU_MUL_OUT)  # [gate; up] has an even row count


def test_default_config_keeps_one_wave():
    # N / 8 programs just over one wave of ~4 per SM -> 16-row tiles (one wave).
    assert default_gemv_config(6144, 4096, 132) == (16, 1024, 4)
    assert default_gemv_config(4096, 4096, 132) == (8, 1024, 4)
    assert default_gemv_config(28672, 4096, 132) == (8, 1024, 4)
    assert default_gemv_config(40, 96, 132) == (8, 128, 4)
    # Under PDL the next kernel fills the last wave: 8-row tiles everywhere.
    assert default_gemv_config(6144, 4096, 132, pdl=True) == (8, 1024, 4)


@pytest.mark.skipif(not ON_GPU, reason="a weight of more than 2^31 elements (4.3 GB)")
def test_gemv_weight_past_int32_offsets():
    """Rows whose element offset passes 2^31 must read their own weights (the tile base
    is 64-bit), not a wrapped-around 32-bit offset's."""
    k = 4096
    n = 2**31 // k + 64  # the last 64 rows start past element 2^31
    w = torch.zeros(n, k, dtype=torch.bfloat16, device=DEVICE)
    w[-64:] = torch.randn(64, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    y = gemv(x, w)
    ref = (w[-64:].float() @ x[0].float())[None]
    assert rel_err(y[:, -64:], ref) < 1e-2
    # [gate; up]: the up half's last rows lie past 2^31 too.
    h = n // 2
    w[h - 64 : h] = torch.randn(64, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
    y = gemv(x, w, fusion=FUSE_SILU_MUL_OUT)
    g_ref = (w[h - 64 : h].float() @ x[0].float()).to(x.dtype).float()
    u_ref = (w[-64:].float() @ x[0].float()).to(x.dtype).float()
    assert rel_err(y[:, -64:], (torch.nn.functional.silu(g_ref) * u_ref)[None]) < 1e-2
    del w
    torch.cuda.empty_cache()


@pytest.mark.parametrize("fusion", [FUSE_NONE, FUSE_SILU_MUL_OUT])
@pytest.mark.parametrize("qdtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("shape", CPU_SHAPES[:2] + [(130, 300)] + GPU_SHAPES[:2])
def test_gemv_8bit_weights_with_row_scales(fusion, qdtype, shape):
    """8-bit weights with one float32 scale per row: against the reference on the
    dequantised weight (the quantised linear methods' batch-1 path)."""
    n, k = shape
    if fusion == FUSE_SILU_MUL_OUT:
        n *= 2
    g = torch.Generator().manual_seed(2)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g) / k**0.5
    qmax = 127.0 if qdtype == torch.int8 else 448.0
    scale = (w.abs().amax(1) / qmax).clamp_min(1e-12)
    q = w / scale[:, None]
    q = q.round().clamp(-127, 127).to(qdtype) if qdtype == torch.int8 else q.to(qdtype)
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if fusion == FUSE_NONE else None
    y = gemv(x, q, b, fusion, scale=scale)
    ref = gemv_ref(x, q, b, fusion, scale=scale)
    assert y.shape == ref.shape and y.dtype == dtype
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    # A 4-tuple config (num_stages) is taken too.
    y2 = gemv(x, q, b, fusion, config=(4, 64, 2, 2), scale=scale)
    assert rel_err(y2, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(AssertionError):
        gemv(x, q, b, fusion, scale=scale[:-1])  # one scale per row
    with pytest.raises(AssertionError):
        gemv(x, q.float().to(dtype), b, fusion, scale=scale)  # a scale needs 8-bit weights


def test_default_config_8bit_weights_take_wider_tiles():
    assert default_gemv_config(4096, 4096, 132, pdl=True, weight_bytes=1) == (8, 4096, 4)
    assert default_gemv_config(4096, 14336, 132, pdl=True, weight_bytes=1) == (8, 2048, 8)
    assert default_gemv_config(40, 96, 132, weight_bytes=1) == (8, 128, 4)
