"""HF ``config.json`` (+ ``generation_config.json``) -> ModelArchConfig."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from kvasir.config import ModelArchConfig
from kvasir.layers.rotary_embedding import SUPPORTED_ROPE_TYPES, get_rope_type

logger = logging.getLogger(__name__)

# For configs without an `architectures` list.
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mamba": "MambaForCausalLM",
    "mamba2": "Mamba2ForCausalLM",
    "jamba": "JambaForCausalLM",
}
# MoE routing options of other families (DeepSeek, GLM, ...) that this router lacks:
# key -> the values that mean "plain softmax top-k".
_UNSUPPORTED_ROUTING = {
    "scoring_func": (None, "softmax"),
    "topk_method": (None, "greedy"),
    "routed_scaling_factor": (None, 1.0),
    "n_group": (None, 1),
    "topk_group": (None, 1),
    "moe_layer_freq": (None, 1),
    "first_k_dense_replace": (None, 0),
}
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read JSON file '{path}': {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"JSON file '{path}' must hold an object")
    return data


def token_ids(value: Any) -> tuple[int, ...]:
    """An HF ``eos_token_id`` (None, int or list) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def merge_ids(*groups: tuple[int, ...]) -> tuple[int, ...]:
    """Concatenate id tuples, dropping repeats, keeping first-seen order."""
    return tuple(dict.fromkeys(i for g in groups for i in g))


def _first_id(*values: Any) -> int | None:
    for v in values:
        ids = token_ids(v)
        if ids:
            return ids[0]
    return None


