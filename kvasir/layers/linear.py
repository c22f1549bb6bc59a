"""Linear layers that know their tensor-parallel shard and own a ``LinearMethod``.

Megatron's splits: a column-parallel layer holds ``output_size / tp_size`` rows of the
weight (q/k/v and gate/up, fused, each sub-projection split on its own), a row-parallel
layer ``input_size / tp_size`` columns and sums the partial outputs with one all-reduce.
Every parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that
takes the full checkpoint tensor and copies the rows or columns of this rank's shard,
so the checkpoint loaders never know the rank.

The ``LinearMethod`` (``kvasir.layers.linear_method``; a quantised one from
``LayerContext.quant_config``) decides how the weight is stored and multiplied: the model
never branches on a device, a dtype or a quantisation scheme.
"""

from __future__ import annotations

import torch
from torch import nn

from kvasir.layers.activation import silu_and_mul
from kvasir.layers.context import LayerContext
from kvasir.layers.linear_method import (
    LinearMethod,
    UnquantizedLinearMethod,
    default_weight_loader,
    set_weight_loader,
    warm_up_linears,
)

__all__ = [
    "ColumnParallelLinear",
    "LinearBase",
    "LinearMethod",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "UnquantizedLinearMethod",
    "default_weight_loader",
    "set_weight_loader",
    "warm_up_linears",
]


class LinearBase(nn.Module):
    """A linear layer with a method; ``forward(x) = method.apply(self, x, bias)``.

    ``output_partition_sizes``: this rank's rows of each fused sub-projection, in
    order (one entry for an unfused layer). ``prefix``: the layer's checkpoint name
    (``model.layers.0.self_attn.qkv_proj``), by which ``ctx.quant_config`` picks its
    method.
    """

    cpu_packed: torch.Tensor | None
    cpu_packed_halves: tuple[torch.Tensor, torch.Tensor] | None

    def __init__(
        self,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        bias: bool,
        ctx: LayerContext,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = output_partition_sizes
        self.output_size_per_partition = sum(output_partition_sizes)
        self.tp_rank = ctx.parallel.tp_rank
        self.tp_size = ctx.parallel.tp_size
        self.tp_group = ctx.parallel.tp
        self.cpu_packed = self.cpu_packed_halves = None
        self.kernel_config = ctx.kernel_config
        method = None
        if ctx.quant_config is not None:
            method = ctx.quant_config.get_linear_method(self, prefix)
        self.method: LinearMethod = method or UnquantizedLinearMethod(ctx.kernel_config)
        self.method.create_weights(
            self, input_size_per_partition, output_partition_sizes, ctx.params_dtype
        )
        if bias:
            b = nn.Parameter(
                torch.empty(self.output_size_per_partition, dtype=ctx.params_dtype),
                requires_grad=False,
            )
            self.register_parameter("bias", b)
            set_weight_loader(b, self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.input_size_per_partition}, "
            f"out_features={self.output_size_per_partition}, tp_size={self.tp_size}"
        )


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, ctx: LayerContext, prefix: str = ""
    ) -> None:
        super().__init__(input_size, [output_size], bias, ctx, prefix)


def _check_divisible(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({tp})")
    return n // tp


class ColumnParallelLinear(LinearBase):
    """Rows ``[tp_rank * n, (tp_rank + 1) * n)`` of each sub-projection, ``n`` its size
    over ``tp_size``; the output stays split (the next row-parallel layer takes it)
    unless ``gather_output``."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        ctx: LayerContext,
        gather_output: bool = False,
        prefix: str = "",
    ) -> None:
        tp = ctx.parallel.tp_size
        self.output_sizes = output_sizes
        parts = [_check_divisible(n, tp, "output size") for n in output_sizes]
        super().__init__(input_size, parts, bias, ctx, prefix)
        self.gather_output = gather_output and tp > 1

    def _shard(self, shard_id: int | str | None) -> tuple[int, int, int]:
        """(offset in the local parameter, rows, first row in the loaded tensor)."""
        i = 0 if shard_id is None else int(shard_id)
        size = self.output_partition_sizes[i]
        return sum(self.output_partition_sizes[:i]), size, self.tp_rank * size

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        offset, size, start = self._shard(shard_id)
        full = size * self.tp_size
        if loaded_weight.shape[0] != full:
            raise ValueError(
                f"weight has {loaded_weight.shape[0]} rows, expected {full} (shard {shard_id})"
            )
        with torch.no_grad():
            param.data.narrow(0, offset, size).copy_(loaded_weight.narrow(0, start, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.method.apply(self, x, self.bias)
        return self.tp_group.all_gather(out, dim=-1) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one weight (gate and
    up): the local weight is ``[gate shard; up shard]``; shard ids are 0, 1, ..."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate(x)) * up(x)`` ``[num_tokens, output_sizes[0] / tp_size]``."""
        out = self.method.apply_silu_mul(self, x)
        if out is not None:
            return out
        return silu_and_mul(self.method.apply(self, x, self.bias))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v of the attention heads this rank holds, in one weight.

    Query heads split evenly; KV heads split when ``tp_size`` divides them, else each
    is replicated on ``tp_size / num_kv_heads`` consecutive ranks (one KV head each).
    Shard ids: "q", "k", "v".
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool,
        ctx: LayerContext,
        prefix: str = "",
    ) -> None:
        tp = ctx.parallel.tp_size
        self.head_dim = head_dim
        self.num_heads = _check_divisible(total_num_heads, tp, "num_attention_heads")
        if tp >= total_num_kv_heads:
            if tp % total_num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size ({tp}) must divide num_key_value_heads "
                    f"({total_num_kv_heads}) or be a multiple of it"
                )
            self.num_kv_heads, self.num_kv_head_replicas = 1, tp // total_num_kv_heads
        else:
            self.num_kv_heads = _check_divisible(total_num_kv_heads, tp, "num_key_value_heads")
            self.num_kv_head_replicas = 1
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.output_sizes = [q * tp, kv * tp, kv * tp]  # as if every rank had its own
        LinearBase.__init__(self, hidden_size, [q, kv, kv], bias, ctx, prefix)
        self.gather_output = False

    def _shard(self, shard_id: int | str | None) -> tuple[int, int, int]:
        q, kv = self.output_partition_sizes[0], self.output_partition_sizes[1]
        if shard_id == "q":
            return 0, q, self.tp_rank * q
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        offset = q if shard_id == "k" else q + kv
        return offset, kv, kv_rank * kv

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"qkv shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        offset, size, start = self._shard(shard_id)
        with torch.no_grad():
            param.data.narrow(0, offset, size).copy_(loaded_weight.narrow(0, start, size))


class RowParallelLinear(LinearBase):
    """Columns ``[tp_rank * k, (tp_rank + 1) * k)`` of the weight, ``k = input_size /
    tp_size``, for an input that is already split (the column-parallel layer before);
    the partial outputs are summed by one all-reduce. The bias is added once, by rank
    0, before the reduce."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        ctx: LayerContext,
        reduce_results: bool = True,
        prefix: str = "",
    ) -> None:
        tp = ctx.parallel.tp_size
        k = _check_divisible(input_size, tp, "input size")
        super().__init__(k, [output_size], bias, ctx, prefix)
        self.reduce = ctx.parallel.tp.all_reduce if reduce_results else (lambda t: t)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        if param.dim() == 1:  # the bias: whole on every rank
            default_weight_loader(param, loaded_weight)
            return
        k = self.input_size_per_partition
        with torch.no_grad():
            param.data.copy_(loaded_weight.narrow(1, self.tp_rank * k, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return self.reduce(self.method.apply(self, x, bias))
