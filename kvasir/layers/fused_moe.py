"""Mixture-of-experts layers: top-k routing and ``FusedMoE``, the experts of one layer in
two stacked weights with a ``FusedMoEMethod`` that multiplies them.

``FusedMoE`` holds ``w13`` ``[local experts, 2 * I, H]`` (each expert's gate rows, then
its up rows) and ``w2`` ``[local experts, H, I]``. Under tensor parallelism it is split
one of two ways:

* by default every rank holds a slice of every expert (``I / tp`` of the intermediate
  width: gate/up rows column-parallel, down columns row-parallel) and the partial
  outputs are summed by the caller's all-reduce, as a dense MLP's are;
* with ``enable_expert_parallel`` each rank holds ``E / tp`` whole experts. Each rank
  routes its share of the tokens, sends every (token, expert) assignment to the rank
  that holds the expert (all-to-all), runs its experts on what it received, sends the
  results back (all-to-all), sums them per token, and all ranks gather the tokens
  again — the output is complete, with no all-reduce.

Every parameter has a ``weight_loader(param, tensor, shard_id)``: ``shard_id`` is
``(expert, "w1" | "w3" | "w2")`` for one expert's gate / up / down matrix as Mixtral
and Qwen checkpoints store them, or ``(None, "w13" | "w2")`` for all experts stacked
(``experts.gate_up_proj`` / ``experts.down_proj`` as transformers 5 holds them); it
copies this rank's part and skips experts another rank holds.

The method comes from ``quant_config.get_moe_method(layer, prefix)`` where a scheme
has one; a scheme without MoE support is refused, never silently left unquantised.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvasir.layers.context import LayerContext
from kvasir.layers.linear_method import set_weight_loader

if TYPE_CHECKING:
    from kvasir.distributed.parallel_state import GroupCoordinator


def select_experts(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] float32, ids [T, top_k] int64): softmax over all experts in
    float32, the ``top_k`` largest, renormalised to sum to 1 if asked. (Softmax over
    just the top-k logits, as some Mixtral implementations do, gives the same weights
    as softmax-then-top-k renormalised.)"""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoEMethod(ABC):
    """How a ``FusedMoE`` stores and applies its expert weights (the MoE counterpart of
    ``LinearMethod``)."""

    @abstractmethod
    def create_weights(
        self,
        layer: FusedMoE,
        num_local_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
    ) -> None: ...

    def process_weights_after_loading(self, layer: FusedMoE) -> None:  # noqa: B027
        """Repack or derive what ``apply`` needs; the default keeps the weights."""

    @abstractmethod
    def apply(
        self,
        layer: FusedMoE,
        x: torch.Tensor,  # [T, H]
        topk_weights: torch.Tensor,  # [T, top_k] float32
        topk_ids: torch.Tensor,  # [T, top_k] local expert ids, -1: another rank's
    ) -> torch.Tensor: ...  # [T, H]: sum over the local experts of weight * expert(x)


class UnquantizedFusedMoEMethod(FusedMoEMethod):
    """Weights in the model's dtype. CUDA: the two-launch Triton kernel of
    ``kvasir.kernels.fused_moe``; elsewhere one gated MLP per expert over its tokens."""

    def create_weights(
        self,
        layer: FusedMoE,
        num_local_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
    ) -> None:
        i = intermediate_size_per_partition
        w13 = nn.Parameter(
            torch.empty(num_local_experts, 2 * i, hidden_size, dtype=params_dtype),
            requires_grad=False,
        )
        w2 = nn.Parameter(
            torch.empty(num_local_experts, hidden_size, i, dtype=params_dtype),
            requires_grad=False,
        )
        layer.register_parameter("w13_weight", w13)
        layer.register_parameter("w2_weight", w2)
        set_weight_loader(w13, layer.weight_loader)
        set_weight_loader(w2, layer.weight_loader)

    def apply(
        self,
        layer: FusedMoE,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        from kvasir.kernels.fused_moe import fused_moe, fused_moe_torch

        if x.is_cuda:
            return fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids)
        return fused_moe_torch(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids)


