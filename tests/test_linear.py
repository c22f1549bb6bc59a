"""The CPU float32 linear path (oneDNN on prepacked weights) against ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvasir.layers.linear as linear_mod
from kvasir.layers.linear import linear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("m", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_matches_f_linear(m: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m)
    w = torch.randn(96, 72, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(m, 72, generator=g)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    y = linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (m, 96)
    assert _rel(y.double(), ref) < 1e-6  # float32 accuracy, not bf16 (~1e-3)


def test_cpu_linear_edge_shapes_and_dtypes() -> None:
    w = torch.randn(16, 8)
    assert linear(torch.randn(0, 8), w).shape == (0, 16)
    xt = torch.randn(8, 5).t()  # non-contiguous rows
    assert _rel(linear(xt, w), F.linear(xt, w)) < 1e-6
    xb, wb = torch.randn(4, 8, dtype=torch.bfloat16), w.bfloat16()
    assert torch.equal(linear(xb, wb), F.linear(xb, wb))  # bf16: F.linear as is


def test_cpu_packed_weight_follows_in_place_updates() -> None:
    """The packed copy is remade when the weight changes in place (as a loader or a
    test writing weights after the first forward would do)."""
    w = torch.randn(32, 24)
    x = torch.randn(3, 24)
    linear(x, w)
    with torch.no_grad():
        w.mul_(-2.0)
    assert _rel(linear(x, w), F.linear(x, w)) < 1e-6


def test_cpu_packed_switch_off_uses_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_mod, "CPU_PACKED_ENABLED", False)
    w, x = torch.randn(8, 8), torch.randn(2, 8)
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_cpu_gate_up_silu_mul_matches_unfused() -> None:
    from kvasir.layers.linear import cpu_gate_up_silu_mul

    g = torch.Generator().manual_seed(5)
    w = torch.randn(2 * 40, 24, generator=g)  # [gate; up]
    x = torch.randn(100, 24, generator=g)
    ref = F.linear(x.double(), w.double())
    ref = F.silu(ref[:, :40]) * ref[:, 40:]
    y = cpu_gate_up_silu_mul(x, w)
    assert y is not None and y.shape == (100, 40) and y.dtype == torch.float32
    assert _rel(y.double(), ref) < 1e-6
    with torch.no_grad():
        w[:40].neg_()  # the packed halves follow in-place updates too
    ref = F.linear(x.double(), w.double())
    assert _rel(cpu_gate_up_silu_mul(x, w).double(), F.silu(ref[:, :40]) * ref[:, 40:]) < 1e-6
    # Few rows, other dtypes: not taken (the caller runs linear + SiLU-and-mul).
    assert cpu_gate_up_silu_mul(x[:8], w) is None
    assert cpu_gate_up_silu_mul(x.bfloat16(), w.bfloat16()) is None
