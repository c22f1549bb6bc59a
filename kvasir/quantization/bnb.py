"""bitsandbytes 4-bit weights (NF4 / FP4, blocks of 64, double-quantised absmax): the
QLoRA base format (``kvasir.kernels.nf4``).

* ``--quantization bitsandbytes``: a float checkpoint's linear weights quantised to NF4
  at load (the float copy dropped);
* checkpoints HF transformers wrote with ``BitsAndBytesConfig(load_in_4bit=True)``
  (``quant_method: "bitsandbytes"``): each quantised ``<module>.weight`` is the packed
  uint8 data, with ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map`` and ``weight.quant_state.bitsandbytes__<type>`` (its JSON:
  shape, blocksize, nested offset) beside it. ``transform_checkpoint`` renames them to
  the method's parameters; ``quant_loader`` loads them and gives the model a shape-only
  weight.

Paths: CUDA: the Triton dequantising GEMM / GEMV; CPU: the torch reference (each call
dequantises). The layer's ``nf4_shards`` (one ``NF4Weight`` per fused part, in output
order) is what a QLoRA wrapper reads for the base weight.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvasir.kernels.nf4 import BLOCK, NESTED_BLOCK, NF4Weight, dequantize_nf4, quantize_nf4
from kvasir.layers.linear import LinearBase, LinearMethod, set_weight_loader
from kvasir.quantization import QuantizationConfig, register_quantization_config
from kvasir.quantization.schemes import layer_matches, name_matcher
from kvasir.quantization.wna16_linear import _shard_ids

# checkpoint suffix (after "<module>.weight") -> the method's parameter
_CKPT_LEAVES = {
    "": "bnb_weight",
    ".absmax": "bnb_absmax",
    ".quant_map": "bnb_quant_map",
    ".nested_absmax": "bnb_nested_absmax",
    ".nested_quant_map": "bnb_nested_quant_map",
}
_STATE_PREFIX = ".quant_state.bitsandbytes__"
QUANT_TYPES = ("nf4", "fp4")


class BnB4LinearMethod(LinearMethod):
    def __init__(self, quant_type: str, prequantized: bool, device: torch.device) -> None:
        self.quant_type = quant_type
        self.prequantized = prequantized
        self.device = device

    def create_weights(
        self,
        layer: LinearBase,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None:
        if layer.tp_size > 1:
            raise ValueError(f"{layer.prefix}: bitsandbytes with tensor_parallel_size > 1 is "
                             "not supported yet")  # fmt: skip
        n, k = sum(output_partition_sizes), input_size_per_partition
        if not self.prequantized:
            weight = nn.Parameter(torch.empty(n, k, dtype=params_dtype), requires_grad=False)
            layer.register_parameter("weight", weight)
            set_weight_loader(weight, layer.weight_loader)
            return
        layer.bnb_parts = {}  # type: ignore[assignment]  # shard -> {leaf: tensor}
        for leaf in (*_CKPT_LEAVES.values(), "bnb_quant_state"):
            p = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
            layer.register_parameter(leaf, p)
            set_weight_loader(p, functools.partial(self._load, layer, leaf))
        placeholder = nn.Parameter(torch.empty(n, k, dtype=params_dtype, device="meta"),
                                   requires_grad=False)  # fmt: skip
        layer.register_parameter("weight", placeholder)
        set_weight_loader(placeholder, _meta_only(layer))

    def _load(
        self, layer: LinearBase, leaf: str, param: nn.Parameter, loaded: torch.Tensor,
        shard_id: Any = None,
    ) -> None:  # fmt: skip
        layer.bnb_parts.setdefault(shard_id, {})[leaf] = loaded  # type: ignore[attr-defined]

    def _part(self, layer: LinearBase, shard: Any, rows: int) -> NF4Weight:
        where = layer.prefix + (f" (shard {shard})" if shard is not None else "")
        parts = layer.bnb_parts.get(shard, {})  # type: ignore[attr-defined]
        missing = [x for x in (*_CKPT_LEAVES.values(), "bnb_quant_state") if x not in parts]
        if missing:
            raise ValueError(f"{where}: the checkpoint lacks {missing} (bitsandbytes 4-bit "
                             "with double quantisation)")  # fmt: skip
        state = json.loads(bytes(parts["bnb_quant_state"].to(torch.uint8).tolist()).decode())
        k = layer.input_size_per_partition
        want = {"quant_type": self.quant_type, "blocksize": BLOCK,
                "nested_blocksize": NESTED_BLOCK, "shape": [rows, k]}  # fmt: skip
        for key, value in want.items():
            if state.get(key) != value:
                raise ValueError(f"{where}: quant_state {key} is {state.get(key)!r}, expected "
                                 f"{value!r}")  # fmt: skip
        packed = parts["bnb_weight"].reshape(-1)
        if packed.dtype != torch.uint8 or packed.numel() != -(-rows * k // 2):
            raise ValueError(f"{where}: packed weight has {packed.numel()} {packed.dtype} "
                             f"values, expected {-(-rows * k // 2)} uint8")  # fmt: skip
        blocks = -(-rows * k // BLOCK)
        aq = parts["bnb_absmax"].reshape(-1)
        if aq.dtype != torch.uint8 or aq.numel() != blocks:
            raise ValueError(f"{where}: absmax has {aq.numel()} {aq.dtype} values, expected "
                             f"{blocks} uint8 (double-quantised)")  # fmt: skip
        dev = self.device
        return NF4Weight(
            packed.to(dev).contiguous(), parts["bnb_quant_map"].float().to(dev), aq.to(dev),
            parts["bnb_nested_quant_map"].float().to(dev),
            parts["bnb_nested_absmax"].float().reshape(-1).to(dev),
            float(state["nested_offset"]), (rows, k),
        )  # fmt: skip

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if hasattr(layer, "nf4_shards") and not hasattr(layer, "bnb_parts"):
            return
        if not self.prequantized:
            from kvasir.kernels.nf4 import FP4_CODE, NF4_CODE

            code = NF4_CODE if self.quant_type == "nf4" else FP4_CODE
            # One quantisation per fused part, as a checkpoint holds them (its own absmax
            # offset and nested blocks).
            parts = layer.weight.data.split(layer.output_partition_sizes)
            layer.nf4_shards = [quantize_nf4(w, code) for w in parts]  # type: ignore[assignment]
            del layer._parameters["weight"]
            return
        sizes = layer.output_partition_sizes
        shards = _shard_ids(layer)
        layer.nf4_shards = [  # type: ignore[assignment]
            self._part(layer, shard, sizes[i] if len(shards) > 1 else sum(sizes))
            for i, shard in enumerate(shards)
        ]
        for leaf in (*_CKPT_LEAVES.values(), "bnb_quant_state", "weight"):
            del layer._parameters[leaf]
        del layer.bnb_parts

    def dequantized_weight(self, layer: LinearBase) -> torch.Tensor:
        """``[N, K]`` float32 (the float weight a QLoRA adapter is trained against)."""
        return torch.cat([dequantize_nf4(w) for w in layer.nf4_shards])

    def _one(self, w: NF4Weight, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from kvasir.kernels.nf4 import nf4_matmul

            return nf4_matmul(x.contiguous(), w)
        return F.linear(x, dequantize_nf4(w).to(x.dtype))

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        shards = layer.nf4_shards
        y = self._one(shards[0], x) if len(shards) == 1 else torch.cat(
            [self._one(w, x) for w in shards], dim=-1)  # fmt: skip
        return y if bias is None else y + bias


def _meta_only(layer: LinearBase):  # noqa: ANN202
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if loaded.device.type != "meta":
            raise ValueError(f"{layer.prefix}: expected the packed bitsandbytes weight")

    return load


@register_quantization_config("bitsandbytes")
class BitsAndBytesConfig(QuantizationConfig):
    """4-bit NF4 / FP4 for every linear layer but the LM head and the skipped ones."""

    checkpoint_leaves = (*_CKPT_LEAVES.values(), "bnb_quant_state")
    checkpoint_primary_leaf = "bnb_weight"

    def __init__(
        self, quant_type: str, prequantized: bool, device: torch.device, skip: Any = None
    ) -> None:
        self.quant_type = quant_type
        self.prequantized = prequantized
        self.device = device
        self.skip = skip or (lambda name: False)

    @classmethod
    def online(cls, device: torch.device) -> BitsAndBytesConfig:
        return cls("nf4", False, device)

    @classmethod
    def from_checkpoint(cls, hf_config: dict[str, Any], device: torch.device) -> BitsAndBytesConfig:
        where = "quantization_config"
        if not hf_config.get("load_in_4bit"):
            raise ValueError(f"{where}.load_in_4bit must be true (8-bit bitsandbytes "
                             "checkpoints are not supported)")  # fmt: skip
        qt = hf_config.get("bnb_4bit_quant_type", "fp4")
        if qt not in QUANT_TYPES:
            raise ValueError(f"{where}.bnb_4bit_quant_type must be one of {list(QUANT_TYPES)}, "
                             f"got {qt!r}")  # fmt: skip
        if hf_config.get("bnb_4bit_use_double_quant") is not True:
            raise ValueError(f"{where}.bnb_4bit_use_double_quant must be true (single-"
                             "quantised absmax is not supported)")  # fmt: skip
        skip = name_matcher(list(hf_config.get("llm_int8_skip_modules") or []), substring=True)
        return cls(qt, True, device, skip)

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethod | None:
        if prefix == "lm_head" or layer_matches(prefix, self.skip):
            return None
        return BnB4LinearMethod(self.quant_type, self.prequantized, self.device)

    def describe(self) -> str:
        source = "checkpoint" if self.prequantized else "quantised at load"
        path = ("Triton dequantising GEMM/GEMV" if self.device.type == "cuda"
                else "CPU torch reference: blocks dequantised inside each matmul")  # fmt: skip
        return (f"bitsandbytes ({self.quant_type}, blocks of {BLOCK}, double-quantised "
                f"absmax; {source}) via {path}")  # fmt: skip

    def transform_checkpoint(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """bitsandbytes' tensor names -> the method's parameters (module docstring)."""
        for name, tensor in weights:
            head, sep, tail = name.partition(".weight")
            if sep and tail.startswith(_STATE_PREFIX):
                yield f"{head}.bnb_quant_state", tensor
            elif sep and tail in _CKPT_LEAVES and (tail or tensor.dtype == torch.uint8):
                yield f"{head}.{_CKPT_LEAVES[tail]}", tensor
            else:
                yield name, tensor
