"""Rotary position embedding (neox / HF half-rotation style) with HF rope scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def get_rope_type(rope_scaling: dict[str, Any] | None) -> str:
    """The HF rope type of a ``rope_scaling`` dict ("default" for None); old configs
    spell the key ``type``."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def compute_inv_freq(
    rotary_dim: int, base: float, rope_scaling: dict[str, Any] | None = None
) -> torch.Tensor:  # [rotary_dim // 2] float32
    """Inverse frequencies exactly as HF transformers computes them (same float32 ops,
    on the CPU), so positions embed bit-identically to the reference."""
    rope_type = get_rope_type(rope_scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim
    inv_freq = 1.0 / (base**exponent)
    if rope_type == "linear":
        # Interpolating positions by 1/factor is the same as slowing every frequency.
        return inv_freq / float(rope_scaling["factor"])  # type: ignore[index]
    if rope_type == "llama3":
        assert rope_scaling is not None
        factor = float(rope_scaling["factor"])
        low_freq_factor = float(rope_scaling["low_freq_factor"])
        high_freq_factor = float(rope_scaling["high_freq_factor"])
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are interpolated by `factor`, short ones kept, the band
        # between blended smoothly (Llama 3.1 paper, section 3).
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed, inv_freq_llama)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k at the given absolute positions.

    The cos/sin table is precomputed in float32 for positions
    ``[0, max_position_embeddings)``; callers must keep positions inside that range.
    Rotation is the neox / HF half-split style: dims ``[0, d/2)`` pair with ``[d/2, d)``.
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.rope_scaling = rope_scaling
        device = torch.get_default_device()
        if device.type == "meta":
            # A model built on "meta" gets a free placeholder; reset_buffers() fills it.
            cache = torch.empty(max_position_embeddings, self.rotary_dim, dtype=torch.float)
        else:
            cache = self._compute_cos_sin_cache().to(device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def _compute_cos_sin_cache(self) -> torch.Tensor:  # [max_pos, rotary_dim] float32, CPU
        # Always on the CPU (even inside a `with torch.device(...)` build), like HF.
        with torch.device("cpu"):
            inv_freq = compute_inv_freq(self.rotary_dim, self.base, self.rope_scaling)
            t = torch.arange(self.max_position_embeddings, dtype=torch.float)
            freqs = t[:, None] * inv_freq[None, :]  # [max_pos, rotary_dim // 2]
            return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def reset_buffers(self) -> None:
        """Recompute the cos/sin table (float32) on the module's current device; the
        loader calls this after materialising a model built on the meta device."""
        device = self.cos_sin_cache.device
        if device.type == "meta":
            self.cos_sin_cache = torch.empty_like(self.cos_sin_cache, dtype=torch.float)
        else:
            self.cos_sin_cache = self._compute_cos_sin_cache().to(device)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Module.to(dtype) would round the table to bf16/fp16; keep it float32 so
        # positions are as exact as HF's (which computes cos/sin in float32 per step).
        cache = self.cos_sin_cache
        super()._apply(fn, recurse)
        if self.cos_sin_cache.dtype != torch.float:
            self.cos_sin_cache = cache.to(self.cos_sin_cache.device)
        return self

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        query: torch.Tensor,  # [num_tokens, num_heads * head_dim] (or [..., head_dim])
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim] (or [..., head_dim])
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin(positions)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def rotate(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        x: torch.Tensor,  # [num_tokens, n * head_dim]: any heads, e.g. q and k side by side
    ) -> torch.Tensor:  # x rotated, a new tensor
        """``forward`` for query and key heads held in one tensor: one pass, not two."""
        cos, sin = self._cos_sin(positions)
        return self._rotate(x, cos, sin)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        # [num_tokens, 1, rotary_dim // 2]: broadcast over heads
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, self.head_dim)  # [num_tokens, num_heads, head_dim]
        rot = x[..., : self.rotary_dim].float()
        half = self.rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        if self.rotary_dim < self.head_dim:
            out = torch.cat((out, x[..., self.rotary_dim :]), dim=-1)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
            f"rope_type={get_rope_type(self.rope_scaling)!r}"
        )
