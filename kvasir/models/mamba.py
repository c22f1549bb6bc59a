"""State-space models: Mamba-1 and Mamba-2 (every layer a mixer), and the Jamba hybrid
(Mamba-1 mixers, attention every ``attn_layer_period`` layers on the paged KV cache,
MoE every ``expert_layer_period``), all in one step's flat batch.

Mamba: ``backbone.embeddings`` -> layers of ``h + mixer(norm(h))`` -> ``norm_f`` -> LM
head (tied unless ``lm_head.weight`` is stored). Jamba: ``model.embed_tokens`` -> layers
of ``h + mixer_or_attention(input_layernorm(h))`` then ``h + ffn(pre_ff_layernorm(h))``
-> ``final_layernorm``; its attention uses no positional encoding.

The state-space layers keep one state slot per request (``kvasir.layers.mamba``); the
attention layers of a hybrid take the KV caches in layer order (``kv_caches[j]`` is the
j-th attention layer's). No tensor or pipeline parallelism for these models (refused
at construction).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from kvasir.attention.backend import AttentionMetadata
from kvasir.config import ModelArchConfig
from kvasir.distributed import IntermediateTensors
from kvasir.layers.context import LayerContext
from kvasir.layers.layernorm import RMSNorm
from kvasir.layers.linear import default_weight_loader
from kvasir.layers.mamba import Mamba2Mixer, MambaMixer
from kvasir.layers.rotary_embedding import RotaryEmbedding
from kvasir.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from kvasir.models.llama import _STACKED_PARAMS, LlamaAttention, LlamaMLP
from kvasir.models.moe import _EXPERT_SHARDS, SparseMoeBlock

# checkpoint name of a mixer tensor -> its kvasir parameter (the rest match)
_MIXER_RENAMES = {"conv1d.weight": "conv1d_weight", "conv1d.bias": "conv1d_bias"}
_MIXER2_RENAMES = {**_MIXER_RENAMES, "norm.weight": "norm_weight"}


def _single_rank(ctx: LayerContext, what: str) -> None:
    if ctx.parallel.tp_size > 1 or ctx.parallel.pp_size > 1:
        raise ValueError(
            f"{what} models run on one rank: tensor and pipeline parallelism are not "
            f"supported for their state-space layers (use tensor_parallel_size=1, "
            f"pipeline_parallel_size=1)"
        )


def _mixer_shapes(c: ModelArchConfig, p: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors of one Mamba-1 / Mamba-2 mixer under prefix ``p``."""
    h, d, n, k = c.hidden_size, c.ssm_intermediate_size, c.ssm_state_size, c.ssm_conv_kernel
    s: dict[str, tuple[int, ...]] = {}
    if c.ssm_version == 1:
        r = c.ssm_dt_rank
        s.update({
            "in_proj.weight": (2 * d, h), "conv1d.weight": (d, 1, k), "x_proj.weight": (r + 2 * n, d),
            "dt_proj.weight": (d, r), "dt_proj.bias": (d,), "A_log": (d, n), "D": (d,),
            "out_proj.weight": (h, d),
        })  # fmt: skip
        conv = d
        if c.ssm_inner_norms:
            s.update({"dt_layernorm.weight": (r,), "b_layernorm.weight": (n,),
                      "c_layernorm.weight": (n,)})  # fmt: skip
    else:
        heads, conv = c.ssm_num_heads, d + 2 * c.ssm_n_groups * n
        s.update({
            "in_proj.weight": (d + conv + heads, h), "conv1d.weight": (conv, 1, k),
            "dt_bias": (heads,), "A_log": (heads,), "D": (heads,), "norm.weight": (d,),
            "out_proj.weight": (h, d),
        })  # fmt: skip
    if c.ssm_conv_bias:
        s["conv1d.bias"] = (conv,)
    if c.ssm_bias:
        s["in_proj.bias"] = (s["in_proj.weight"][0],)
        s["out_proj.bias"] = (h,)
    return {f"{p}{name}": shape for name, shape in s.items()}


