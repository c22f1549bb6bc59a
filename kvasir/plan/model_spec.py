"""The shape of a model as the performance model needs it, from any HF ``config.json``
(dense, GQA, sliding windows, MoE, Mamba / Mamba-2 and hybrids), a built-in dummy
config, a GGUF file (the default model) or a plan-only config of ``model_zoo``.

Wider than ``ModelArchConfig`` on purpose: the engine runs Llama-family models, but an
operator plans for the model they will buy hardware for. Per-layer kinds are explicit:
``layer_types[i]`` is "attention", "sliding_attention" or "mamba", and ``moe_layers[i]``
says whether layer i's MLP is a mixture of experts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LAYER_TYPES = ("attention", "sliding_attention", "mamba")


@dataclass(frozen=True)
class MambaSpec:
    """One Mamba (v1) or Mamba-2 mixer. ``d_inner`` channels, ``d_state`` state per
    channel (v1) or per head channel (v2, ``num_heads * head_dim == d_inner``)."""

    version: int  # 1 or 2
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int = 0  # v1
    num_heads: int = 0  # v2
    n_groups: int = 1  # v2
    inner_norms: bool = False  # Jamba: RMSNorms on dt, B and C inside the mixer

    def in_proj_out(self) -> int:
        if self.version == 1:
            return 2 * self.d_inner
        return 2 * self.d_inner + 2 * self.n_groups * self.d_state + self.num_heads

    def conv_channels(self) -> int:
        return (
            self.d_inner if self.version == 1 else self.d_inner + 2 * self.n_groups * self.d_state
        )

    def params(self, hidden: int) -> int:
        """Weights of one mixer (its norm excluded)."""
        p = hidden * self.in_proj_out() + self.conv_channels() * (self.d_conv + 1)
        if self.version == 1:
            p += self.d_inner * (self.dt_rank + 2 * self.d_state)  # x_proj
            p += self.dt_rank * self.d_inner + self.d_inner  # dt_proj + bias
            p += self.d_inner * self.d_state + self.d_inner  # A_log, D
            if self.inner_norms:
                p += self.dt_rank + 2 * self.d_state
        else:
            p += 3 * self.num_heads + self.d_inner  # A_log, D, dt_bias; gated norm
        return p + self.d_inner * hidden  # out_proj

    def state_elements(self) -> int:
        """Per sequence: the SSM state and the convolution's last d_conv - 1 inputs."""
        return self.d_inner * self.d_state + self.conv_channels() * (self.d_conv - 1)


@dataclass(frozen=True)
class ModelSpec:
    """Invariants: ``len(layer_types) == len(moe_layers) == num_layers``; attention
    layers exist iff ``num_heads > 0``; ``mamba`` is set iff a layer is "mamba"."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]
    moe_layers: tuple[bool, ...]
    intermediate_size: int  # dense MLP (0: no dense MLP, e.g. pure Mamba)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    # Mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # all shared experts together
    mamba: MambaSpec | None = None
    checkpoint_quantization: str | None = None  # as the checkpoint says (informational)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_layers or len(self.moe_layers) != self.num_layers:
            raise ValueError(f"{self.name}: layer_types/moe_layers must list num_layers entries")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"{self.name}: unknown layer types {bad}")
        if self.num_attention_layers and (self.num_heads <= 0 or self.num_kv_heads <= 0):
            raise ValueError(f"{self.name}: attention layers need num_heads and num_kv_heads")
        if self.num_attention_layers and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_key_value_heads ({self.num_kv_heads}) must divide "
                f"num_attention_heads ({self.num_heads})"
            )
        if ("mamba" in self.layer_types) != (self.mamba is not None):
            raise ValueError(f"{self.name}: mamba layers need a mamba spec (and only they)")
        if any(self.moe_layers) and (self.num_experts <= 0 or self.num_experts_per_tok <= 0):
            raise ValueError(f"{self.name}: MoE layers need num_experts and num_experts_per_tok")

    # -- counts ----------------------------------------------------------------------
    @property
    def num_attention_layers(self) -> int:
        return sum(t != "mamba" for t in self.layer_types)

    @property
    def num_mamba_layers(self) -> int:
        return sum(t == "mamba" for t in self.layer_types)

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def attention_params(self) -> int:
        h = self.hidden_size
        p = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            p += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            p += 2 * self.head_dim
        return p

    def expert_params(self) -> int:
        """One routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def mlp_params(self, moe: bool, active_only: bool = False) -> int:
        h = self.hidden_size
        if not moe:
            return 3 * h * self.intermediate_size
        n = self.num_experts_per_tok if active_only else self.num_experts
        p = n * self.expert_params() + h * self.num_experts  # router
        return p + 3 * h * self.shared_expert_intermediate_size

    def layer_params(self, i: int, active_only: bool = False) -> int:
        h = self.hidden_size
        if self.layer_types[i] == "mamba":
            assert self.mamba is not None
            mixer = self.mamba.params(h)
            norms = h
        else:
            mixer = self.attention_params()
            norms = 2 * h
        has_mlp = self.layer_types[i] != "mamba" or self.intermediate_size > 0 or self.moe_layers[i]
        mlp = self.mlp_params(self.moe_layers[i], active_only) if has_mlp else 0
        if self.layer_types[i] == "mamba" and has_mlp:
            norms += h
        return mixer + mlp + norms

    def num_params(self, include_embedding: bool = False, active_only: bool = False) -> int:
        """Parameters (the input embedding counted only if asked; a tied LM head
        counted once, as the output projection), as ``kvasir.bench.hw.num_params``.
        ``active_only``: the routed experts a token uses, not all of them."""
        total = sum(self.layer_params(i, active_only) for i in range(self.num_layers))
        total += self.hidden_size + self.vocab_size * self.hidden_size  # final norm + lm head
        if include_embedding and not self.tie_word_embeddings:
            total += self.vocab_size * self.hidden_size
        return total