class W8FusedMoEMethod(UnquantizedFusedMoEMethod):
    """Expert weights in 8 bits (FP8 E4M3 or INT8) with one float32 scale per output
    channel of each expert, quantised once after loading (the full-precision copy is
    dropped); activations stay in the model dtype (W8A16). CUDA: the same Triton kernel,
    widening the weights in its loads and scaling the accumulators; elsewhere each
    expert's weights are dequantised for its tokens."""

    def __init__(self, weight_dtype: torch.dtype) -> None:
        if weight_dtype not in (torch.int8, torch.float8_e4m3fn):
            raise ValueError(
                f"MoE expert weights: 8-bit dtype must be int8 or fp8, got {weight_dtype}"
            )
        self.weight_dtype = weight_dtype

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        from kvasir.quantization.utils import quantize_weight

        for name in ("w13_weight", "w2_weight"):
            w = getattr(layer, name).data  # [E, N, K]
            qs = [quantize_weight(w[e], self.weight_dtype, "channel") for e in range(w.shape[0])]
            delattr(layer, name)
            q = torch.stack([q for q, _ in qs]) if qs else w.to(self.weight_dtype)
            scale = torch.stack([s for _, s in qs]) if qs else w.new_empty(0, w.shape[1])
            layer.register_parameter(name, nn.Parameter(q, requires_grad=False))
            layer.register_parameter(
                name.replace("weight", "scale"), nn.Parameter(scale.float(), requires_grad=False)
            )

    def apply(
        self,
        layer: FusedMoE,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        from kvasir.kernels.fused_moe import fused_moe, fused_moe_torch

        w13, w2 = layer.w13_weight, layer.w2_weight
        s13, s2 = layer.w13_scale, layer.w2_scale
        if x.is_cuda:
            return fused_moe(
                x, w13, w2, topk_weights, topk_ids, w13_scale=s13, w2_scale=s2
            )  # fmt: skip
        return fused_moe_torch(x, w13, w2, topk_weights, topk_ids, w13_scale=s13, w2_scale=s2)


class FusedMoE(nn.Module):
    """The routed experts of one MoE layer (see the module docstring).

    ``forward(x, router_logits)`` returns ``[T, H]``: with expert parallelism (or one
    rank) the full output; otherwise this rank's partial sum, which the caller
    all-reduces (``reduce_results`` does it here)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        ctx: LayerContext,
        prefix: str = "",
        reduce_results: bool = False,
    ) -> None:
        super().__init__()
        par = ctx.parallel
        tp = par.tp_size
        self.prefix = prefix
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size = hidden_size
        self.renormalize = renormalize
        self.tp_rank, self.tp_size = par.tp_rank, tp
        self.group: GroupCoordinator = par.tp
        self.expert_parallel = ctx.parallel_config.enable_expert_parallel and tp > 1
        if self.expert_parallel:
            if num_experts % tp:
                raise ValueError(
                    f"--enable-expert-parallel: num_experts ({num_experts}) is not divisible "
                    f"by tensor_parallel_size ({tp})"
                )
            self.num_local_experts = num_experts // tp
            self.first_expert = self.tp_rank * self.num_local_experts
            self.intermediate_size_per_partition = intermediate_size
        else:
            if intermediate_size % tp:
                raise ValueError(
                    f"moe_intermediate_size ({intermediate_size}) is not divisible by "
                    f"tensor_parallel_size ({tp})"
                )
            self.num_local_experts, self.first_expert = num_experts, 0
            self.intermediate_size_per_partition = intermediate_size // tp
        self.reduce_results = reduce_results and not self.expert_parallel and tp > 1
        # The all-to-all exchange sizes come to the host each step: no CUDA graphs.
        self.cuda_graph_safe = not self.expert_parallel
        method: FusedMoEMethod | None = None
        qc = ctx.quant_config
        if qc is not None:
            get = getattr(qc, "get_moe_method", None)
            if get is None:
                raise ValueError(
                    f"quantization {qc.name!r} does not support mixture-of-experts layers "
                    f"({prefix}); run this model unquantised or with a scheme that does"
                )
            method = get(self, prefix)
        self.method: FusedMoEMethod = method or UnquantizedFusedMoEMethod()
        self.method.create_weights(
            self,
            self.num_local_experts,
            hidden_size,
            self.intermediate_size_per_partition,
            ctx.params_dtype,
        )

    # -- loading ---------------------------------------------------------------------

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded_weight: torch.Tensor,
        shard_id: tuple[int | None, str],
    ) -> None:
        expert, which = shard_id
        if expert is None:  # all experts stacked: [E, 2I, H] or [E, H, I]
            for e in range(self.num_local_experts):
                w = loaded_weight[self.first_expert + e]
                if which == "w13":
                    inter = w.shape[0] // 2
                    self._copy_expert(param, e, w[:inter], "w1")
                    self._copy_expert(param, e, w[inter:], "w3")
                else:
                    self._copy_expert(param, e, w, "w2")
            return
        local = expert - self.first_expert
        if 0 <= local < self.num_local_experts:
            self._copy_expert(param, local, loaded_weight, which)

    def _copy_expert(self, param: nn.Parameter, e: int, w: torch.Tensor, which: str) -> None:
        i = self.intermediate_size_per_partition
        # Expert parallelism keeps whole experts; otherwise this rank's slice of I.
        start = 0 if self.expert_parallel else self.tp_rank * i
        with torch.no_grad():
            if which == "w2":  # [H, I_full]: this rank's columns
                param.data[e].copy_(w.narrow(1, start, i))
            elif which in ("w1", "w3"):  # [I_full, H]: this rank's rows of gate or up
                offset = 0 if which == "w1" else i
                param.data[e].narrow(0, offset, i).copy_(w.narrow(0, start, i))
            else:
                raise ValueError(f"expert shard must be 'w1', 'w2' or 'w3', got {which!r}")

    # -- forward -----------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        router_logits: torch.Tensor,  # [T, E]
    ) -> torch.Tensor:  # [T, H]
        if self.expert_parallel:
            return self._forward_expert_parallel(x, router_logits)
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        out = self.method.apply(self, x, weights, ids)
        return self.group.all_reduce(out) if self.reduce_results else out

    def _forward_expert_parallel(
        self, x: torch.Tensor, router_logits: torch.Tensor
    ) -> torch.Tensor:
        """All-to-all dispatch and combine over the tensor-parallel group (see the module
        docstring). Every rank holds every token, so each routes a contiguous share."""
        group, ranks, rank = self.group, self.tp_size, self.tp_rank
        num_tokens = x.shape[0]
        share = -(-num_tokens // ranks)  # ceil: the last ranks may get fewer (or none)
        lo, hi = min(rank * share, num_tokens), min((rank + 1) * share, num_tokens)
        mine = x[lo:hi]
        weights, ids = select_experts(router_logits[lo:hi], self.top_k, self.renormalize)
        flat_ids = ids.reshape(-1)
        token_of = torch.arange(hi - lo, device=x.device).repeat_interleave(self.top_k)
        dest = flat_ids // self.num_local_experts
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=ranks)
        recv_counts = group.all_to_all(send_counts, [1] * ranks, [1] * ranks)
        sends, recvs = send_counts.tolist(), recv_counts.tolist()
        rows = group.all_to_all(mine[token_of[order]], sends, recvs)
        meta = torch.stack(
            [(flat_ids[order] % self.num_local_experts).float(), weights.reshape(-1)[order]], 1
        )
        meta = group.all_to_all(meta, sends, recvs)  # [received, 2]: local expert, weight
        # Each received row is one assignment: run it as a token with top_k = 1.
        local_ids = meta[:, 0:1].to(torch.int64)
        done = self.method.apply(self, rows, meta[:, 1:2], local_ids)
        back = group.all_to_all(done, recvs, sends)  # in this rank's send order
        out = torch.zeros(share, x.shape[1], dtype=x.dtype, device=x.device)
        out.index_add_(0, token_of[order], back)
        return group.all_gather(out, dim=0)[:num_tokens]

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, local={self.num_local_experts}, top_k={self.top_k}, "
            f"intermediate_per_partition={self.intermediate_size_per_partition}, "
            f"expert_parallel={self.expert_parallel}"
        )
