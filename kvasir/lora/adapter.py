"""Reading PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

``inspect_adapter`` checks everything it can from the config and the safetensors
header alone (no tensor data: cheap enough to run at admission, so a bad adapter is a
clear error for its request, never a failure inside a step); ``load_adapter`` reads the
tensors. Pickled ``adapter_model.bin`` files are refused (they can run code).

LoRA: per target module ``A [r, in]`` and ``B [out, r]``; the delta is
``scaling * B A x`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA;
``alpha_pattern`` / ``rank_pattern`` per module). The scaling is folded into B at load.
(IA)^3: per target module a vector ``l``; ``[out, 1]`` scales the module's output,
``[1, in]`` (a feed-forward module) its input.

Module names are HF's (``model.layers.0.self_attn.q_proj``); the caller gives the
model's ``{hf_module_name: (in_features, out_features)}`` so a fused kvasir layer
(``qkv_proj``) is checked per sub-projection.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
_KEY_PREFIX = "base_model.model."
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out")
_SUPPORTED_TYPES = ("LORA", "IA3")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the adapter and the reason."""


@dataclass(frozen=True)
class AdapterInfo:
    """What ``inspect_adapter`` found: per module, the tensor keys, the rank (LoRA) and
    the scaling; or the (IA)^3 vector's key and whether it scales the input."""

    path: str
    peft_type: str  # "LORA" | "IA3"
    rank: int  # the largest rank of any module (0 for IA3)
    # hf module name -> (A key, B key, rank, scaling)
    lora: dict[str, tuple[str, str, int, float]] = field(default_factory=dict)
    # hf module name -> (key, scales the input)
    ia3: dict[str, tuple[str, bool]] = field(default_factory=dict)
    nbytes: int = 0


@dataclass
class LoRAAdapter:
    """An adapter's tensors on the host: ``lora[name] = (A [r, in], B [out, r] * scaling)``,
    ``ia3[name] = (vector, scales_input)``."""

    info: AdapterInfo
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ia3: dict[str, tuple[torch.Tensor, bool]]

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def nbytes(self) -> int:
        return self.info.nbytes


def _pattern_value(patterns: dict, module_name: str, default: float) -> float:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: a key matches a module whose name
    ends with it (as a dotted suffix or a regular expression)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_config(path: str, what: str) -> dict:
    if not os.path.isdir(path):
        raise AdapterError(f"{what}: lora_path {path!r} is not a directory")
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{what}: {CONFIG_FILE} not found in {path!r}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{what}: {CONFIG_FILE} could not be read ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{what}: {CONFIG_FILE} must be a JSON object")
    return cfg


