"""Model loading: resolve ``--model`` to a checkpoint, read its architecture, build the
model on the target device and fill its weights (safetensors, GGUF or random)."""

from __future__ import annotations

import glob
import logging
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvasir.attention.backend import AttentionBackend
from kvasir.config import KernelConfig, ModelArchConfig, ModelConfig, ParallelConfig
from kvasir.distributed.parallel_state import ParallelState, single_process_state
from kvasir.layers.attention import Attention
from kvasir.layers.context import LayerContext
from kvasir.layers.linear import LinearBase
from kvasir.layers.rotary_embedding import RotaryEmbedding
from kvasir.models.loader.dummy_loader import (
    available_dummy_configs,
    dummy_config_path,
    init_dummy_weights,
    is_builtin_dummy_config,
)
from kvasir.models.loader.gguf_loader import (
    gguf_arch_config,
    gguf_tokenizer,
    iterate_gguf,
    open_gguf,
)
from kvasir.models.loader.hf_config import load_hf_arch_config
from kvasir.models.loader.hub import parse_hub_model_id, resolve_hub_model
from kvasir.models.loader.quant_loader import quantized_weights, read_quantization_config
from kvasir.models.loader.safetensors_loader import iterate_safetensors, safetensors_files
from kvasir.models.registry import get_model_cls
from kvasir.quantization import QuantizationConfig, resolve_quantization

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "available_dummy_configs",
    "load_arch_config",
    "load_model",
    "load_tokenizer",
    "process_weights_after_loading",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _resolve_dummy(model: str) -> tuple[str, str]:
    builtin = dummy_config_path(model)
    if builtin is not None:
        return builtin, "dummy"
    path = os.path.expanduser(model)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return path, "dummy"
    if os.path.isfile(path) and path.endswith(".json"):
        return path, "dummy"
    raise ValueError(
        f"unknown dummy config {model!r}, available: {available_dummy_configs()} "
        "(or a path to an HF model directory / config.json)"
    )


def resolve_model_path(model_config: ModelConfig) -> tuple[str, str]:
    """``(path, load_format)`` for ``model_config.model``: an HF directory with
    config.json -> "safetensors", a ``*.gguf`` file (or a directory holding exactly one)
    -> "gguf"; a Hugging Face Hub id (``org/name[:QUANT]``) that is not a local path ->
    the same, from the hub cache or downloaded (``kvasir.models.loader.hub``); with
    load_format "dummy", a built-in config name (path of its JSON) or an HF directory /
    config.json. Raises ValueError for anything else."""
    model, fmt = model_config.model, model_config.load_format
    if fmt == "dummy":
        return _resolve_dummy(model)
    path = os.path.expanduser(model)
    if not os.path.exists(path) and parse_hub_model_id(model) is not None:
        path = resolve_hub_model(
            model, model_config.revision, model_config.download_dir, model_config.gguf_file
        )
    if not os.path.exists(path):
        hint = ""
        if dummy_config_path(model) is not None:
            hint = f" ({model!r} is a built-in config: use load_format='dummy' for random weights)"
        raise ValueError(f"model path '{model}' does not exist{hint}")
    if os.path.isfile(path):
        if path.endswith(".gguf") and fmt in ("auto", "gguf"):
            return path, "gguf"
        raise ValueError(
            f"model path '{model}' is a file; expected a .gguf file or an HF model directory"
            + (f" for load_format={fmt!r}" if fmt != "auto" else "")
        )
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    if has_config and fmt in ("auto", "safetensors"):
        return path, "safetensors"
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1 and fmt in ("auto", "gguf"):
        return ggufs[0], "gguf"
    raise ValueError(
        f"model directory '{model}' has no config.json (HF safetensors) nor exactly one "
        f".gguf file (found {len(ggufs)})"
    )


def _config_json(path: str) -> str:
    return path if path.endswith(".json") else os.path.join(path, "config.json")


def load_arch_config(model_config: ModelConfig) -> ModelArchConfig:
    """Read the model's architecture (config.json or GGUF metadata) and check it is one
    kvasir can run. Raises ValueError for unreadable configs or unsupported models."""
    path, fmt = resolve_model_path(model_config)
    if fmt == "gguf":
        arch_config = gguf_arch_config(open_gguf(path), path)
    else:
        arch_config = load_hf_arch_config(_config_json(path))
    get_model_cls(arch_config.architectures)  # fail here, not halfway through loading
    return arch_config


def _build_empty_model(
    model_cls: type[nn.Module], arch_config: ModelArchConfig, ctx: LayerContext
) -> nn.Module:
    # Built directly on the target device: the layers allocate their shard of each
    # weight uninitialised, in the target dtype (no init kernels, no host round trip);
    # weights are copied in after.
    with torch.device(ctx.parallel.device):
        model = model_cls(arch_config, ctx)
    _cast_floating(model, ctx.params_dtype)  # the norms; the linears are in it already
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()
    model.requires_grad_(False)
    return model


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)`` except for 8-bit tensors (FP8 weights and KV caches) and
    parameters marked ``keep_dtype`` (quantisation scales stay float32)."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if (
                p.is_floating_point()
                and p.element_size() > 1
                and not getattr(p, "keep_dtype", False)
            ):
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.element_size() > 1:
                setattr(module, name, b.to(dtype))


