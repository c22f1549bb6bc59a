"""``UnquantizedLinearMethod`` on the CPU: the float32 path (oneDNN on the weight
prepacked by ``process_weights_after_loading``) against a float64 ``F.linear``; the
fallbacks (bf16, ``cpu_prepack=False``) against ``F.linear`` bit for bit; the fused
gate/up SiLU path against the unfused float64 computation.

The tensor-parallel shards of the layers are tested in test_linear_layers.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvasir.attention.backend import get_backend_cls
from kvasir.config import KernelConfig
from kvasir.layers.context import LayerContext
from kvasir.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from kvasir.models.loader import process_weights_after_loading

# Whether this torch can prepack at all (without oneDNN every CPU linear is F.linear).
HAVE_ONEDNN = torch.backends.mkldnn.is_available()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ctx(dtype: torch.dtype = torch.float32, **kernel: bool) -> LayerContext:
    return LayerContext(
        get_backend_cls("torch"), params_dtype=dtype, kernel_config=KernelConfig(**kernel)
    )


def _replicated(w: torch.Tensor, b: torch.Tensor | None = None, **kernel: bool) -> ReplicatedLinear:
    """A loaded ``ReplicatedLinear`` holding ``w`` ``[out, in]`` (and ``b``)."""
    layer = ReplicatedLinear(w.shape[1], w.shape[0], b is not None, _ctx(w.dtype, **kernel))
    layer.weight.weight_loader(layer.weight, w)
    if b is not None:
        layer.bias.weight_loader(layer.bias, b)
    process_weights_after_loading(layer)
    return layer


def _gate_up(gate: torch.Tensor, up: torch.Tensor) -> MergedColumnParallelLinear:
    """A loaded ``[gate; up]`` layer, each ``[d, in]``, loaded as shards 0 and 1."""
    d, k = gate.shape
    layer = MergedColumnParallelLinear(k, [d, d], False, _ctx(gate.dtype))
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    process_weights_after_loading(layer)
    return layer


def _silu_mul_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    x, gate, up = x.double(), gate.double(), up.double()
    return F.silu(F.linear(x, gate)) * F.linear(x, up)


@pytest.mark.parametrize("m", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_matches_f_linear(m: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m)
    w = torch.randn(96, 72, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(m, 72, generator=g)
    layer = _replicated(w, b)
    assert (layer.cpu_packed is not None) == HAVE_ONEDNN  # the path under test was taken
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (m, 96)
    assert _rel(y.double(), ref) < 1e-6  # float32 accuracy, not bf16 (~1e-3)


def test_cpu_linear_edge_shapes_and_dtypes() -> None:
    w = torch.randn(16, 8)
    layer = _replicated(w)
    assert layer(torch.randn(0, 8)).shape == (0, 16)
    xt = torch.randn(8, 5).t()  # non-contiguous rows
    assert _rel(layer(xt).double(), F.linear(xt.double(), w.double())) < 1e-6
    # bf16: no packed copy, F.linear as is.
    xb, wb = torch.randn(4, 8, dtype=torch.bfloat16), w.bfloat16()
    layer_b = _replicated(wb)
    assert layer_b.cpu_packed is None
    assert torch.equal(layer_b(xb), F.linear(xb, wb))


def test_cpu_prepack_off_uses_f_linear() -> None:
    w, b, x = torch.randn(8, 8), torch.randn(8), torch.randn(2, 8)
    layer = _replicated(w, b, cpu_prepack=False)
    assert layer.cpu_packed is None and layer.cpu_packed_halves is None
    assert torch.equal(layer(x), F.linear(x, w, b))


@pytest.mark.skipif(not HAVE_ONEDNN, reason="no oneDNN: nothing is prepacked")
def test_weights_changed_in_place_are_picked_up_after_processing_again() -> None:
    """The packed copy is made once, after loading: a weight written in place later is
    used once ``process_weights_after_loading`` runs again (as the docstring says)."""
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(
        _replicated(torch.randn(32, 24, generator=g)),
        _gate_up(*torch.randn(2, 40, 32, generator=g)),
    )
    lin, gate_up = model[0], model[1]
    x = torch.randn(100, 24, generator=g)
    before = lin(x)
    with torch.no_grad():
        lin.weight.mul_(-2.0)
        gate_up.weight[:40].neg_()  # the gate half
    # Until then the layer multiplies by the copy packed at load time.
    assert torch.equal(lin(x), before)
    process_weights_after_loading(model)
    assert _rel(lin(x).double(), F.linear(x.double(), lin.weight.double())) < 1e-6
    h = torch.randn(100, 32, generator=g)
    w = gate_up.weight
    y = gate_up.method.apply_silu_mul(gate_up, h)
    assert y is not None and _rel(y.double(), _silu_mul_ref(h, w[:40], w[40:])) < 1e-6


@pytest.mark.skipif(not HAVE_ONEDNN, reason="no oneDNN: no fused CPU path")
def test_cpu_gate_up_silu_mul_matches_unfused() -> None:
    g = torch.Generator().manual_seed(5)
    gate, up = torch.randn(2, 40, 24, generator=g)
    layer = _gate_up(gate, up)
    assert layer.cpu_packed_halves is not None
    assert torch.equal(layer.weight, torch.cat([gate, up]))
    x = torch.randn(100, 24, generator=g)
    ref = _silu_mul_ref(x, gate, up)
    y = layer.method.apply_silu_mul(layer, x)
    assert y is not None and y.shape == (100, 40) and y.dtype == torch.float32
    assert _rel(y.double(), ref) < 1e-6
    assert _rel(layer.silu_and_mul(x).double(), ref) < 1e-6
    # Few rows, other dtypes: not taken (the layer runs apply + SiLU-and-mul instead).
    assert layer.method.apply_silu_mul(layer, x[:63]) is None
    assert _rel(layer.silu_and_mul(x[:8]).double(), ref[:8]) < 1e-6
    layer_b = _gate_up(gate.bfloat16(), up.bfloat16())
    assert layer_b.method.apply_silu_mul(layer_b, x.bfloat16()) is None
