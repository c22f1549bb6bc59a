"""Checkpoints written by llm-compressor / the ``compressed-tensors`` library
(``quant_method: "compressed-tensors"``): 8-bit schemes in the ``float-quantized``,
``int-quantized``, ``naive-quantized`` and ``pack-quantized`` formats, their ``ignore``
lists, and the ``kv_cache_scheme`` (FP8 KV cache with calibrated ``k_scale`` /
``v_scale``).

Each entry of ``config_groups`` gives ``targets`` (``"Linear"``, module names, or
``re:`` regular expressions), ``weights`` and optionally ``input_activations``
(``QuantizationArgs``: ``num_bits``, ``type`` int/float, ``strategy``, ``symmetric``,
``dynamic``). Anything else is refused naming the field and the supported values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from kvasir.layers.linear import LinearBase, LinearMethod
from kvasir.quantization import register_quantization_config
from kvasir.quantization.schemes import W8Config, layer_matches, name_matcher
from kvasir.quantization.utils import FP8_E4M3
from kvasir.quantization.w8_linear import W8LinearMethod, W8Scheme

FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
_WEIGHT_STRATEGIES = ("tensor", "channel", "block")
_ACT_STRATEGIES = ("token", "tensor", "group")


def _field(where: str, d: dict[str, Any], key: str, allowed: tuple, default: Any = None) -> Any:
    value = d.get(key, default)
    if value not in allowed:
        raise ValueError(f"{where}.{key} must be one of {list(allowed)}, got {value!r}")
    return value


def parse_scheme(group: str, g: dict[str, Any], fmt: str | None) -> W8Scheme:
    """One config group -> the ``W8Scheme`` its layers run."""
    where = f"quantization_config.config_groups.{group}"
    w = g.get("weights")
    if not isinstance(w, dict):
        raise ValueError(f"{where}.weights is required (8-bit weights)")
    _field(f"{where}.weights", w, "num_bits", (8,))
    wtype = _field(f"{where}.weights", w, "type", ("float", "int"))
    strategy = _field(f"{where}.weights", w, "strategy", _WEIGHT_STRATEGIES)
    _field(f"{where}.weights", w, "symmetric", (True,), True)
    _field(f"{where}.weights", w, "dynamic", (False,), False)
    if strategy == "block":
        block = w.get("block_structure")
        if list(block or []) != [128, 128]:
            raise ValueError(f"{where}.weights.block_structure must be [128, 128], got {block!r}")
    fmt = g.get("format") or fmt
    want = ("float-quantized",) if wtype == "float" else FORMATS[1:]
    if fmt not in want:
        raise ValueError(
            f"{where}.format must be one of {list(want)} for {wtype} weights, got {fmt!r}"
        )
    qdtype = FP8_E4M3 if wtype == "float" else torch.int8
    a = g.get("input_activations")
    if a is None:
        return W8Scheme(qdtype, strategy, prequantized=True)
    _field(f"{where}.input_activations", a, "num_bits", (8,))
    _field(f"{where}.input_activations", a, "type", (wtype,))
    _field(f"{where}.input_activations", a, "symmetric", (True,), True)
    act = _field(f"{where}.input_activations", a, "strategy", _ACT_STRATEGIES)
    dynamic = a.get("dynamic", False)
    if dynamic is not True and (dynamic is not False or act != "tensor"):
        raise ValueError(
            f"{where}.input_activations.dynamic must be true (static scales are per tensor), "
            f"got {dynamic!r} with strategy {act!r}"
        )
    if act == "group" and (strategy != "block" or a.get("group_size") != 128):
        raise ValueError(
            f"{where}.input_activations: group scales need block weights, group_size 128"
        )
    return W8Scheme(qdtype, strategy, act, act_static=not dynamic, prequantized=True)


@register_quantization_config("compressed-tensors")
class CompressedTensorsConfig(W8Config):
    """Per-layer schemes from ``config_groups`` (the first group whose targets match),
    ``ignore``d layers unquantised; ``kv_cache_dtype``: ``"fp8_e4m3"`` when the
    checkpoint has a ``kv_cache_scheme``."""

    def __init__(
        self,
        groups: list[tuple[Any, W8Scheme, int]],  # (target matcher, scheme, pack bits)
        device: torch.device,
        ignore: Any,
        kv_cache_dtype: str | None,
    ) -> None:
        super().__init__(groups[0][1], device, ignore, quantize_lm_head=True)
        self.groups = groups
        self.kv_cache_dtype = kv_cache_dtype
        self._paths: set[str] = set()

    @classmethod
    def from_checkpoint(
        cls, hf_config: dict[str, Any], device: torch.device
    ) -> CompressedTensorsConfig:
        fmt = hf_config.get("format")
        groups_cfg = hf_config.get("config_groups") or {}
        if not isinstance(groups_cfg, dict) or not groups_cfg:
            raise ValueError("quantization_config.config_groups must name at least one group")
        groups = []
        for name, g in groups_cfg.items():
            targets = g.get("targets") or []
            scheme = parse_scheme(name, g, fmt)
            all_linear = "Linear" in targets
            match = name_matcher([t for t in targets if t != "Linear"])
            packed = (g.get("format") or fmt) == "pack-quantized"
            groups.append(((lambda n, m=match, a=all_linear: a or m(n)), scheme, packed))
        kv = hf_config.get("kv_cache_scheme")
        kv_dtype = None
        if kv is not None:
            where = "quantization_config.kv_cache_scheme"
            _field(where, kv, "num_bits", (8,))
            _field(where, kv, "type", ("float",))
            _field(where, kv, "strategy", ("tensor", "attn_head"))
            _field(where, kv, "dynamic", (False,), False)
            kv_dtype = "fp8_e4m3"
        return cls(groups, device, name_matcher(hf_config.get("ignore") or []), kv_dtype)

    def _group(self, prefix: str) -> tuple[W8Scheme, bool] | None:
        for match, scheme, packed in self.groups:
            if layer_matches(prefix, match):
                return scheme, packed
        return None

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethod | None:
        if layer_matches(prefix, self.ignore):
            return None
        found = self._group(prefix)
        if found is None:
            return None
        method = W8LinearMethod(found[0], self.device)
        self._paths.add(method.path)
        self._path = method.path
        return method

    def describe(self) -> str:
        schemes = sorted({s.describe() for _, s, _ in self.groups})
        from kvasir.quantization.w8_linear import PATH_DESCRIPTIONS

        paths = "; ".join(PATH_DESCRIPTIONS[p] for p in sorted(self._paths)) or "no layer"
        return f"compressed-tensors ({' | '.join(schemes)}; checkpoint) via {paths}"

    def transform_checkpoint(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``pack-quantized`` int8 weights (``weight_packed`` int32 + ``weight_shape``)
        -> ``weight`` int8, unpacked by the compressed-tensors library; symmetric
        schemes' all-zero ``weight_zero_point`` dropped (a non-zero one is refused)."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            module, _, leaf = name.rpartition(".")
            if leaf in ("weight_zero_point", "input_zero_point"):
                if torch.count_nonzero(tensor):
                    raise ValueError(f"{name}: asymmetric (non-zero) zero points are not supported")
                continue
            if leaf in ("weight_packed", "weight_shape"):
                parts = pending.setdefault(module, {})
                parts[leaf] = tensor
                if len(parts) == 2:
                    shape = torch.Size(int(d) for d in parts["weight_shape"].tolist())
                    del pending[module]
                    yield f"{module}.weight", unpack_from_int32(parts["weight_packed"], 8, shape)
                continue
            yield name, tensor
        if pending:
            raise ValueError(f"{next(iter(pending))}: weight_packed without weight_shape (or back)")