def _load(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    expected: dict[str, tuple[int, ...]],
    param_name,  # noqa: ANN001 -- (checkpoint name) -> (kvasir parameter name, shard id)
    tied: bool,
) -> None:
    """Check every tensor's name and shape against ``expected`` and hand it to its
    parameter's loader; refuse missing or unexpected tensors by name."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name == "lm_head.weight" and tied:
            continue
        if name not in expected:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"weight {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]}"
            )
        loaded.add(name)
        pname, shard = param_name(name)
        param = params[pname]
        loader = getattr(param, "weight_loader", None) or default_weight_loader
        if shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard)
    missing = [n for n in expected if n not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing weight {missing[0]!r} in checkpoint{more}")


class MambaDecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig, ctx: LayerContext, prefix: str) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        mixer_cls = MambaMixer if config.ssm_version == 1 else Mamba2Mixer
        self.mixer = mixer_cls(config, ctx, f"{prefix}.mixer")

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, md: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = h, self.norm(h)
        else:
            h, residual = self.norm(h, residual)
        return self.mixer(h, md), residual


class MambaBackbone(nn.Module):
    def __init__(self, config: ModelArchConfig, ctx: LayerContext) -> None:
        super().__init__()
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(
            MambaDecoderLayer(config, ctx, f"backbone.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm_f = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MambaForCausalLM(nn.Module):
    """Mamba-1 (``MambaForCausalLM``) and Mamba-2 (``Mamba2ForCausalLM``)."""

    def __init__(self, config: ModelArchConfig, ctx: LayerContext) -> None:
        super().__init__()
        _single_rank(ctx, "Mamba")
        self.config = config
        self.backbone = MambaBackbone(config, ctx)
        tied = self.backbone.embeddings if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx, tied)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
        intermediate: IntermediateTensors | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        h, residual = self.backbone.embeddings(input_ids), None
        for layer in self.backbone.layers[:num_layers]:
            h, residual = layer(h, residual, attn_metadata)
        h, _ = self.backbone.norm_f(h, residual)
        return h  # type: ignore[no-any-return]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)  # type: ignore[no-any-return]

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        shapes: dict[str, tuple[int, ...]] = {
            "backbone.embeddings.weight": (c.vocab_size, c.hidden_size),
            "backbone.norm_f.weight": (c.hidden_size,),
        }
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        for i in range(c.num_hidden_layers):
            p = f"backbone.layers.{i}."
            shapes[p + "norm.weight"] = (c.hidden_size,)
            shapes.update(_mixer_shapes(c, p + "mixer."))
        return shapes

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        renames = _MIXER_RENAMES if self.config.ssm_version == 1 else _MIXER2_RENAMES

        def param_name(name: str) -> tuple[str, None]:
            head, sep, tail = name.partition(".mixer.")
            return (f"{head}.mixer.{renames.get(tail, tail)}" if sep else name), None

        _load(self, weights, self.expected_weight_shapes(), param_name,
              self.config.tie_word_embeddings)  # fmt: skip


# ----------------------------------------------------------------------------- Jamba

_JAMBA_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+)\.feed_forward\.experts\.(\d+)\.(\w+)\.weight$"
)


class JambaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        rotary_emb: RotaryEmbedding,
        ctx: LayerContext,
        index: int,
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.is_mamba = config.is_mamba_layer(index)
        if self.is_mamba:
            self.mamba = MambaMixer(config, ctx, f"{prefix}.mamba")
        else:
            self.self_attn = LlamaAttention(config, rotary_emb, ctx, f"{prefix}.self_attn")
        self.feed_forward: nn.Module
        if config.is_moe_layer(index):
            self.feed_forward = SparseMoeBlock(config, ctx, f"{prefix}.feed_forward")
        else:
            self.feed_forward = LlamaMLP(config, ctx, f"{prefix}.feed_forward")

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor | None,
        md: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        if self.is_mamba:
            h = self.mamba(h, md)
        else:
            assert kv_cache is not None
            h = self.self_attn(positions, h, kv_cache, md)
        h, residual = self.pre_ff_layernorm(h, residual)
        return self.feed_forward(h), residual


class JambaModel(nn.Module):
    def __init__(self, config: ModelArchConfig, ctx: LayerContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        # Jamba attention has no positional encoding: a token table that is never read.
        rotary = RotaryEmbedding(config.head_dim, max_position_embeddings=1, base=10000.0)
        self.layers = nn.ModuleList(
            JambaDecoderLayer(config, rotary, ctx, i) for i in range(config.num_hidden_layers)
        )
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class JambaForCausalLM(nn.Module):
    def __init__(self, config: ModelArchConfig, ctx: LayerContext) -> None:
        super().__init__()
        _single_rank(ctx, "Jamba")
        self.config = config
        self.model = JambaModel(config, ctx)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx, tied)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
        intermediate: IntermediateTensors | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        h, residual = self.model.embed_tokens(input_ids), None
        caches = iter(kv_caches)  # one per attention layer, in layer order
        for layer in self.model.layers[:num_layers]:
            cache = None if layer.is_mamba else next(caches)
            h, residual = layer(positions, h, residual, cache, attn_metadata)
        h, _ = self.model.final_layernorm(h, residual)
        return h  # type: ignore[no-any-return]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)  # type: ignore[no-any-return]

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        h = c.hidden_size
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (c.vocab_size, h),
            "model.final_layernorm.weight": (h,),
        }
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, h)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "pre_ff_layernorm.weight"] = (h,)
            if c.is_mamba_layer(i):
                shapes.update(_mixer_shapes(c, p + "mamba."))
            else:
                for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                    shapes[p + f"self_attn.{name}.weight"] = (size, h)
                shapes[p + "self_attn.o_proj.weight"] = (h, q)
            f = p + "feed_forward."
            if c.is_moe_layer(i):
                shapes[f + "router.weight"] = (c.num_experts, h)
                m = c.moe_intermediate_size
                for e in range(c.num_experts):
                    shapes[f"{f}experts.{e}.gate_proj.weight"] = (m, h)
                    shapes[f"{f}experts.{e}.up_proj.weight"] = (m, h)
                    shapes[f"{f}experts.{e}.down_proj.weight"] = (h, m)
            else:
                i_ = c.intermediate_size
                shapes.update({f + "gate_proj.weight": (i_, h), f + "up_proj.weight": (i_, h),
                               f + "down_proj.weight": (h, i_)})  # fmt: skip
        return shapes

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def param_name(name: str) -> tuple[str, object]:
            m = _JAMBA_EXPERT_RE.match(name)
            if m is not None:
                param, shard = _EXPERT_SHARDS[m.group(3)]
                return f"{m.group(1)}.feed_forward.experts.{param}", (int(m.group(2)), shard)
            if ".mamba." in name:
                head, _, tail = name.partition(".mamba.")
                return f"{head}.mamba.{_MIXER_RENAMES.get(tail, tail)}", None
            if name.endswith("feed_forward.router.weight"):
                return name.replace("router", "gate"), None
            module, _, kind = name.rpartition(".")
            parent, _, leaf = module.rpartition(".")
            if leaf in _STACKED_PARAMS:
                fused, shard_id = _STACKED_PARAMS[leaf]
                return f"{parent}.{fused}.{kind}", shard_id
            return name, None

        _load(self, weights, self.expected_weight_shapes(), param_name,
              self.config.tie_word_embeddings)  # fmt: skip
