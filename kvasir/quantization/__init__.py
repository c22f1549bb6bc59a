"""Quantisation schemes: a registry of configs, each giving the linear layers their
``LinearMethod`` and, where the scheme has one, the KV cache's dtype and scales.

A ``QuantizationConfig`` is handed to the model's layers in ``LayerContext.quant_config``;
each linear layer asks it for its method by the layer's checkpoint name (``prefix``,
e.g. ``"model.layers.0.mlp.down_proj"``), so a scheme can leave some layers unquantised.
The model file never sees which method a layer got.

Configs come from ``--quantization NAME`` (online quantisation of a float checkpoint) or
from a checkpoint's ``quantization_config`` (``quant_method``: ``fp8`` as HF
transformers writes it, ``compressed-tensors`` as llm-compressor writes it, ``gptq`` and
``awq`` as AutoGPTQ / AutoAWQ write them);
``resolve_quantization`` picks one and refuses a conflict or an unknown method by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvasir.layers.linear import LinearBase, LinearMethod


class QuantizationConfig(ABC):
    """One scheme's settings (read from a checkpoint or given by the user).

    ``get_linear_method`` is called once per linear layer, before its weights exist;
    None means the layer stays unquantised (``UnquantizedLinearMethod``).
    ``describe`` is the start-up line's account of what runs (the kernel path
    included); a scheme never silently runs something other than it says.
    """

    name: str = "abstract"

    @abstractmethod
    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethod | None: ...

    def describe(self) -> str:
        return self.name

    # Checkpoint tensor-name suffixes that this scheme renames on load (HF/DeepSeek
    # FP8's "weight_scale_inv" is a multiplicative scale despite its name).
    def rename_checkpoint_tensor(self, name: str) -> str:
        return name

    @classmethod
    def from_checkpoint(cls, hf_config: dict[str, Any], device: torch.device) -> QuantizationConfig:
        raise ValueError(f"quantization {cls.name!r} is not a checkpoint format")

    @classmethod
    def online(cls, device: torch.device) -> QuantizationConfig:
        raise ValueError(f"quantization {cls.name!r} needs a checkpoint quantised that way")


_CONFIGS: dict[str, type[QuantizationConfig]] = {}


def register_quantization_config(name: str):  # noqa: ANN201
    def deco(cls: type[QuantizationConfig]) -> type[QuantizationConfig]:
        cls.name = name
        _CONFIGS[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    # Importing the scheme modules registers them (kept out of this module's import so
    # that the registry's interface loads without torch kernels).
    import kvasir.quantization.awq  # noqa: F401
    import kvasir.quantization.bnb  # noqa: F401
    import kvasir.quantization.compressed_tensors  # noqa: F401
    import kvasir.quantization.gguf_packed  # noqa: F401
    import kvasir.quantization.gptq  # noqa: F401
    import kvasir.quantization.schemes  # noqa: F401


def get_quantization_config_cls(name: str) -> type[QuantizationConfig]:
    _load_builtin()
    if name not in _CONFIGS:
        raise ValueError(f"quantization must be one of {sorted(_CONFIGS)}, got {name!r}")
    return _CONFIGS[name]


# What ``--quantization`` accepts (online quantisation of a float checkpoint).
ONLINE_METHODS = ("fp8", "int8", "w8a8", "bitsandbytes")
# What a checkpoint's ``quantization_config.quant_method`` may say.
CHECKPOINT_METHODS = ("fp8", "compressed-tensors", "gptq", "awq", "bitsandbytes")


# GGUF checkpoints: ``gguf`` keeps the block formats packed; ``none`` dequantises at load.
GGUF_METHODS = ("gguf", "none")


def resolve_quantization(
    flag: str | None,
    hf_quant_config: dict[str, Any] | None,
    device: torch.device,
    load_format: str | None = None,
) -> QuantizationConfig | None:
    """The config for ``--quantization`` (``flag``) and the checkpoint's
    ``quantization_config``. A quantised checkpoint runs its own scheme; ``flag`` may
    name its method (or be None) but not another one. ``none``: no quantisation (a GGUF
    checkpoint dequantised at load); ``gguf``: a GGUF checkpoint's blocks kept packed."""
    if flag == "none":
        if hf_quant_config is not None:
            raise ValueError(
                "quantization 'none' conflicts with the checkpoint's quantization_config "
                f"(quant_method {hf_quant_config.get('quant_method')!r})"
            )
        return None
    if flag == "gguf" or (flag is None and load_format == "gguf"):
        if load_format != "gguf":
            raise ValueError(
                f"quantization 'gguf' needs a GGUF checkpoint (load_format gguf), got "
                f"load_format {load_format!r}"
            )
        if flag is None:
            flag = default_gguf_quantization(device)
            if flag == "none":
                return None
        return get_quantization_config_cls("gguf").online(device)
    if hf_quant_config is not None:
        method = hf_quant_config.get("quant_method")
        if method not in CHECKPOINT_METHODS:
            raise ValueError(
                f"quantization_config.quant_method {method!r} is not supported; supported: "
                f"{list(CHECKPOINT_METHODS)}"
            )
        if flag is not None and flag != method:
            raise ValueError(
                f"quantization {flag!r} conflicts with the checkpoint's quantization_config "
                f"(quant_method {method!r}); leave quantization unset for a quantised checkpoint"
            )
        return get_quantization_config_cls(method).from_checkpoint(hf_quant_config, device)
    if flag is None:
        return None
    if flag not in ONLINE_METHODS:
        raise ValueError(
            f"quantization must be one of {list(ONLINE_METHODS)} for a float checkpoint, "
            f"got {flag!r}"
        )
    return get_quantization_config_cls(flag).online(device)


def default_gguf_quantization(device: torch.device) -> str:
    """What a GGUF checkpoint runs without ``--quantization``: packed (``gguf``) on
    CUDA; dequantised at load (``none``) on the CPU, where the packed path is the
    per-call torch reference and much slower (benchmarks/RESULTS.md, "4-bit weights";
    a fast CPU path for the packed formats is a later issue)."""
    return "gguf" if device.type == "cuda" else "none"


__all__ = [
    "CHECKPOINT_METHODS",
    "GGUF_METHODS",
    "default_gguf_quantization",
    "ONLINE_METHODS",
    "QuantizationConfig",
    "get_quantization_config_cls",
    "register_quantization_config",
    "resolve_quantization",
]