# -- parsing --------------------------------------------------------------------------


def _moe_pattern(cfg: Mapping[str, Any], n: int, num_experts: int) -> tuple[bool, ...]:
    if num_experts <= 0:
        return (False,) * n
    if "expert_layer_period" in cfg:  # Jamba
        period, offset = int(cfg["expert_layer_period"]), int(cfg.get("expert_layer_offset", 0))
        return tuple(i % period == offset for i in range(n))
    first_dense = int(cfg.get("first_k_dense_replace", 0) or 0)  # DeepSeek
    step = int(cfg.get("decoder_sparse_step", 1) or 1)  # Qwen-MoE
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    return tuple(i >= first_dense and i not in mlp_only and (i + 1) % step == 0 for i in range(n))


def _layer_types(cfg: Mapping[str, Any], n: int, model_type: str) -> tuple[str, ...]:
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        m = {
            "full_attention": "attention",
            "attention": "attention",
            "sliding_attention": "sliding_attention",
            "mamba": "mamba",
        }
        try:
            return tuple(m[str(t)] for t in types)
        except KeyError as e:
            raise ValueError(f"layer_types holds an unknown kind {e.args[0]!r}") from e
    if model_type in ("mamba", "mamba2"):
        return ("mamba",) * n
    if "attn_layer_period" in cfg:  # Jamba: attention every period-th layer
        period, offset = int(cfg["attn_layer_period"]), int(cfg.get("attn_layer_offset", 0))
        return tuple("attention" if i % period == offset else "mamba" for i in range(n))
    window = cfg.get("sliding_window")
    if not window:
        return ("attention",) * n
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if not cfg.get("use_sliding_window", False):
            return ("attention",) * n
        # HF Qwen2: layers from max_window_layers on use the window.
        first = int(cfg.get("max_window_layers", n))
        return tuple("sliding_attention" if i >= first else "attention" for i in range(n))
    pattern = cfg.get("sliding_window_pattern")  # Gemma 2/3: every pattern-th is global
    if pattern:
        p = int(pattern)
        return tuple("attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(n))
    return ("sliding_attention",) * n  # Mistral-style: every layer


def _mamba_spec(cfg: Mapping[str, Any], model_type: str, hidden: int) -> MambaSpec | None:
    if model_type == "mamba2":
        num_heads = int(cfg["num_heads"])
        head_dim = int(cfg["head_dim"])
        return MambaSpec(
            version=2,
            d_inner=num_heads * head_dim,
            d_state=int(cfg.get("state_size", 128)),
            d_conv=int(cfg.get("conv_kernel", 4)),
            num_heads=num_heads,
            n_groups=int(cfg.get("n_groups", 1)),
        )
    if model_type == "mamba" or "mamba_d_state" in cfg:
        expand = int(cfg.get("expand", cfg.get("mamba_expand", 2)))
        d_inner = int(cfg.get("intermediate_size", expand * hidden)) if model_type == "mamba" else 0
        d_inner = d_inner or expand * hidden
        dt_rank = cfg.get("time_step_rank", cfg.get("mamba_dt_rank", "auto"))
        if dt_rank == "auto":
            dt_rank = math.ceil(hidden / 16)
        return MambaSpec(
            version=1,
            d_inner=d_inner,
            d_state=int(cfg.get("state_size", cfg.get("mamba_d_state", 16))),
            d_conv=int(cfg.get("conv_kernel", cfg.get("mamba_d_conv", 4))),
            dt_rank=int(dt_rank),
            inner_norms=model_type == "jamba",
        )
    return None


def model_spec_from_hf(cfg: Mapping[str, Any], name: str = "model") -> ModelSpec:
    """A ``ModelSpec`` from an HF config dict. Raises ValueError naming what is missing
    or what is not modelled (multi-head latent attention)."""
    model_type = str(cfg.get("model_type", "llama"))
    if cfg.get("kv_lora_rank"):
        raise ValueError(
            f"{name}: multi-head latent attention (DeepSeek kv_lora_rank) is not modelled"
        )
    try:
        hidden = int(cfg.get("hidden_size") or cfg["d_model"])
        n = int(cfg.get("num_hidden_layers") or cfg["n_layer"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise ValueError(f"{name}: model config is missing {e.args[0]!r}") from e
    types = _layer_types(cfg, n, model_type)
    mamba = _mamba_spec(cfg, model_type, hidden) if "mamba" in types else None
    has_attn = any(t != "mamba" for t in types)
    num_heads = int(cfg.get("num_attention_heads") or 0) if has_attn else 0
    num_kv = int(cfg.get("num_key_value_heads") or num_heads) if has_attn else 0
    head_dim = int(cfg.get("head_dim") or (hidden // num_heads if num_heads else 0))
    num_experts = int(
        cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
    )
    moe = _moe_pattern(cfg, n, num_experts)
    intermediate = 0 if model_type in ("mamba", "mamba2") else int(cfg.get("intermediate_size", 0))
    moe_inter = int(cfg.get("moe_intermediate_size") or (intermediate if num_experts else 0))
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    if not shared and cfg.get("n_shared_experts"):
        shared = int(cfg["n_shared_experts"]) * moe_inter
    quant = cfg.get("quantization_config")
    window = cfg.get("sliding_window")
    return ModelSpec(
        name=name,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=n,
        layer_types=types,
        moe_layers=moe,
        intermediate_size=intermediate,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        sliding_window=int(window) if window and "sliding_attention" in types else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared,
        mamba=mamba,
        checkpoint_quantization=str(quant.get("quant_method")) if isinstance(quant, dict) else None,
    )


def model_spec_from_arch(arch: Any, name: str) -> ModelSpec:
    """From the engine's ``ModelArchConfig`` (GGUF metadata or a parsed config.json)."""
    n = arch.num_hidden_layers
    return ModelSpec(
        name=name,
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        num_layers=n,
        layer_types=("attention",) * n,
        moe_layers=(False,) * n,
        intermediate_size=arch.intermediate_size,
        num_heads=arch.num_attention_heads,
        num_kv_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        tie_word_embeddings=arch.tie_word_embeddings,
        attention_bias=arch.attention_bias,
        qk_norm=arch.qk_norm,
        max_position_embeddings=arch.max_position_embeddings,
    )


def load_model_spec(model: str | None) -> ModelSpec:
    """``--model``: None or "default" (the default model's GGUF), a built-in dummy config
    name, a plan-only config of ``model_zoo``, an HF directory or config.json, or a GGUF
    file. Raises ValueError naming ``--model`` and the choices."""
    from kvasir.models.loader.dummy_loader import available_dummy_configs, dummy_config_path
    from kvasir.models.loader.hf_config import read_json
    from kvasir.plan.model_zoo import ZOO

    if model is None or model == "default":
        from kvasir.models.default import DEFAULT_MODEL_NAME, default_model_path

        return _gguf_spec(default_model_path(), DEFAULT_MODEL_NAME)
    builtin = dummy_config_path(model)
    if builtin is not None:
        return model_spec_from_hf(read_json(builtin), model)
    if model in ZOO:
        return model_spec_from_hf(ZOO[model], model)
    path = os.path.expanduser(model)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return model_spec_from_hf(read_json(os.path.join(path, "config.json")), model)
    if os.path.isfile(path) and path.endswith(".json"):
        return model_spec_from_hf(read_json(path), model)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _gguf_spec(path, os.path.basename(path))
    known = sorted(set(available_dummy_configs()) | set(ZOO))
    raise ValueError(
        f"--model {model!r} is unknown: not a built-in config ({', '.join(known)}), "
        "an HF directory or config.json, nor a .gguf file"
    )


def _gguf_spec(path: str, name: str) -> ModelSpec:
    from kvasir.models.loader.gguf_loader import gguf_arch_config, open_gguf

    return model_spec_from_arch(gguf_arch_config(open_gguf(path), path), name)