def check_adapter_config(path: str, max_lora_rank: int, what: str = "adapter") -> dict:
    """The config-level checks (no model needed): type, features we do not serve, rank,
    the weights file. Returns the parsed config. Raises ``AdapterError``."""
    cfg = _read_config(path, what)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type not in _SUPPORTED_TYPES:
        raise AdapterError(
            f"{what}: peft_type {cfg.get('peft_type')!r} is not supported (LORA or IA3)"
        )
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        if any(os.path.isfile(os.path.join(path, p)) for p in _PICKLE_FILES):
            raise AdapterError(
                f"{what}: only {WEIGHTS_FILE} is accepted; pickled adapter_model.bin files "
                "are refused (they can run code): convert the adapter to safetensors"
            )
        raise AdapterError(f"{what}: {WEIGHTS_FILE} not found in {path!r}")
    if cfg.get("modules_to_save") or cfg.get("trainable_token_indices"):
        raise AdapterError(
            f"{what}: modules_to_save / trainable_token_indices (full copies of modules, "
            "such as a resized embedding or LM head with extra vocabulary) are not supported"
        )
    if os.path.isfile(os.path.join(path, "new_embeddings.safetensors")):
        raise AdapterError(f"{what}: adapters with extra vocabulary (new_embeddings) are refused")
    if peft_type == "LORA":
        if cfg.get("use_dora"):
            raise AdapterError(f"{what}: DoRA (use_dora) adapters are not supported")
        if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
            raise AdapterError(f"{what}: LoRA biases (bias / lora_bias) are not supported")
        if cfg.get("fan_in_fan_out"):
            raise AdapterError(f"{what}: fan_in_fan_out adapters (Conv1D bases) are not supported")
        ranks = [int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
        if max(ranks) > max_lora_rank:
            raise AdapterError(
                f"{what}: rank {max(ranks)} exceeds max_lora_rank ({max_lora_rank}); "
                "start the engine with a larger --max-lora-rank"
            )
    return cfg


def inspect_adapter(
    path: str,
    module_shapes: dict[str, tuple[int, int]],
    max_lora_rank: int,
    what: str = "adapter",
) -> AdapterInfo:
    """Check an adapter against the model without reading its tensor data.

    ``module_shapes``: the model's ``{hf_module_name: (in_features, out_features)}`` of
    every module an adapter may target. Raises ``AdapterError`` naming the adapter
    (``what``) and the first problem."""
    from safetensors import safe_open

    cfg = check_adapter_config(path, max_lora_rank, what)
    peft_type = str(cfg["peft_type"]).upper()
    try:
        with safe_open(os.path.join(path, WEIGHTS_FILE), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise AdapterError(f"{what}: {WEIGHTS_FILE} could not be read ({e})") from None
    if not shapes:
        raise AdapterError(f"{what}: {WEIGHTS_FILE} holds no tensors")
    alpha = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora"))
    lora: dict[str, tuple[str, str, int, float]] = {}
    ia3: dict[str, tuple[str, bool]] = {}
    pending_b: dict[str, str] = {}
    nbytes = 0
    for key, shape in sorted(shapes.items()):
        name = key[len(_KEY_PREFIX) :] if key.startswith(_KEY_PREFIX) else key
        name = name.replace(".default.", ".")
        module, _, kind = name.rpartition(".lora_") if ".lora_" in name else (name, "", "")
        if peft_type == "IA3":
            module, _, kind = name.rpartition(".")
        embedding = next((p for p in name.split(".") if p in _EMBEDDING_NAMES), None)
        if embedding is not None or ".lora_embedding_" in name:
            raise AdapterError(
                f"{what}: LoRA on {embedding or 'an embedding'} (embeddings / LM head, "
                "possibly with extra vocabulary) is not supported"
            )
        if module not in module_shapes:
            raise AdapterError(
                f"{what}: target module {module!r} does not exist in this model (tensor {key!r})"
            )
        in_f, out_f = module_shapes[module]
        nbytes += math.prod(shape) * 4
        if peft_type == "IA3":
            if kind != "ia3_l":
                raise AdapterError(f"{what}: unexpected tensor {key!r} in an IA3 adapter")
            scales_input = shape == (1, in_f)
            if not scales_input and shape != (out_f, 1):
                raise AdapterError(
                    f"{what}: {key!r} has shape {list(shape)}; this model's {module} needs "
                    f"[{out_f}, 1] or [1, {in_f}] (an adapter for another base model?)"
                )
            ia3[module] = (key, scales_input)
            continue
        if kind == "A.weight":
            r = shape[0]
            if len(shape) != 2 or shape[1] != in_f:
                raise AdapterError(
                    f"{what}: {key!r} has shape {list(shape)}, but this model's {module} "
                    f"has {in_f} input features (hidden size mismatch: an adapter for "
                    "another base model?)"
                )
            if r > max_lora_rank:
                raise AdapterError(
                    f"{what}: {module} has rank {r}, above max_lora_rank ({max_lora_rank})"
                )
            m_alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha)
            scaling = m_alpha / (math.sqrt(r) if rslora else r)
            lora[module] = (key, "", r, scaling)
        elif kind == "B.weight":
            pending_b[module] = key
            if len(shape) != 2 or shape[0] != out_f:
                raise AdapterError(
                    f"{what}: {key!r} has shape {list(shape)}, but this model's {module} "
                    f"has {out_f} output features (an adapter for another base model?)"
                )
        else:
            raise AdapterError(f"{what}: unexpected tensor {key!r} in a LoRA adapter")
    for module, b_key in pending_b.items():
        if module not in lora:
            raise AdapterError(f"{what}: {module} has lora_B but no lora_A")
        a_key, _, r, scaling = lora[module]
        if shapes[b_key][1] != r:
            raise AdapterError(
                f"{what}: {module}'s lora_B has rank {shapes[b_key][1]}, its lora_A {r}"
            )
        lora[module] = (a_key, b_key, r, scaling)
    missing_b = [m for m, v in lora.items() if not v[1]]
    if missing_b:
        raise AdapterError(f"{what}: {missing_b[0]} has lora_A but no lora_B")
    rank = max((v[2] for v in lora.values()), default=0)
    return AdapterInfo(path, peft_type, rank, lora, ia3, nbytes)


def load_adapter(info: AdapterInfo, what: str = "adapter") -> LoRAAdapter:
    """Read the tensors ``inspect_adapter`` described (float32, on the host), with the
    LoRA scaling folded into B."""
    from safetensors import safe_open

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ia3: dict[str, tuple[torch.Tensor, bool]] = {}
    try:
        with safe_open(os.path.join(info.path, WEIGHTS_FILE), "pt") as f:
            for module, (a_key, b_key, _r, scaling) in info.lora.items():
                a = f.get_tensor(a_key).float().contiguous()
                b = (f.get_tensor(b_key).float() * scaling).contiguous()
                lora[module] = (a, b)
            for module, (key, scales_input) in info.ia3.items():
                ia3[module] = (f.get_tensor(key).float().reshape(-1).contiguous(), scales_input)
    except Exception as e:
        raise AdapterError(f"{what}: {WEIGHTS_FILE} could not be read ({e})") from None
    return LoRAAdapter(info, lora, ia3)
