"""One Llama-family decoder covering Llama 2/3/3.x, Mistral, Qwen2, Qwen3 and SmolLM2.

Model-type differences come from ``ModelArchConfig``: ``attention_bias`` (Qwen2 q/k/v
bias; Llama/Qwen3 put it on o_proj too), ``qk_norm`` (Qwen3 per-head RMSNorm on q and k
before RoPE), ``rope_scaling`` (Llama 3.1 "llama3") and ``tie_word_embeddings``.
q/k/v and gate/up projections are fused; ``load_weights`` takes HF tensor names.

The model is pure math over layers built from a ``LayerContext``: the layers hold this
rank's shard of each weight (tensor parallelism) and their ``LinearMethod`` decides how
it is multiplied; a pipeline stage builds only its own decoder layers (the others are
``PPMissingLayer``), the embedding on the first stage and the norm and LM head on the
last.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvasir.attention.backend import AttentionMetadata
from kvasir.config import ModelArchConfig
from kvasir.distributed import IntermediateTensors, stage_layers
from kvasir.layers.attention import Attention
from kvasir.layers.context import LayerContext
from kvasir.layers.layernorm import RMSNorm
from kvasir.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from kvasir.layers.rotary_embedding import RotaryEmbedding
from kvasir.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

# HF sub-projection -> (fused parameter, shard id)
_STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Checkpoint entries that carry no weights we need (old Llama checkpoints saved these).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _o_proj_has_bias(config: ModelArchConfig) -> bool:
    # HF Qwen2 (and Qwen2-MoE) has bias on q/k/v only; Llama and Qwen3 apply
    # attention_bias to o_proj too.
    return config.attention_bias and config.model_type not in ("qwen2", "qwen2_moe")


class PPMissingLayer(nn.Identity):
    """A placeholder for a module another pipeline stage holds."""


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        rotary_emb: RotaryEmbedding,
        ctx: LayerContext,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.attention_bias,
            ctx,
            prefix=f"{prefix}.qkv_proj",
        )
        # This rank's heads.
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim,
            config.hidden_size,
            _o_proj_has_bias(config),
            ctx,
            prefix=f"{prefix}.o_proj",
        )
        pdl = ctx.kernel_config.pdl
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, pdl=pdl)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, pdl=pdl)
        self.qk_norm = config.qk_norm
        # Shared by every layer: one cos/sin table per model.
        self.rotary_emb = rotary_emb
        self.use_rope = config.use_rope
        backend = ctx.attn_backend_cls(
            self.num_heads,
            self.head_dim,
            self.num_kv_heads,
            self.scale,
            **ctx.attn_backend_kwargs(),
        )
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.scale, backend)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        hidden_states: torch.Tensor,  # [num_tokens, hidden_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            num_tokens = q.shape[0]
            # [num_tokens, num_(kv_)heads, head_dim]: the norm is per head
            q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
            q = q.view(num_tokens, self.q_size)
            k = k.view(num_tokens, self.kv_size)
        if not self.use_rope:  # Jamba: no positional encoding in attention
            attn_output = self.attn(q, k, v, kv_cache, attn_metadata)
        elif self.attn.backend.fuses_rotary:
            # The backend rotates q and k in place, fused with its KV-cache write.
            rotary = (positions, self.rotary_emb.cos_sin_cache)
            attn_output = self.attn(q, k, v, kv_cache, attn_metadata, rotary)
        else:
            if self.qk_norm:
                q, k = self.rotary_emb(positions, q, k)
            else:
                # q and k sit side by side in qkv: rotate them in one pass.
                qk = self.rotary_emb.rotate(positions, qkv[:, : self.q_size + self.kv_size])
                q, k = qk.split([self.q_size, self.kv_size], dim=-1)
            attn_output = self.attn(q, k, v, kv_cache, attn_metadata)  # [num_tokens, q_size]
        return self.o_proj(attn_output)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelArchConfig, ctx: LayerContext, prefix: str = "") -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {config.hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            False,
            ctx,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, False, ctx, prefix=f"{prefix}.down_proj"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden] -> [num_tokens, intermediate / tp] -> [num_tokens, hidden]
        return self.down_proj(self.gate_up_proj.silu_and_mul(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        rotary_emb: RotaryEmbedding,
        ctx: LayerContext,
        prefix: str = "",
    ) -> None:
        super().__init__()
        pdl = ctx.kernel_config.pdl
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, pdl=pdl)
        self.self_attn = LlamaAttention(config, rotary_emb, ctx, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, pdl=pdl
        )
        self.mlp = self.make_mlp(config, ctx, prefix)

    def make_mlp(self, config: ModelArchConfig, ctx: LayerContext, prefix: str) -> nn.Module:
        """The feed-forward block after attention (a mixture of experts overrides it)."""
        return LlamaMLP(config, ctx, f"{prefix}.mlp")

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,  # [num_tokens, hidden_size]
        residual: torch.Tensor | None,  # [num_tokens, hidden_size]; None for layer 0
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream travels beside the hidden states so each norm can fuse
        # the residual add (RMSNorm.forward(x, residual)).
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        ctx: LayerContext,
        layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer,
    ) -> None:
        super().__init__()
        par = ctx.parallel
        self.start_layer, self.end_layer = stage_layers(
            ctx.parallel_config, config.num_hidden_layers, par.pp_rank
        )
        self.is_first_stage, self.is_last_stage = par.is_first_stage, par.is_last_stage
        self.embed_tokens: nn.Module = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
            if self.is_first_stage
            else PPMissingLayer()
        )
        rotary_emb = RotaryEmbedding(
            config.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            base=config.rope_theta,
            rope_scaling=config.rope_scaling,
        )
        self.layers = nn.ModuleList(
            layer_cls(config, rotary_emb, ctx, f"model.layers.{i}")
            if self.start_layer <= i < self.end_layer
            else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm: nn.Module = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps, pdl=ctx.kernel_config.pdl)
            if self.is_last_stage
            else PPMissingLayer()
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],  # this stage's layers x [2, num_blocks, bs, kvh, d]
        attn_metadata: AttentionMetadata,
        intermediate: IntermediateTensors | None = None,  # from the previous stage
        num_layers: int | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """``num_layers``: run only the first that many decoder layers, then the final
        norm (a single-stage model; layer-skip self-speculation drafts so)."""
        if self.is_first_stage:
            hidden_states, residual = self.embed_tokens(input_ids), None
        else:
            assert intermediate is not None
            hidden_states, residual = intermediate
        layers = self.layers[self.start_layer : self.end_layer]
        if num_layers is not None:
            assert self.is_first_stage and self.is_last_stage
            layers, kv_caches = layers[:num_layers], kv_caches[:num_layers]
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            hidden_states, residual = layer(
                positions, hidden_states, residual, kv_cache, attn_metadata
            )
        if not self.is_last_stage:
            assert residual is not None
            return IntermediateTensors(hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states  # [num_tokens, hidden_size]


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a paged KV cache (one cache tensor per local layer).

    ``forward`` returns the final hidden states on the last pipeline stage and the
    ``IntermediateTensors`` for the next stage elsewhere; ``compute_logits`` (last
    stage only) returns the full-vocabulary float32 logits on every TP rank.
    """

    decoder_layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: ModelArchConfig, ctx: LayerContext) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, ctx, self.decoder_layer_cls)
        self.lm_head: nn.Module = PPMissingLayer()
        if self.model.is_last_stage:
            tied = None
            if config.tie_word_embeddings and self.model.is_first_stage:
                tied = self.model.embed_tokens  # same rows on the same rank
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx, tied)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
        intermediate: IntermediateTensors | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor | IntermediateTensors:  # [num_tokens, hidden_size] on the last stage
        return self.model(input_ids, positions, kv_caches, attn_metadata, intermediate, num_layers)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden_size] -> [num_tokens, vocab_size] float32
        return self.lm_head(hidden_states)

    def _is_local(self, hf_name: str) -> bool:
        """Whether this pipeline stage holds the tensor ``hf_name``."""
        m = self.model
        if hf_name.startswith("model.layers."):
            index = int(hf_name.split(".", 3)[2])
            return m.start_layer <= index < m.end_layer
        if hf_name == "model.embed_tokens.weight":
            # A tied head on a last stage without the embedding loads it as its weight.
            return m.is_first_stage or (m.is_last_stage and self.config.tie_word_embeddings)
        if hf_name == "model.norm.weight" or hf_name == "lm_head.weight":
            return m.is_last_stage
        return True

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF checkpoint tensor name -> shape, for every tensor ``load_weights`` needs."""
        c = self.config
        q_size = c.num_attention_heads * c.head_dim
        kv_size = c.num_key_value_heads * c.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "model.norm.weight": (c.hidden_size,),
        }
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
            shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
            for name, size in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
                shapes[p + f"self_attn.{name}.weight"] = (size, c.hidden_size)
                if c.attention_bias:
                    shapes[p + f"self_attn.{name}.bias"] = (size,)
            shapes[p + "self_attn.o_proj.weight"] = (c.hidden_size, q_size)
            if _o_proj_has_bias(c):
                shapes[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
            if c.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (c.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (c.head_dim,)
            shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
            shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
            shapes[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
        return shapes

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hand HF-named full tensors, one at a time, to the weight loaders of the
        parameters they fill (each copies this rank's shard; a pipeline stage skips the
        tensors of other stages).

        Raises ValueError naming the first unexpected or wrong-shape tensor, or the
        missing ones once the iterable is exhausted.
        """
        expected = self.expected_weight_shapes()
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store the head anyway
            if name not in expected:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                )
            loaded.add(name)
            if not self._is_local(name):
                continue
            param, shard_id = self._param_for(name, params)
            loader = getattr(param, "weight_loader", None)
            if loader is None:  # norms: whole on every rank
                default_weight_loader(param, tensor)
            elif shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        missing = [n for n in expected if n not in loaded]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"missing weight {missing[0]!r} in checkpoint{more}")

    def _param_for(
        self, hf_name: str, params: dict[str, nn.Parameter]
    ) -> tuple[nn.Parameter, int | str | None]:
        """The parameter HF tensor ``hf_name`` fills, and its shard id in a fused one."""
        if hf_name == "model.embed_tokens.weight" and not self.model.is_first_stage:
            return params["lm_head.weight"], None  # a tied head on a later stage
        module_path, _, kind = hf_name.rpartition(".")  # kind: "weight" or "bias"
        parent, _, leaf = module_path.rpartition(".")
        if leaf not in _STACKED_PARAMS:
            return params[hf_name], None
        fused, shard = _STACKED_PARAMS[leaf]
        return params[f"{parent}.{fused}.{kind}"], shard
