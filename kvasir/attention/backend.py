"""The attention-backend interface and the per-step metadata every backend reads.

KV cache layout (one tensor per layer, shared by every backend):
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)
A token at position ``p`` of request ``r`` lives in block ``block_table[r, p // block_size]``
at offset ``p % block_size``; ``slot_mapping`` holds ``block_id * block_size + offset``
for each token of the flat batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and passed explicitly to every layer.

    The flat batch holds ``num_reqs`` requests; request ``i`` contributes query tokens
    ``query_start_loc[i]:query_start_loc[i+1]``, which are the last ``query_len`` of its
    ``seq_lens[i]`` tokens (so its first ``seq_lens[i] - query_len`` tokens are already
    in the KV cache: a cached prefix or earlier chunks/decode steps).
    """

    num_reqs: int
    num_actual_tokens: int  # tokens in the flat batch (may be < padded size in graphs)
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, device (cu_seqlens_q)
    seq_lens: torch.Tensor  # [num_reqs] int32, device
    block_table: torch.Tensor  # [num_reqs, max_num_blocks_per_req] int32, device
    slot_mapping: torch.Tensor  # [num_tokens] int64, device
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1] int32, host copy
    seq_lens_cpu: torch.Tensor  # [num_reqs] int32, host copy
    # Per-step values a backend derives once and reuses in every layer (the metadata is
    # built afresh each step, so nothing here outlives its step).
    scratch: dict[object, Any] = field(default_factory=dict)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Computes causal attention for a varlen batch over a paged KV cache.

    Contract: ``forward`` first writes this step's ``key``/``value`` into ``kv_cache``
    at ``slot_mapping``, then attends each query token to every cached token of its
    request at a position <= its own. Output dtype equals ``query``'s dtype.
    """

    name: str = "abstract"
    # True when ``forward`` accepts ``rotary=(positions, cos_sin_cache)`` and applies
    # RoPE to query and key itself (fused with the cache write) before attending.
    fuses_rotary: bool = False

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """``rotary`` (only for backends with ``fuses_rotary``): ``(positions [num_tokens]
        int64, cos_sin_cache [max_position, rotary_dim] float32)``; query and key arrive
        unrotated and are rotated in place."""
        raise NotImplementedError


_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(name: str):
    def deco(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return deco


def get_backend_cls(name: str) -> type[AttentionBackend]:
    """Look up a backend by name ("torch", "triton"); importing lazily keeps Triton off
    the CPU path until asked for."""
    if name not in _BACKENDS:
        if name == "torch":
            import kvasir.attention.torch_backend  # noqa: F401
        elif name == "triton":
            import kvasir.attention.triton_backend  # noqa: F401
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend must be one of ['torch', 'triton'], got {name!r}")
    return _BACKENDS[name]