def load_model(
    model_config: ModelConfig,
    arch_config: ModelArchConfig,
    attn_backend_cls: type[AttentionBackend],
    dtype: torch.dtype,
    device: torch.device,
    kernel_config: KernelConfig | None = None,
    parallel: ParallelState | None = None,
    parallel_config: ParallelConfig | None = None,
    quant_config: QuantizationConfig | None = None,
    kv_cache_dtype: str = "auto",
    calculate_kv_scales: bool = False,
) -> nn.Module:
    """Build the model for ``arch_config`` on ``device`` in ``dtype`` and fill its weights
    from the checkpoint ``model_config`` points at (random for load_format "dummy").
    Tensors stream one at a time through the parameters' weight loaders, which keep
    this rank's shard (``parallel``; one process by default); then every linear
    layer's method processes its weights. Returns it in eval mode.

    ``quant_config`` None: the scheme of ``model_config.quantization`` and the
    checkpoint's ``quantization_config`` (``kvasir.quantization.resolve_quantization``).
    ``kv_cache_dtype``: ``auto`` (the model dtype) or an FP8 format for the attention
    layers' caches (``CacheConfig.kv_cache_dtype``)."""
    path, fmt = resolve_model_path(model_config)
    model_cls = get_model_cls(arch_config.architectures)
    if quant_config is None:
        quant_config = resolve_quantization(
            model_config.quantization,
            read_quantization_config(path, fmt),
            torch.device(device),
            load_format=fmt,
        )
    ctx = LayerContext(
        attn_backend_cls=attn_backend_cls,
        params_dtype=dtype,
        kernel_config=kernel_config or KernelConfig(),
        parallel=parallel or single_process_state(torch.device(device)),
        parallel_config=parallel_config or ParallelConfig(),
        quant_config=quant_config,
        kv_cache_dtype=resolve_kv_cache_dtype(kv_cache_dtype),
        calculate_kv_scales=calculate_kv_scales,
    )
    model = _build_empty_model(model_cls, arch_config, ctx)
    try:
        if fmt == "dummy":
            init_dummy_weights(model, seed=model_config.seed)
        elif fmt == "safetensors":
            weights = iterate_safetensors(safetensors_files(path))
            model.load_weights(quantized_weights(model, quant_config, weights))
        else:
            packed = getattr(quant_config, "keeps_gguf_packed", False)
            gguf = iterate_gguf(open_gguf(path), path, arch_config, packed=packed)
            model.load_weights(quantized_weights(model, quant_config, gguf))
    except ValueError as e:
        if path in str(e):
            raise
        raise ValueError(f"loading '{path}': {e}") from e
    process_weights_after_loading(model)
    if quant_config is not None:
        logger.info("quantization: %s", quant_config.describe())
    return model.eval()


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every linear layer's method repack what it needs; call again after changing
    weights in place."""
    from kvasir.layers.fused_moe import FusedMoE

    for module in model.modules():
        if isinstance(module, (LinearBase, FusedMoE)):
            module.method.process_weights_after_loading(module)  # type: ignore[arg-type]
        elif isinstance(module, Attention):
            module.process_weights_after_loading()


_KV_CACHE_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def resolve_kv_cache_dtype(name: str) -> torch.dtype | None:
    """``--kv-cache-dtype`` -> the cache's torch dtype (None: the model's dtype)."""
    if name == "auto":
        return None
    if name not in _KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {['auto', *_KV_CACHE_DTYPES]}, got {name!r}"
        )
    return _KV_CACHE_DTYPES[name]


def load_tokenizer(model_config: ModelConfig) -> PreTrainedTokenizerBase | None:
    """The HF tokenizer: from ``model_config.tokenizer`` if set (a directory, hub-style
    name or .gguf file), else from the model's GGUF file or directory. None for built-in
    dummy configs and dummy directories without tokenizer files."""
    from transformers import AutoTokenizer

    source = model_config.tokenizer
    if source is None:
        path, fmt = resolve_model_path(model_config)
        if fmt == "gguf":
            return gguf_tokenizer(path)
        source = path if os.path.isdir(path) else os.path.dirname(path)
        has_files = any(os.path.exists(os.path.join(source, f)) for f in _TOKENIZER_FILES)
        # A checkpoint without tokenizer files serves token-id prompts only (vLLM's
        # skip_tokenizer_init); text prompts then get a clear error.
        if (fmt == "dummy" and is_builtin_dummy_config(path)) or not has_files:
            return None
    elif source.endswith(".gguf"):
        return gguf_tokenizer(source)
    try:
        return AutoTokenizer.from_pretrained(
            source, trust_remote_code=model_config.trust_remote_code
        )
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from '{source}': {e}") from e
