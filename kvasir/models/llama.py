"""One Llama-family decoder covering Llama 2/3/3.x, Mistral, Qwen2, Qwen3 and SmolLM2.

Model-type differences come from ``ModelArchConfig``: ``attention_bias`` (Qwen2 q/k/v
bias; Llama/Qwen3 put it on o_proj too), ``qk_norm`` (Qwen3 per-head RMSNorm on q and k
before RoPE), ``rope_scaling`` (Llama 3.1 "llama3") and ``tie_word_embeddings``.
q/k/v and gate/up projections are fused; ``load_weights`` takes HF tensor names.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvasir.attention.backend import AttentionBackend, AttentionMetadata
from kvasir.config import ModelArchConfig
from kvasir.layers.activation import SiluAndMul
from kvasir.layers.attention import Attention
from kvasir.layers.layernorm import RMSNorm
from kvasir.layers.linear import gate_up_silu_mul, linear
from kvasir.layers.rotary_embedding import RotaryEmbedding

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
    # HF Qwen2 has bias on q/k/v only; Llama and Qwen3 apply attention_bias to o_proj too.
    return config.attention_bias and config.model_type != "qwen2"


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        rotary_emb: RotaryEmbedding,
        attn_backend_cls: type[AttentionBackend],
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=_o_proj_has_bias(config))
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        # Shared by every layer: one cos/sin table per model.
        self.rotary_emb = rotary_emb
        backend = attn_backend_cls(self.num_heads, self.head_dim, self.num_kv_heads, self.scale)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.scale, backend)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        hidden_states: torch.Tensor,  # [num_tokens, hidden_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        qkv = linear(hidden_states, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            num_tokens = q.shape[0]
            # [num_tokens, num_(kv_)heads, head_dim]: the norm is per head
            q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
            q = q.view(num_tokens, self.q_size)
            k = k.view(num_tokens, self.kv_size)
        if self.attn.backend.fuses_rotary:
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
        return linear(attn_output, self.o_proj.weight, self.o_proj.bias)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {config.hidden_act!r}")
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden] -> [num_tokens, 2 * intermediate] -> [num_tokens, hidden]
        act = gate_up_silu_mul(x, self.gate_up_proj.weight)
        if act is None:
            act = self.act_fn(linear(x, self.gate_up_proj.weight))
        return linear(act, self.down_proj.weight, self.down_proj.bias)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        rotary_emb: RotaryEmbedding,
        attn_backend_cls: type[AttentionBackend],
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary_emb, attn_backend_cls)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

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
    def __init__(self, config: ModelArchConfig, attn_backend_cls: type[AttentionBackend]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(
            config.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            base=config.rope_theta,
            rope_scaling=config.rope_scaling,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary_emb, attn_backend_cls)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],  # num_layers x [2, num_blocks, block_size, kvh, d]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states, residual = layer(
                positions, hidden_states, residual, kv_cache, attn_metadata
            )
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a paged KV cache (one cache tensor per layer)."""

    def __init__(self, config: ModelArchConfig, attn_backend_cls: type[AttentionBackend]) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, attn_backend_cls)
        if config.tie_word_embeddings:
            # An alias, not a copy: one parameter, visited once by .to()/to_empty().
            self.lm_head: nn.Module = self.model.embed_tokens
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden_size] -> [num_tokens, vocab_size] float32
        return linear(hidden_states, self.lm_head.weight).float()

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
        """Copy HF-named tensors into the (possibly fused) parameters, one at a time.

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
            with torch.no_grad():
                self._param_slice(name, params).copy_(tensor)
            loaded.add(name)
        missing = [n for n in expected if n not in loaded]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"missing weight {missing[0]!r} in checkpoint{more}")

    def _param_slice(self, hf_name: str, params: dict[str, nn.Parameter]) -> torch.Tensor:
        """The parameter (or the rows of a fused one) that HF tensor ``hf_name`` fills."""
        module_path, _, kind = hf_name.rpartition(".")  # kind: "weight" or "bias"
        parent, _, leaf = module_path.rpartition(".")
        if leaf not in _STACKED_PARAMS:
            return params[hf_name].data
        fused, shard = _STACKED_PARAMS[leaf]
        param = params[f"{parent}.{fused}.{kind}"].data
        c = self.config
        if fused == "gate_up_proj":
            size = c.intermediate_size
            return param.narrow(0, int(shard) * size, size)
        q_size = c.num_attention_heads * c.head_dim
        kv_size = c.num_key_value_heads * c.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[
            str(shard)
        ]
        return param.narrow(0, offset, size)
