"""The token embedding and the LM head, split over the vocabulary.

Rank ``r`` of ``tp_size`` holds rows ``[r * V / tp_size, (r + 1) * V / tp_size)`` of the
``[V, hidden]`` table. The embedding looks up the ids in its range, zeroes the others
and sums the ranks' rows with one all-reduce; the LM head computes the logits of its
rows and gathers them once, so every rank's sampler sees the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvasir.layers.context import LayerContext
from kvasir.layers.linear import LinearBase, _check_divisible, set_weight_loader


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, ctx: LayerContext) -> None:
        super().__init__()
        tp = ctx.parallel.tp_size
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = _check_divisible(num_embeddings, tp, "vocab_size")
        self.vocab_start = ctx.parallel.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition
        self.tp_size = tp
        self.tp_group = ctx.parallel.tp
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=ctx.params_dtype),
            requires_grad=False,
        )
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        n = self.num_embeddings_per_partition
        with torch.no_grad():
            param.data.copy_(loaded_weight.narrow(0, self.vocab_start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # [num_tokens] -> [num_tokens, hidden]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = torch.where(outside, 0, input_ids - self.vocab_start)
        out = F.embedding(local, self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.tp_group.all_reduce(out)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings_per_partition} of {self.num_embeddings}, "
            f"tp_size={self.tp_size}"
        )


class ParallelLMHead(LinearBase):
    """``hidden @ W^T`` over this rank's vocabulary rows, gathered into the full
    ``[num_tokens, vocab_size]`` float32 logits. With tied embeddings the weight is the
    embedding's own parameter (same rows on the same rank)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        ctx: LayerContext,
        tied_to: VocabParallelEmbedding | None = None,
        prefix: str = "lm_head",
    ) -> None:
        tp = ctx.parallel.tp_size
        part = _check_divisible(num_embeddings, tp, "vocab_size")
        super().__init__(embedding_dim, [part], False, ctx, prefix)
        self.vocab_start = ctx.parallel.tp_rank * part
        if tied_to is not None:
            self.weight = tied_to.weight  # an alias: one parameter, loaded once

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        n = self.output_size_per_partition
        with torch.no_grad():
            param.data.copy_(loaded_weight.narrow(0, self.vocab_start, n))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden] -> [num_tokens, vocab_size] float32
        logits = self.method.apply(self, hidden_states).float()
        return self.tp_group.all_gather(logits, dim=-1)
