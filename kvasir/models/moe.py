"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (with its gated shared expert) and
Qwen3-MoE.

They are Llama-family decoders (``kvasir.models.llama``: the same attention, norms and
RoPE; Qwen2-MoE has q/k/v bias, Qwen3-MoE q/k norm) whose feed-forward block is, on
sparse layers, a router over ``num_experts`` gated MLPs of which each token uses
``num_experts_per_tok`` (``kvasir.layers.fused_moe``). All three route by softmax over
the experts, then top-k; Mixtral always renormalises the k weights, Qwen when
``norm_topk_prob``. Qwen MoE configs may keep some layers dense (``mlp_only_layers``,
``decoder_sparse_step``).

Checkpoint names: Mixtral ``block_sparse_moe.{gate, experts.E.w1|w2|w3}`` (gate, down,
up), Qwen ``mlp.{gate, experts.E.gate_proj|up_proj|down_proj, shared_expert.*,
shared_expert_gate}``; the stacked ``experts.gate_up_proj`` ``[E, 2I, H]`` and
``experts.down_proj`` ``[E, H, I]`` of transformers 5 are accepted too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from kvasir.config import ModelArchConfig
from kvasir.layers.context import LayerContext
from kvasir.layers.fused_moe import FusedMoE
from kvasir.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from kvasir.models.llama import LlamaDecoderLayer, LlamaForCausalLM

# checkpoint expert matrix -> (FusedMoE parameter, shard)
_EXPERT_SHARDS = {
    "w1": ("w13_weight", "w1"),
    "w3": ("w13_weight", "w3"),
    "w2": ("w2_weight", "w2"),
    "gate_proj": ("w13_weight", "w1"),
    "up_proj": ("w13_weight", "w3"),
    "down_proj": ("w2_weight", "w2"),
}
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight$")
_IN_MEMORY_MLP_RE = re.compile(r"^(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.)")
_STACKED_EXPERTS_RE = re.compile(
    r"^(model\.layers\.\d+)\.(\w+)\.experts\.(gate_up_proj|down_proj)$"
)


def _block_name(config: ModelArchConfig) -> str:
    """The checkpoint's name for the sparse block of a layer."""
    return "block_sparse_moe" if config.model_type == "mixtral" else "mlp"


def _expert_names(config: ModelArchConfig) -> tuple[str, str, str]:
    """(gate, up, down) as the checkpoint names one expert's matrices."""
    if config.model_type == "mixtral":
        return "w1", "w3", "w2"
    return "gate_proj", "up_proj", "down_proj"


class SharedExpert(nn.Module):
    """Qwen2-MoE's dense gated MLP that every token also goes through; its output is
    left partial over the tensor-parallel ranks (the MoE block reduces once)."""

    def __init__(self, hidden: int, inter: int, ctx: LayerContext, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [inter] * 2, False, ctx, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            inter, hidden, False, ctx, reduce_results=False, prefix=f"{prefix}.down_proj"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x))


class SparseMoeBlock(nn.Module):
    """Router + experts (+ the gated shared expert where the model has one)."""

    def __init__(self, config: ModelArchConfig, ctx: LayerContext, prefix: str) -> None:
        super().__init__()
        h = config.hidden_size
        self.gate = ReplicatedLinear(h, config.num_experts, False, ctx, prefix=f"{prefix}.gate")
        self.experts = FusedMoE(
            config.num_experts,
            config.num_experts_per_tok,
            h,
            config.moe_intermediate_size,
            config.norm_topk_prob,
            ctx,
            prefix=f"{prefix}.experts",
        )
        self.shared_expert: SharedExpert | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(
                h, config.shared_expert_intermediate_size, ctx, f"{prefix}.shared_expert"
            )
            self.shared_expert_gate = ReplicatedLinear(
                h, 1, False, ctx, prefix=f"{prefix}.shared_expert_gate"
            )
        self.tp = ctx.parallel.tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        out = self.experts(x, self.gate(x))
        # Without expert parallelism ``out`` is this rank's partial sum.
        partial = not self.experts.expert_parallel
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            shared = self.shared_expert(x) * torch.sigmoid(self.shared_expert_gate(x))
            if partial:
                out = out + shared
            else:
                out = out + self.tp.all_reduce(shared)
        return self.tp.all_reduce(out) if partial else out


class MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: ModelArchConfig, ctx: LayerContext, prefix: str) -> nn.Module:
        index = int(prefix.rsplit(".", 1)[1])
        if config.is_moe_layer(index):
            return SparseMoeBlock(config, ctx, f"{prefix}.{_block_name(config)}")
        return super().make_mlp(config, ctx, prefix)


class MoeForCausalLM(LlamaForCausalLM):
    """Mixtral / Qwen2-MoE / Qwen3-MoE (see the module docstring)."""

    decoder_layer_cls = MoeDecoderLayer

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        shapes = super().expected_weight_shapes()
        gate, up, down = _expert_names(c)
        h, i = c.hidden_size, c.moe_intermediate_size
        for layer in range(c.num_hidden_layers):
            if not c.is_moe_layer(layer):
                continue
            p = f"model.layers.{layer}."
            for name in ("gate_proj", "up_proj", "down_proj"):
                del shapes[f"{p}mlp.{name}.weight"]
            b = f"{p}{_block_name(c)}."
            shapes[b + "gate.weight"] = (c.num_experts, h)
            for e in range(c.num_experts):
                shapes[f"{b}experts.{e}.{gate}.weight"] = (i, h)
                shapes[f"{b}experts.{e}.{up}.weight"] = (i, h)
                shapes[f"{b}experts.{e}.{down}.weight"] = (h, i)
            s = c.shared_expert_intermediate_size
            if s:
                shapes[b + "shared_expert.gate_proj.weight"] = (s, h)
                shapes[b + "shared_expert.up_proj.weight"] = (s, h)
                shapes[b + "shared_expert.down_proj.weight"] = (h, s)
                shapes[b + "shared_expert_gate.weight"] = (1, h)
        return shapes

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._unstack_experts(weights))

    def _unstack_experts(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stacked expert tensors (transformers 5's in-memory layout) as the per-expert
        tensors checkpoints store (views, no copies)."""
        gate, up, down = _expert_names(self.config)
        block = _block_name(self.config)
        for name, tensor in weights:
            if block != "mlp":  # transformers 5 calls Mixtral's sparse block "mlp" too
                name = _IN_MEMORY_MLP_RE.sub(rf"\1.{block}.\2", name)
            m = _STACKED_EXPERTS_RE.match(name)
            if m is None:
                yield name, tensor
                continue
            base = f"{m.group(1)}.{m.group(2)}.experts"
            for e in range(tensor.shape[0]):
                if m.group(3) == "down_proj":
                    yield f"{base}.{e}.{down}.weight", tensor[e]
                else:
                    g, u = tensor[e].chunk(2, dim=0)
                    yield f"{base}.{e}.{gate}.weight", g
                    yield f"{base}.{e}.{up}.weight", u

    def _param_for(
        self, hf_name: str, params: dict[str, nn.Parameter]
    ) -> tuple[nn.Parameter, int | str | tuple[int | None, str] | None]:
        block = _block_name(self.config)
        m = _EXPERT_RE.match(hf_name)
        if m is not None and m.group(2) == block and m.group(4) in _EXPERT_SHARDS:
            param, shard = _EXPERT_SHARDS[m.group(4)]
            return params[f"{m.group(1)}.mlp.experts.{param}"], (int(m.group(3)), shard)
        if block != "mlp":
            hf_name = hf_name.replace(f".{block}.", ".mlp.", 1)
        return super()._param_for(hf_name, params)  # type: ignore[return-value]
