"""RMSNorm, fused add + RMSNorm and SiLU-and-mul against plain-torch references."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import DEVICE, ON_GPU

from kvasir.kernels.activation import silu_and_mul, silu_and_mul_ref
from kvasir.kernels.rmsnorm import fused_add_rms_norm, rms_norm, rms_norm_ref

CPU_SHAPES = [(1, 64), (5, 576), (3, 1000)]
GPU_SHAPES = [(4096, 4096), (7, 8192), (513, 576)] if ON_GPU else []


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "shape,dtype",
    [(s, torch.float32) for s in CPU_SHAPES] + [(s, torch.bfloat16) for s in GPU_SHAPES],
)
def test_rms_norm(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    r = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(shape[1], generator=g)).to(DEVICE, dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **_tol(dtype))
    out, res = fused_add_rms_norm(x, r, w, 1e-5)
    out_ref, res_ref = rms_norm_ref(x, w, 1e-5, residual=r)
    assert torch.equal(res, res_ref)  # the add rounds exactly as torch's
    torch.testing.assert_close(out, out_ref, **_tol(dtype))


def test_fused_add_rms_norm_in_place():
    x = torch.randn(4, 128, device=DEVICE)
    r = torch.randn(4, 128, device=DEVICE)
    w = torch.rand(128, device=DEVICE)
    out_ref, res_ref = rms_norm_ref(x.clone(), w, 1e-6, residual=r.clone())
    fused_add_rms_norm(x, r, w, 1e-6, out=x, residual_out=r)  # vLLM's in-place form
    torch.testing.assert_close(x, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, res_ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape,dtype",
    [((3, 2 * 96), torch.float32), ((2, 2 * 1536), torch.float32)]
    + [((s[0], 2 * s[1]), torch.bfloat16) for s in GPU_SHAPES],
)
def test_silu_and_mul(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 4).to(DEVICE, dtype)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **_tol(dtype))
