"""GGUF block formats kept packed (``kvasir.kernels.gguf``): the torch dequantiser of
every supported type equals the ``gguf`` package's reference ``dequantize`` bit for bit
on random blocks, and the Triton GEMM / GEMV (the 32-element block types) match the
dequantise-then-multiply reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from kvtest_utils import DEVICE, ON_GPU, rel_err

from kvasir.kernels.gemv import FUSE_NONE, FUSE_SILU_MUL_OUT
from kvasir.kernels.gguf import (
    PACKED_TYPES,
    TRITON_TYPES,
    dequantize_gguf,
    gguf_gemv,
    gguf_matmul,
    gguf_matmul_ref,
)

Q = GGMLQuantizationType
ACT_DTYPE = torch.bfloat16 if ON_GPU else torch.float32
TOL = 1e-2 if ON_GPU else 1e-5


def _random_blocks(kind, n: int, k: int, seed: int = 0) -> np.ndarray:
    """``[n, k / B * S]`` random bytes with every fp16 scale field made finite and
    small (random bytes would give NaN / inf scales)."""
    block, size = GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    scale_at = {
        Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
        Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
    }[kind]  # fmt: skip
    for at in scale_at:
        f = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16)
        raw[:, at : at + 2] = f.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def test_every_listed_type_is_supported() -> None:
    listed = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert {t.name for t in PACKED_TYPES} == listed


@pytest.mark.parametrize("kind", PACKED_TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_reference(kind) -> None:
    n, k = 3, 512
    raw = _random_blocks(kind, n, k)
    want = gguf_dequantize(raw, kind).astype(np.float32)  # [n, k]
    got = dequantize_gguf(torch.from_numpy(raw), kind, k)
    assert got.shape == (n, k)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


# (N, K): K of one and of several blocks, ragged N (K-quants: 256-element super-blocks).
SHAPES = [(40, 96), (17, 32), (72, 320)]
K_SHAPES = [(40, 256), (17, 768)]


def _shapes(kind):  # noqa: ANN001, ANN202
    return K_SHAPES if GGML_QUANT_SIZES[kind][0] == 256 else SHAPES


@pytest.mark.parametrize("kind", list(TRITON_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("shape", [0, 1])
def test_triton_matmul_matches_reference(kind, m, shape) -> None:
    n, k = _shapes(kind)[shape]
    w = torch.from_numpy(_random_blocks(kind, n, k, seed=n)).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, ACT_DTYPE)
    bias = torch.randn(n).to(DEVICE, ACT_DTYPE) if m == 7 else None
    y = gguf_matmul(x, w, kind, bias)
    assert y.shape == (m, n)
    assert rel_err(y, gguf_matmul_ref(x, w, kind, bias)) < TOL


@pytest.mark.parametrize("kind", list(TRITON_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("fusion", [FUSE_NONE, FUSE_SILU_MUL_OUT])
def test_triton_gemv_matches_reference(kind, fusion) -> None:
    n, k = 48, 160 if GGML_QUANT_SIZES[kind][0] == 32 else 512
    w = torch.from_numpy(_random_blocks(kind, 2 * n, k, seed=3)).to(DEVICE)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4)).to(DEVICE, ACT_DTYPE)
    y = gguf_gemv(x, w, kind, fusion=fusion)
    assert rel_err(y, gguf_matmul_ref(x, w, kind, fusion=fusion)) < TOL
