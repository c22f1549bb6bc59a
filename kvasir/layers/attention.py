"""Attention front end: flat projections in, flat output out, backend in between."""

from __future__ import annotations

import torch
from torch import nn

from kvasir.attention.backend import AttentionBackend, AttentionMetadata
from kvasir.core.kv_cache_spec import FullAttentionSpec, KVCacheSpec


class Attention(nn.Module):
    """Reshapes the flat q/k/v projections to per-head tensors and calls the attention
    backend, which writes this step's K/V into the paged cache and attends over it.
    Declares its cache (``kv_cache_spec``): the runner sizes and allocates from it.

    With an FP8 cache (the backend's ``kv_cache_dtype``) it owns the per-head K and V
    scales (``k_scale``, ``v_scale``: float32 ``[num_kv_heads]``, 1.0 until a checkpoint
    or ``calculate_kv_scales`` sets them) and binds them to the backend."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.backend = backend
        if backend.kv_cache_dtype is not None:
            for name in ("k_scale", "v_scale"):
                p = nn.Parameter(torch.ones(num_kv_heads, dtype=torch.float32), requires_grad=False)
                p.weight_loader = self._load_kv_scale  # type: ignore[attr-defined]
                p.keep_dtype = True  # type: ignore[attr-defined]
                self.register_parameter(name, p)
            self.process_weights_after_loading()

    def _load_kv_scale(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """A checkpoint's per-tensor (one value) or per-head scale."""
        if loaded.numel() not in (1, self.num_kv_heads):
            raise ValueError(
                f"KV-cache scale has {loaded.numel()} values, expected 1 (per tensor) or "
                f"{self.num_kv_heads} (per KV head of this rank)"
            )
        with torch.no_grad():
            param.data.copy_(loaded.float().reshape(-1).expand(self.num_kv_heads))

    def process_weights_after_loading(self) -> None:
        """Scales in float32 (casting the model to its dtype also cast them), bound to
        the backend."""
        if self.backend.kv_cache_dtype is None:
            return
        for name in ("k_scale", "v_scale"):
            p = getattr(self, name)
            p.data = p.data.float()
        self.backend.bind_kv_scales(self.k_scale, self.v_scale)

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        """This layer's KV cache per block: K and V of its ``num_kv_heads`` heads (in
        the backend's FP8 dtype when it has one, else ``dtype``)."""
        dtype = self.backend.kv_cache_dtype or dtype
        return FullAttentionSpec(
            block_size=block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=str(dtype).removeprefix("torch."),
            element_size=dtype.itemsize,
        )

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        num_tokens = query.shape[0]
        out = self.backend.forward(
            query.view(num_tokens, self.num_heads, self.head_dim),
            key.view(num_tokens, self.num_kv_heads, self.head_dim),
            value.view(num_tokens, self.num_kv_heads, self.head_dim),
            kv_cache,
            attn_metadata,
            rotary,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"num_kv_heads={self.num_kv_heads}, backend={self.backend.name}"
        )
