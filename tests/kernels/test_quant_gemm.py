"""FP8 / INT8 GEMV and GEMM (weight-only and W8A8) against the plain-torch reference that
dequantises first, with per-channel and 128 x 128 block weight scales."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import DEVICE, ON_GPU, rel_err

from kvasir.kernels.quant_gemm import quant_matmul, quant_matmul_ref, w8_gemv
from kvasir.quantization.utils import quantize_activation, quantize_weight

FP8 = torch.float8_e4m3fn
# (N, K): ragged N and K, one output row, K below a tile, a block-scale edge (N, K not
# multiples of 128).
SHAPES = [(40, 96), (1, 576), (140, 260), (17, 8)]
GPU_SHAPES = [(6144, 4096), (4096, 14336)] if ON_GPU else []
ACT_DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _weights(n: int, k: int, qdtype: torch.dtype, strategy: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    q, s = quantize_weight(w, qdtype, strategy)
    return q.to(DEVICE), s.to(DEVICE), w


@pytest.mark.parametrize("qdtype", [FP8, torch.int8])
@pytest.mark.parametrize("strategy", ["channel", "tensor", "block"])
@pytest.mark.parametrize("shape", SHAPES + GPU_SHAPES)
def test_w8_gemv_matches_dequantised_reference(qdtype, strategy, shape) -> None:
    n, k = shape
    q, s, _ = _weights(n, k, qdtype, strategy)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, k, generator=g).to(DEVICE, ACT_DTYPE)
    bias = torch.randn(n, generator=g).to(DEVICE, ACT_DTYPE) if n % 2 == 0 else None
    y = w8_gemv(x, q, s, bias)
    ref = quant_matmul_ref(x, q, s, bias=bias)
    assert y.shape == (1, n) and y.dtype == ACT_DTYPE
    assert rel_err(y, ref) < (1e-5 if ACT_DTYPE == torch.float32 else 1e-2)


@pytest.mark.parametrize("qdtype", [FP8, torch.int8])
@pytest.mark.parametrize("strategy", ["channel", "block"])
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("shape", [(40, 96), (140, 260)] + GPU_SHAPES)
def test_weight_only_gemm(qdtype, strategy, m, shape) -> None:
    n, k = shape
    q, s, _ = _weights(n, k, qdtype, strategy)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).to(DEVICE, ACT_DTYPE)
    y = quant_matmul(x, q, s)
    assert y.shape == (m, n) and y.dtype == ACT_DTYPE
    tol = 1e-5 if ACT_DTYPE == torch.float32 else 1e-2
    assert rel_err(y, quant_matmul_ref(x, q, s)) < tol


W8A8_CASES = [(torch.int8, "channel", "token")]
if ON_GPU and torch.cuda.get_device_capability() >= (8, 9):
    W8A8_CASES += [(FP8, "channel", "token"), (FP8, "block", "group")]


@pytest.mark.parametrize("qdtype,strategy,act", W8A8_CASES)
@pytest.mark.parametrize("m", [1, 7, 40])
@pytest.mark.parametrize("shape", [(40, 96), (140, 260)] + GPU_SHAPES)
def test_w8a8_gemm(qdtype, strategy, act, m, shape) -> None:
    n, k = shape
    q, s, w = _weights(n, k, qdtype, strategy)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    xq, xs = quantize_activation(x, qdtype, act)
    y = quant_matmul(xq, q, s, xs, out_dtype=torch.float32)
    ref = quant_matmul_ref(xq, q, s, xs, out_dtype=torch.float32)
    # INT8 dots are exact in int32; Hopper's FP8 tensor cores accumulate with fewer
    # bits than float32 (measured 1.1e-4 on the H200).
    assert rel_err(y, ref) < (1e-5 if qdtype == torch.int8 else 1e-3)
    # And the whole W8A8 product stays within 8-bit error of the float one.
    exact = x.double().cpu() @ w.double().T
    assert rel_err(y, exact) < (0.02 if qdtype == torch.int8 else 0.08)
