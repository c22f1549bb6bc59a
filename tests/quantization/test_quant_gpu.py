"""The GPU paths of ``W8LinearMethod`` (``torch._scaled_mm`` FP8 W8A8 with the FP8
GEMV at batch 1, the Triton INT8 W8A8 and FP8 block-scale GEMMs) against the
dequantise-first reference, through real layers. CUDA only (the CPU paths are covered
by the checkpoint and accuracy tests; the kernels by tests/kernels/test_quant_gemm.py
under the interpreter)."""

from __future__ import annotations

import pytest
import torch

from kvasir.attention.backend import get_backend_cls
from kvasir.config import KernelConfig
from kvasir.distributed.parallel_state import single_process_state
from kvasir.kernels.quant_gemm import quant_matmul_ref
from kvasir.layers.context import LayerContext
from kvasir.layers.linear import ReplicatedLinear
from kvasir.quantization.schemes import Fp8Config, W8A8Int8Config, W8Config
from kvasir.quantization.utils import FP8_E4M3, quantize_activation
from kvasir.quantization.w8_linear import W8Scheme

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = torch.device("cuda")
FP8_UNITS = torch.cuda.get_device_capability() >= (8, 9)


def _layer(
    config: W8Config, n: int, k: int, seed: int = 0
) -> tuple[ReplicatedLinear, torch.Tensor]:
    ctx = LayerContext(
        get_backend_cls("triton"), torch.bfloat16, KernelConfig(), single_process_state(DEV),
        quant_config=config,
    )  # fmt: skip
    with torch.device(DEV):
        layer = ReplicatedLinear(k, n, True, ctx, prefix="model.layers.0.mlp.down_proj")
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV, torch.bfloat16)
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.data.copy_(torch.randn(n, generator=g).to(DEV, torch.bfloat16))
    layer.method.process_weights_after_loading(layer)
    return layer, w


CASES = [("w8a8", W8A8Int8Config.online(DEV), "triton-w8a8")]
if FP8_UNITS:
    CASES += [
        ("fp8", Fp8Config.online(DEV), "scaled_mm"),
        ("fp8-block", Fp8Config(W8Scheme(FP8_E4M3, "block", "group"), DEV), "triton-w8a8"),
    ]
else:
    CASES += [("fp8", Fp8Config.online(DEV), "triton-weight-only")]


@pytest.mark.parametrize("name,config,path", CASES)
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 640)])
def test_gpu_path_matches_dequantised_reference(name, config, path, m, shape) -> None:
    n, k = shape
    layer, w = _layer(config, n, k)
    assert layer.method.path == path
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    y = layer(x)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    s = layer.method.scheme
    batch1_weight_only = path == "scaled_mm" and m == 1  # the FP8 GEMV
    if s.w8a8 and not batch1_weight_only:
        xq, xs = quantize_activation(x, s.weight_dtype, s.act_strategy)
        ref = quant_matmul_ref(xq, layer.weight, layer.weight_scale, xs, layer.bias,
                               torch.bfloat16)  # fmt: skip
    else:
        ref = quant_matmul_ref(x, layer.weight, layer.weight_scale, bias=layer.bias)
    err = ((y.double() - ref.double().to(DEV)).norm() / ref.double().norm()).item()
    assert err < 1e-2, f"{name} m={m}: {err}"
    exact = torch.nn.functional.linear(x.double(), w.double(), layer.bias.double())
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.08


@pytest.mark.parametrize("qname", ["fp8", "int8"])
def test_batch1_gemv_and_fused_silu_mul(qname) -> None:
    """At one row the 8-bit method runs the fused GEMV (one byte per weight, row scales)
    and fuses SiLU-and-mul into gate_up, as the unquantised method does."""
    from kvasir.layers.linear import MergedColumnParallelLinear
    from kvasir.quantization.schemes import Int8Config

    config = Fp8Config.online(DEV) if qname == "fp8" else Int8Config.online(DEV)
    ctx = LayerContext(
        get_backend_cls("triton"), torch.bfloat16, KernelConfig(), single_process_state(DEV),
        quant_config=config,
    )  # fmt: skip
    d, k = 1536, 1024
    with torch.device(DEV):
        layer = MergedColumnParallelLinear(
            k, [d, d], False, ctx, prefix="model.layers.0.mlp.gate_up_proj"
        )
    g = torch.Generator().manual_seed(3)
    for shard in (0, 1):
        w = (torch.randn(d, k, generator=g) / k**0.5).to(DEV, torch.bfloat16)
        layer.weight.weight_loader(layer.weight, w, shard)
    layer.method.process_weights_after_loading(layer)
    x = torch.randn(1, k, generator=g).to(DEV, torch.bfloat16)
    fused = layer.method.apply_silu_mul(layer, x)
    assert fused is not None and fused.shape == (1, d)
    full = quant_matmul_ref(x, layer.weight, layer.weight_scale).float()
    ref = torch.nn.functional.silu(full[:, :d]) * full[:, d:]
    err = ((fused.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 2e-2, err
    plain = layer(x)  # the unfused batch-1 GEMV
    err = ((plain.double() - full.double()).norm() / full.double().norm()).item()
    assert err < 1e-2, err
