"""The 8-bit schemes: ``fp8`` (online, and HF transformers' FP8 checkpoints), ``int8``
(weight-only W8A16, online) and ``w8a8`` (INT8 weights and dynamic per-token INT8
activations, online)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvasir.layers.linear import LinearBase, LinearMethod
from kvasir.quantization import QuantizationConfig, register_quantization_config
from kvasir.quantization.utils import FP8_E4M3
from kvasir.quantization.w8_linear import PATH_DESCRIPTIONS, W8LinearMethod, W8Scheme

if TYPE_CHECKING:
    from kvasir.layers.fused_moe import FusedMoE, FusedMoEMethod

logger = logging.getLogger(__name__)

# A fused layer and the checkpoint projections it holds (ignore lists name those).
_FUSED_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def checkpoint_names(prefix: str) -> list[str]:
    """The checkpoint module names a layer's ``prefix`` stands for."""
    parent, _, leaf = prefix.rpartition(".")
    parts = _FUSED_PARTS.get(leaf)
    if parts is None:
        return [prefix]
    return [f"{parent}.{p}" for p in parts]


def layer_matches(prefix: str, match: Callable[[str], bool]) -> bool:
    """Whether ``match`` holds for every checkpoint module of the layer; a fused layer
    whose parts disagree cannot be built (one weight, one method)."""
    results = {match(name) for name in checkpoint_names(prefix)}
    if len(results) > 1:
        raise ValueError(
            f"the quantization config treats the parts of {prefix} "
            f"({checkpoint_names(prefix)}) differently; kvasir fuses them into one layer"
        )
    return results.pop()


def name_matcher(patterns: Sequence[str], substring: bool = False) -> Callable[[str], bool]:
    """``re:``-prefixed entries are regular expressions (compressed-tensors), others
    exact module names (or, with ``substring``, any part of the name: HF's
    ``modules_to_not_convert``)."""
    regexes = [re.compile(p[3:]) for p in patterns if p.startswith("re:")]
    names = [p for p in patterns if not p.startswith("re:")]

    def match(name: str) -> bool:
        if any(r.match(name) for r in regexes):
            return True
        if substring:
            return any(n == name or n in name.split(".") or name.endswith("." + n) or
                       name.startswith(n + ".") for n in names)  # fmt: skip
        return name in names

    return match


class W8Config(QuantizationConfig):
    """One ``W8Scheme`` for every linear layer, except the ignored ones and, unless the
    checkpoint quantised it, the LM head (the logits stay in full precision)."""

    def __init__(
        self,
        scheme: W8Scheme,
        device: torch.device,
        ignore: Callable[[str], bool] | None = None,
        quantize_lm_head: bool = False,
    ) -> None:
        self.scheme = scheme
        self.device = device
        self.ignore = ignore or (lambda name: False)
        self.quantize_lm_head = quantize_lm_head
        self._path: str | None = None

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethod | None:
        if prefix == "lm_head" and not self.quantize_lm_head:
            return None
        if layer_matches(prefix, self.ignore):
            return None
        method = W8LinearMethod(self.scheme, self.device)
        self._path = method.path
        return method

    def get_moe_method(self, layer: FusedMoE, prefix: str) -> FusedMoEMethod | None:
        """MoE experts: 8-bit per-channel weights quantised at load, activations in the
        model dtype (``W8FusedMoEMethod``); checkpoint-quantised experts are refused."""
        from kvasir.layers.fused_moe import W8FusedMoEMethod

        if layer_matches(prefix, self.ignore):
            return None
        if self.scheme.prequantized:
            raise ValueError(
                f"{prefix}: loading MoE experts quantised in the checkpoint is not "
                f"supported; load the unquantised checkpoint with --quantization "
                f"{self.name} (experts are then quantised at load)"
            )
        return W8FusedMoEMethod(self.scheme.weight_dtype)

    def describe(self) -> str:
        from kvasir.quantization.w8_linear import select_path

        path = self._path or select_path(self.scheme, self.device)
        source = "checkpoint" if self.scheme.prequantized else "quantised at load"
        return f"{self.name} ({self.scheme.describe()}; {source}) via {PATH_DESCRIPTIONS[path]}"


@register_quantization_config("fp8")
class Fp8Config(W8Config):
    """FP8 E4M3 W8A8. Online: per-channel weight scales, dynamic per-token activation
    scales. HF transformers' FP8 checkpoints (``quant_method: "fp8"``): 128 x 128 block
    weight scales (``weight_block_size``, tensors ``weight_scale_inv``) with per-token,
    per-group activations, or per-tensor weight scales (``weight_scale``) with dynamic
    or static (``input_scale``) activations; ``modules_to_not_convert`` stay float."""

    @classmethod
    def online(cls, device: torch.device) -> Fp8Config:
        return cls(W8Scheme(FP8_E4M3, "channel", "token"), device)

    @classmethod
    def from_checkpoint(cls, hf_config: dict[str, Any], device: torch.device) -> Fp8Config:
        fmt = hf_config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt must be 'e4m3', got {fmt!r}")
        act = hf_config.get("activation_scheme", "dynamic")
        if act not in ("dynamic", "static"):
            raise ValueError(
                f"quantization_config.activation_scheme must be 'dynamic' or 'static', got {act!r}"
            )
        block = hf_config.get("weight_block_size")
        if block is not None:
            if list(block) != [128, 128]:
                raise ValueError(
                    f"quantization_config.weight_block_size must be [128, 128], got {block!r}"
                )
            if act != "dynamic":
                raise ValueError("block-quantised FP8 checkpoints need dynamic activations")
            scheme = W8Scheme(FP8_E4M3, "block", "group", prequantized=True)
        else:
            scheme = W8Scheme(
                FP8_E4M3, "tensor", "tensor" if act == "static" else "token",
                act_static=act == "static", prequantized=True,
            )  # fmt: skip
        skip = list(hf_config.get("modules_to_not_convert") or [])
        quantize_lm_head = not any(s == "lm_head" or s.endswith("lm_head") for s in skip)
        return cls(scheme, device, name_matcher(skip, substring=True), quantize_lm_head)

    def rename_checkpoint_tensor(self, name: str) -> str:
        if name.endswith(".weight_scale_inv"):
            return name[: -len("_inv")]
        return name


@register_quantization_config("int8")
class Int8Config(W8Config):
    """INT8 weight-only (W8A16): per-channel symmetric weight scales, quantised at load;
    activations stay in the model dtype."""

    @classmethod
    def online(cls, device: torch.device) -> Int8Config:
        return cls(W8Scheme(torch.int8, "channel"), device)


@register_quantization_config("w8a8")
class W8A8Int8Config(W8Config):
    """INT8 W8A8: per-channel int8 weights (quantised at load) and int8 activations with
    dynamic per-token scales."""

    @classmethod
    def online(cls, device: torch.device) -> W8A8Int8Config:
        return cls(W8Scheme(torch.int8, "channel", "token"), device)
