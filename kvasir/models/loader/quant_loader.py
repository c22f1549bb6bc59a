"""The checkpoint side of quantisation: the ``quantization_config`` of config.json, and
the tensors a quantised checkpoint holds beyond a float one (``weight_scale``,
``input_scale``, KV-cache ``k_scale`` / ``v_scale``), handed to the parameters the
layers' methods declared for them."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from kvasir.quantization import QuantizationConfig

logger = logging.getLogger(__name__)

# Where calibrated KV-cache scales live in checkpoints (vLLM / llm-compressor names,
# and the older ``k_proj.output_scale``) -> the attention layer's parameter.
_KV_SCALE_NAMES = {
    ".self_attn.k_scale": ".self_attn.attn.k_scale",
    ".self_attn.v_scale": ".self_attn.attn.v_scale",
    ".self_attn.k_proj.output_scale": ".self_attn.attn.k_scale",
    ".self_attn.v_proj.output_scale": ".self_attn.attn.v_scale",
}


def read_quantization_config(path: str, fmt: str) -> dict[str, Any] | None:
    """config.json's ``quantization_config`` (None for GGUF and float checkpoints)."""
    if fmt not in ("safetensors", "dummy") or not os.path.isdir(path):
        return None
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config in '{config_path}' must be a JSON object")
    return qc


def quantized_weights(
    model: nn.Module,
    quant_config: QuantizationConfig | None,
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with the quantisation tensors taken out and loaded into their
    parameters here; the float-checkpoint names pass on to ``model.load_weights``."""
    transform = getattr(quant_config, "transform_checkpoint", None)
    if transform is not None:
        weights = transform(weights)
    expected = model.expected_weight_shapes()  # type: ignore[operator]
    packed_leaves = getattr(quant_config, "checkpoint_leaves", ())
    primary_leaf = getattr(quant_config, "checkpoint_primary_leaf", None)
    params = dict(model.named_parameters())
    skipped_kv_scales = 0
    for name, tensor in weights:
        if quant_config is not None:
            name = quant_config.rename_checkpoint_tensor(name)
        if name in expected:
            yield name, tensor
            continue
        target = _kv_scale_param(name)
        if target is not None:
            param = params.get(target)
            if param is not None:
                param.weight_loader(param, tensor)  # type: ignore[attr-defined]
            elif model._is_local(name):  # type: ignore[operator]
                skipped_kv_scales += 1
            continue
        module, _, leaf = name.rpartition(".")
        if leaf in packed_leaves:
            # A packed checkpoint (GPTQ, AWQ): no float weight; its tensors fill the
            # method's parameters and the model gets a shape-only weight for the layer.
            if model._is_local(name):  # type: ignore[operator]
                _load_quant_tensor(model, params, name, tensor, quant_config)
            weight_name = f"{module}.weight"
            if leaf == primary_leaf and weight_name in expected:
                yield weight_name, torch.empty(expected[weight_name], device="meta")
            continue
        if quant_config is None or leaf not in ("weight_scale", "input_scale"):
            yield name, tensor  # load_weights names what it does not expect
            continue
        if not model._is_local(name):  # type: ignore[operator]
            continue
        _load_quant_tensor(model, params, name, tensor, quant_config)
    if skipped_kv_scales:
        logger.warning(
            "the checkpoint has %d calibrated KV-cache scales; they are unused because the "
            "KV cache is not FP8 (pass --kv-cache-dtype fp8 to use them)",
            skipped_kv_scales,
        )


def _load_quant_tensor(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    name: str,
    tensor: torch.Tensor,
    quant_config: QuantizationConfig,
) -> None:
    try:
        param, shard_id = model._param_for(name, params)  # type: ignore[operator]
    except KeyError:
        raise ValueError(
            f"checkpoint has {name!r}, but that layer is not quantised under "
            f"{quant_config.describe()} (is it in the ignore list?)"
        ) from None
    if shard_id is None:
        param.weight_loader(param, tensor)  # type: ignore[attr-defined]
    else:
        param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]


def _kv_scale_param(name: str) -> str | None:
    for suffix, target in _KV_SCALE_NAMES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + target
    return None
