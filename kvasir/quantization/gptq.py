"""GPTQ checkpoints (``quant_method: "gptq"``, as AutoGPTQ, GPTQModel and HF transformers
write them): 4- or 8-bit integer weights in groups of 32 / 64 / 128 or per channel,
symmetric or not, optionally act-order (``desc_act``, with ``g_idx``). The layers run
``WNA16LinearMethod`` (``kvasir.quantization.wna16_linear``)."""

from __future__ import annotations

from typing import Any

import torch

from kvasir.kernels.wna16 import SUPPORTED_BITS
from kvasir.layers.linear import LinearBase, LinearMethod
from kvasir.quantization import QuantizationConfig, register_quantization_config
from kvasir.quantization.schemes import layer_matches, name_matcher
from kvasir.quantization.wna16_linear import (
    CHECKPOINT_LEAVES,
    PATH_DESCRIPTIONS,
    SUPPORTED_GROUP_SIZES,
    WNA16LinearMethod,
    WNA16Scheme,
)

_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> offset of the stored zeros


def check_field(where: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
        raise ValueError(f"{where} must be one of {list(allowed)}, got {value!r}")
    return value


class WNA16Config(QuantizationConfig):
    """One ``WNA16Scheme`` for every linear layer but the LM head and the skipped ones."""

    checkpoint_leaves = CHECKPOINT_LEAVES
    checkpoint_primary_leaf = "qweight"

    def __init__(self, scheme: WNA16Scheme, device: torch.device, skip: Any = None) -> None:
        self.scheme = scheme
        self.device = device
        self.skip = skip or (lambda name: False)
        self._path = "triton" if device.type == "cuda" else "cpu-reference"

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethod | None:
        if prefix == "lm_head" or layer_matches(prefix, self.skip):
            return None
        return WNA16LinearMethod(self.scheme, self.device)

    def describe(self) -> str:
        path = PATH_DESCRIPTIONS[self._path].format(bits=self.scheme.bits)
        return f"{self.name} ({self.scheme.describe()}; checkpoint) via {path}"


@register_quantization_config("gptq")
class GPTQConfig(WNA16Config):
    @classmethod
    def from_checkpoint(cls, hf_config: dict[str, Any], device: torch.device) -> GPTQConfig:
        where = "quantization_config"
        bits = check_field(f"{where}.bits", hf_config.get("bits"), SUPPORTED_BITS)
        group = check_field(
            f"{where}.group_size", hf_config.get("group_size", 128), SUPPORTED_GROUP_SIZES
        )
        desc_act = check_field(f"{where}.desc_act", hf_config.get("desc_act", False), (False, True))
        check_field(f"{where}.sym", hf_config.get("sym", True), (True, False))
        fmt = check_field(
            f"{where}.checkpoint_format", hf_config.get("checkpoint_format", "gptq"),
            tuple(_FORMATS),
        )  # fmt: skip
        if hf_config.get("lm_head"):
            raise ValueError(f"{where}.lm_head: a quantised LM head is not supported")
        scheme = WNA16Scheme(bits, group, "gptq", desc_act, zero_offset=_FORMATS[fmt])
        skip = name_matcher(list(hf_config.get("modules_to_not_convert") or []), substring=True)
        return cls(scheme, device, skip)
