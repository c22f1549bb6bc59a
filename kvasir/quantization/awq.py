"""AWQ checkpoints (``quant_method: "awq"``, AutoAWQ's GEMM packing, as HF transformers
reads them): 4-bit integer weights with zero points in groups of 32 / 64 / 128 or per
channel. The layers run ``WNA16LinearMethod`` (``kvasir.quantization.wna16_linear``)."""

from __future__ import annotations

from typing import Any

import torch

from kvasir.quantization import register_quantization_config
from kvasir.quantization.gptq import WNA16Config, check_field
from kvasir.quantization.schemes import name_matcher
from kvasir.quantization.wna16_linear import SUPPORTED_GROUP_SIZES, WNA16Scheme


@register_quantization_config("awq")
class AWQConfig(WNA16Config):
    @classmethod
    def from_checkpoint(cls, hf_config: dict[str, Any], device: torch.device) -> AWQConfig:
        where = "quantization_config"
        bits = hf_config.get("bits", hf_config.get("w_bit"))
        check_field(f"{where}.bits", bits, (4,))
        group = hf_config.get("group_size", hf_config.get("q_group_size", 128))
        check_field(f"{where}.group_size", group, SUPPORTED_GROUP_SIZES)
        check_field(f"{where}.zero_point", hf_config.get("zero_point", True), (True,))
        version = str(hf_config.get("version", "gemm")).lower()
        check_field(f"{where}.version", version, ("gemm",))
        scheme = WNA16Scheme(4, group, "awq")
        skip = name_matcher(list(hf_config.get("modules_to_not_convert") or []), substring=True)
        return cls(scheme, device, skip)
