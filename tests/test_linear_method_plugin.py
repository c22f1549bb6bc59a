"""A ``LinearMethod`` plugs into the model through ``LayerContext.quant_config`` alone:
a toy per-row int8 weight scheme for the MLP's down projections, chosen by the layers'
checkpoint names, against a plain-torch reference of the same dequantised weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvasir.attention.backend import get_backend_cls
from kvasir.config import ModelArchConfig, ModelConfig
from kvasir.layers.context import LayerContext
from kvasir.layers.linear import (
    LinearBase,
    LinearMethod,
    UnquantizedLinearMethod,
    set_weight_loader,
)
from kvasir.models.llama import LlamaForCausalLM
from kvasir.models.loader import load_arch_config, load_model, process_weights_after_loading
from kvasir.quantization import QuantizationConfig

BACKEND = get_backend_cls("torch")
ARCH = ModelArchConfig(("LlamaForCausalLM",), 128, 32, 48, 2, 4, 2, 8, max_position_embeddings=64)


class Int8RowMethod(LinearMethod):
    """Loads the float weight, then keeps int8 rows and one float scale per row."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, params_dtype):  # noqa: ANN001
        w = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        layer.register_parameter("weight", w)
        set_weight_loader(w, layer.weight_loader)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        w = layer.weight.data
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
        layer.qweight = torch.round(w / scale).to(torch.int8)  # [out, in]
        layer.scale = scale  # [out, 1]
        del layer.weight
        layer.register_parameter("weight", None)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None = None):  # noqa: ANN201
        return F.linear(x, layer.qweight.to(x.dtype) * layer.scale.to(x.dtype), bias)


class DownProjInt8(QuantizationConfig):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethod | None:
        self.seen.append(prefix)
        return Int8RowMethod() if prefix.endswith("mlp.down_proj") else None


def _build(state: dict[str, torch.Tensor], quant: QuantizationConfig | None) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ARCH, LayerContext(BACKEND, quant_config=quant))
    model.load_weights(state.items())
    process_weights_after_loading(model)
    return model.eval()


def test_quant_config_picks_methods_by_layer_name_without_touching_the_model() -> None:
    torch.manual_seed(0)
    shapes = LlamaForCausalLM(ARCH, LayerContext(BACKEND)).expected_weight_shapes()
    state = {
        n: torch.ones(s) if n.endswith("norm.weight") else torch.randn(s) * 0.2
        for n, s in shapes.items()
    }
    quant = DownProjInt8()
    ours, ref = _build(state, quant), _build(state, None)
    assert quant.seen == [
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ] + ["lm_head"]
    for i, layer in enumerate(ours.model.layers):
        assert isinstance(layer.mlp.down_proj.method, Int8RowMethod)
        assert isinstance(layer.self_attn.qkv_proj.method, UnquantizedLinearMethod)
        down = layer.mlp.down_proj
        dq = down.qweight.float() * down.scale  # what the int8 layer multiplies by
        assert (dq - state[f"model.layers.{i}.mlp.down_proj.weight"]).abs().max() < 0.01
        with torch.no_grad():  # the reference gets the dequantised weight: nothing else differs
            ref.model.layers[i].mlp.down_proj.weight.copy_(dq)
    process_weights_after_loading(ref)
    x = torch.randn(5, 32)
    with torch.no_grad():
        for a, b in zip(ours.model.layers, ref.model.layers, strict=True):
            torch.testing.assert_close(a.mlp(x), b.mlp(x), rtol=1e-5, atol=1e-5)


def test_load_model_takes_the_quant_config() -> None:
    mc = ModelConfig(model="tiny-llama", load_format="dummy")
    model = load_model(
        mc, load_arch_config(mc), BACKEND, torch.float32, torch.device("cpu"),
        quant_config=DownProjInt8(),
    )  # fmt: skip
    assert all(isinstance(la.mlp.down_proj.method, Int8RowMethod) for la in model.model.layers)
