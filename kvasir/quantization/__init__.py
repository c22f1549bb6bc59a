"""Quantisation schemes: a registry of configs, each giving the linear layers their
``LinearMethod``.

A ``QuantizationConfig`` is handed to the model's layers in ``LayerContext.quant_config``;
each linear layer asks it for its method by the layer's checkpoint name (``prefix``,
e.g. ``"model.layers.0.mlp.down_proj"``), so a scheme can leave some layers unquantised.
The model file never sees which method a layer got.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvasir.layers.linear import LinearBase, LinearMethod


class QuantizationConfig(ABC):
    """One scheme's settings (read from a checkpoint or given by the user).

    ``get_linear_method`` is called once per linear layer, before its weights exist;
    None means the layer stays unquantised (``UnquantizedLinearMethod``).
    """

    name: str = "abstract"

    @abstractmethod
    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethod | None: ...


_CONFIGS: dict[str, type[QuantizationConfig]] = {}


def register_quantization_config(name: str):  # noqa: ANN201
    def deco(cls: type[QuantizationConfig]) -> type[QuantizationConfig]:
        cls.name = name
        _CONFIGS[name] = cls
        return cls

    return deco


def get_quantization_config_cls(name: str) -> type[QuantizationConfig]:
    if name not in _CONFIGS:
        raise ValueError(f"quantization must be one of {sorted(_CONFIGS)}, got {name!r}")
    return _CONFIGS[name]


__all__ = [
    "QuantizationConfig",
    "get_quantization_config_cls",
    "register_quantization_config",
]