def parse_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the classic ``rope_theta``/``rope_scaling``
    keys or transformers 5's ``rope_parameters`` (which holds rope_theta inside)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be an object, got {params!r}")
    if set(params) and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = get_rope_type(params)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return float(theta), None
    for key in _ROPE_REQUIRED_KEYS.get(rope_type, ()):
        if key not in params:
            raise ValueError(f"rope_scaling of type {rope_type!r} needs {key!r}")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def _ssm_arch_config(
    cfg: dict[str, Any], model_type: str, architectures: list[str], gen: dict[str, Any]
) -> ModelArchConfig:
    """Mamba-1 / Mamba-2 (every layer a state-space mixer) and Jamba (Mamba-1 layers
    with attention every ``attn_layer_period`` and MoE every ``expert_layer_period``)."""
    h = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    common: dict[str, Any] = dict(
        architectures=tuple(architectures),
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=h,
        num_hidden_layers=layers,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "mamba")),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        bos_token_id=_first_id(cfg.get("bos_token_id"), gen.get("bos_token_id")),
        eos_token_id=merge_ids(
            token_ids(cfg.get("eos_token_id")), token_ids(gen.get("eos_token_id"))
        ),
        model_type=model_type,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 1 << 20),
    )
    if common["hidden_act"] != "silu":
        raise ValueError(f"hidden_act {common['hidden_act']!r} is not supported (only 'silu')")
    if model_type == "jamba":
        period, offset = int(cfg["attn_layer_period"]), int(cfg["attn_layer_offset"])
        e_period, e_offset = int(cfg["expert_layer_period"]), int(cfg["expert_layer_offset"])
        num_heads = int(cfg["num_attention_heads"])
        num_experts = int(cfg.get("num_experts") or 1)
        experts = num_experts > 1
        state = int(cfg["mamba_d_state"])
        return ModelArchConfig(
            **common,
            intermediate_size=int(cfg["intermediate_size"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=h // num_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            layer_types=tuple(
                "attention" if i % period == offset else "mamba" for i in range(layers)
            ),
            num_experts=num_experts if experts else 0,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 2) if experts else 0,
            moe_intermediate_size=int(cfg["intermediate_size"]) if experts else 0,
            norm_topk_prob=False,  # Jamba leaves the top-k weights unnormalised
            mlp_only_layers=tuple(i for i in range(layers) if i % e_period != e_offset),
            ssm_version=1,
            ssm_state_size=state,
            ssm_conv_kernel=int(cfg.get("mamba_d_conv", 4)),
            ssm_intermediate_size=int(cfg.get("mamba_expand", 2)) * h,
            ssm_dt_rank=int(cfg.get("mamba_dt_rank") or -(-h // 16)),
            ssm_bias=bool(cfg.get("mamba_proj_bias", False)),
            ssm_conv_bias=bool(cfg.get("mamba_conv_bias", True)),
            ssm_inner_norms=True,
            use_rope=False,
        )
    version = 1 if model_type == "mamba" else 2
    inter = int(cfg.get("intermediate_size") or int(cfg.get("expand", 2)) * h)
    ssm: dict[str, Any] = dict(
        ssm_version=version,
        ssm_state_size=int(cfg["state_size"]),
        ssm_conv_kernel=int(cfg.get("conv_kernel", 4)),
        ssm_intermediate_size=inter,
        ssm_bias=bool(cfg.get("use_bias", False)),
        ssm_conv_bias=bool(cfg.get("use_conv_bias", True)),
    )
    if version == 1:
        rank = cfg.get("time_step_rank", "auto")
        ssm["ssm_dt_rank"] = -(-h // 16) if rank == "auto" else int(rank)
    else:
        heads, head_dim = int(cfg["num_heads"]), int(cfg["head_dim"])
        if heads * head_dim != inter:
            raise ValueError(
                f"num_heads x head_dim ({heads} x {head_dim}) must equal the SSM width "
                f"expand x hidden_size ({inter})"
            )
        limit = cfg.get("time_step_limit") or (0.0, float("inf"))
        ssm.update(
            ssm_num_heads=heads,
            ssm_head_dim=head_dim,
            ssm_n_groups=int(cfg.get("n_groups", 1)),
            ssm_chunk_size=int(cfg.get("chunk_size", 256)),
            ssm_time_step_limit=tuple(_as_float(v) for v in limit),
        )
    return ModelArchConfig(
        **common,
        intermediate_size=inter,
        # No attention: one nominal head (nothing is built from these).
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=1,
        rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        layer_types=("mamba",) * layers,
        **ssm,
    )


def _as_float(v: Any) -> float:
    """A float, also from transformers' JSON encoding of infinity."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)


def arch_config_from_hf(
    cfg: dict[str, Any], generation_config: dict[str, Any] | None = None
) -> ModelArchConfig:
    """Build a ModelArchConfig from an HF config dict (Llama/Mistral/Qwen2/Qwen3 keys)."""
    model_type = str(cfg.get("model_type", "llama"))
    architectures = cfg.get("architectures") or [
        _ARCH_BY_MODEL_TYPE.get(model_type, f"<model_type {model_type}>")
    ]
    if model_type in ("mamba", "mamba2", "jamba"):
        try:
            return _ssm_arch_config(cfg, model_type, list(architectures), generation_config or {})
        except KeyError as e:
            raise ValueError(f"model config is missing {e.args[0]!r}") from e
    num_heads = int(cfg["num_attention_heads"])
    hidden_size = int(cfg["hidden_size"])
    rope_theta, rope_scaling = parse_rope(cfg)
    max_pos = int(cfg.get("max_position_embeddings") or 4096)
    # No sliding-window attention here: cap the context where a window would bite so
    # results stay exact (a window >= sequence length is plain causal attention).
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", model_type in ("mistral", "mixtral"))
    if window and uses_window and window < max_pos:
        logger.warning(
            "sliding_window=%d is not supported; max_position_embeddings capped %d -> %d",
            window,
            max_pos,
            window,
        )
        max_pos = int(window)
    gen = generation_config or {}
    moe = _moe_fields(cfg, model_type)
    try:
        return ModelArchConfig(
            architectures=tuple(architectures),
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type in ("qwen2", "qwen2_moe")
            or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            hidden_act=str(cfg.get("hidden_act", "silu")),
            bos_token_id=_first_id(cfg.get("bos_token_id"), gen.get("bos_token_id")),
            eos_token_id=merge_ids(
                token_ids(cfg.get("eos_token_id")), token_ids(gen.get("eos_token_id"))
            ),
            model_type=model_type,
            **moe,
        )
    except KeyError as e:
        raise ValueError(f"model config is missing {e.args[0]!r}") from e


def _moe_fields(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelArchConfig from an HF config ({} for a dense
    model). Routing options this router does not implement are refused by name."""
    num_experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if not num_experts:
        return {}
    for key, plain in _UNSUPPORTED_ROUTING.items():
        if cfg.get(key) not in plain:
            raise ValueError(
                f"MoE routing option {key}={cfg[key]!r} is not supported (supported: "
                f"softmax top-k routing as Mixtral and Qwen MoE use; {key} in {plain})"
            )
    mixtral = model_type == "mixtral"
    inter = cfg.get("moe_intermediate_size") or (cfg.get("intermediate_size") if mixtral else None)
    if not inter:
        raise ValueError("MoE model config is missing 'moe_intermediate_size'")
    return dict(
        num_experts=int(num_experts),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 2),
        moe_intermediate_size=int(inter),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        # Mixtral always renormalises the top-k weights; Qwen only with norm_topk_prob.
        norm_topk_prob=True if mixtral else bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )


def load_hf_arch_config(config_path: str) -> ModelArchConfig:
    """Read ``config.json`` at ``config_path`` and ``generation_config.json`` beside it."""
    cfg = read_json(config_path)
    gen_path = os.path.join(os.path.dirname(config_path), "generation_config.json")
    gen = read_json(gen_path) if os.path.isfile(gen_path) else None
    try:
        return arch_config_from_hf(cfg, gen)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e
