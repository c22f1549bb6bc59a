"""The attention-backend interface, the per-step metadata every backend reads, and the
builder that makes that metadata.

KV cache layout (one tensor per layer, shared by every backend; ``FullAttentionSpec``):
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)
A token at position ``p`` of request ``r`` lives in block ``block_table[r, p // block_size]``
at offset ``p % block_size``; ``slot_mapping`` holds ``block_id * block_size + offset``
for each token of the flat batch.

FP8 KV cache (``kv_cache_dtype`` float8_e4m3fn / float8_e5m2): the cache tensor has that
dtype; K and V are divided by per-head float32 scales on the write and multiplied back
inside attention. The scales (``[num_kv_heads]``, a per-tensor scale repeated) belong to
the layer's ``Attention`` module, which binds them here (``bind_kv_scales``); with
``calculate_kv_scales`` the first forward pass that carries tokens sets them from its
K/V (amax / the format's max) before writing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from kvasir.core.kv_cache_spec import FullAttentionSpec, KVCacheSpec


@dataclass
class AttentionMetadata:
    """Built once per step by the runner's ``AttentionMetadataBuilder`` and passed
    explicitly to every layer. A backend whose layers share per-step derived values
    subclasses it (its builder derives them once, before the forward pass).

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
    # State-space layers: views of persistent buffers the runner fills every step (so a
    # CUDA graph replays with the step's slots): [num_reqs] int32 state slot, and 1 where
    # the request continues its state (tokens before this step were computed), else 0.
    # None for a model without such layers and in the profiling pass (zero initial
    # states, nothing kept).
    state_slots_dev: torch.Tensor | None = field(default=None, kw_only=True)
    state_init_dev: torch.Tensor | None = field(default=None, kw_only=True)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionInputBuffers(Protocol):
    """The persistent buffers a builder slices (``kvasir.worker.input_buffers``): device
    tensors updated in place every step, and host twins holding the same values for
    the rows of the step."""

    block_size: int
    query_start_loc: torch.Tensor  # [max_num_reqs + 2] int32, device
    seq_lens: torch.Tensor  # [max_num_reqs + 1] int32, device
    block_table: torch.Tensor  # [max_num_reqs + 1, max_num_blocks_per_req] int32, device
    slot_mapping: torch.Tensor  # [max_num_tokens] int64, device
    query_start_loc_cpu: torch.Tensor  # [max_num_reqs + 2] int32, host twin
    seq_lens_cpu: torch.Tensor  # [max_num_reqs + 1] int32, host twin


class AttentionMetadataBuilder:
    """Makes a backend's ``AttentionMetadata`` over the persistent input buffers: for a
    step (``build``) and for a CUDA-graph capture (``build_for_capture``). The one place
    metadata is made; the runner, its graphs and its profiling run all come here.

    Contract: the metadata's tensors are views of the buffers (no copies), so a graph
    captured on ``build_for_capture`` metadata reads whatever the buffers hold when it
    replays. Callers fill the buffers first (host twins written, device copies queued on
    the stream that runs the step). ``build`` may derive per-step values from the host
    twins (once, for every layer); ``build_for_capture`` must derive nothing from the
    buffers' contents, and its host ints are upper bounds valid for every replay.
    """

    # False: the backend reads host-side values a replay cannot refresh (no graphs).
    supports_cuda_graphs: ClassVar[bool] = True

    def __init__(self, buffers: AttentionInputBuffers) -> None:
        self.buffers = buffers

    def build(
        self, num_reqs: int, num_tokens: int, max_query_len: int, max_seq_len: int
    ) -> AttentionMetadata:
        """A step over the first ``num_reqs`` requests / ``num_tokens`` tokens."""
        return self._views(num_reqs, num_tokens, max_query_len, max_seq_len)

    def build_for_capture(
        self, num_reqs: int, num_tokens: int, max_query_len: int, max_seq_len: int
    ) -> AttentionMetadata:
        """The metadata a graph of ``num_reqs`` requests / ``num_tokens`` tokens captures
        (its padding included); ``max_query_len`` and ``max_seq_len`` are bounds."""
        return self._views(num_reqs, num_tokens, max_query_len, max_seq_len)

    def _views(
        self, num_reqs: int, num_tokens: int, max_query_len: int, max_seq_len: int
    ) -> AttentionMetadata:
        b = self.buffers
        states = getattr(b, "has_state_slots", False)
        return AttentionMetadata(
            num_reqs=num_reqs,
            num_actual_tokens=num_tokens,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            query_start_loc=b.query_start_loc[: num_reqs + 1],
            seq_lens=b.seq_lens[:num_reqs],
            block_table=b.block_table[:num_reqs],
            slot_mapping=b.slot_mapping[:num_tokens],
            query_start_loc_cpu=b.query_start_loc_cpu[: num_reqs + 1],
            seq_lens_cpu=b.seq_lens_cpu[:num_reqs],
            state_slots_dev=b.state_slots[:num_reqs] if states else None,  # type: ignore[attr-defined]
            state_init_dev=b.state_init[:num_reqs] if states else None,  # type: ignore[attr-defined]
        )


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

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        pdl: bool = True,  # KernelConfig.pdl: the backend's kernels may launch with PDL
        kv_cache_dtype: torch.dtype | None = None,  # None: the model's dtype
        calculate_kv_scales: bool = False,
    ) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.pdl = pdl
        fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
        if kv_cache_dtype is not None and kv_cache_dtype not in fp8:
            raise ValueError(f"kv_cache_dtype must be an FP8 dtype or None, got {kv_cache_dtype}")
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calculate_kv_scales = calculate_kv_scales and kv_cache_dtype is not None

    def bind_kv_scales(self, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """The layer's float32 ``[num_kv_heads]`` K and V scales (FP8 cache only)."""
        assert self.kv_cache_dtype is not None
        self.kv_scales = (k_scale, v_scale)

    def maybe_calculate_kv_scales(
        self, key: torch.Tensor, value: torch.Tensor, num_tokens: int
    ) -> None:
        """``calculate_kv_scales``: set the scales from the first batch of real tokens
        (per head, amax / the format's max), once."""
        if not self.calculate_kv_scales or num_tokens == 0:
            return
        if key.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError(
                "calculate_kv_scales needs enforce_eager: a CUDA graph captured before the "
                "first real batch would freeze placeholder scales"
            )
        assert self.kv_scales is not None and self.kv_cache_dtype is not None
        qmax = torch.finfo(self.kv_cache_dtype).max
        for x, scale in zip((key, value), self.kv_scales, strict=True):
            amax = x[:num_tokens].float().abs().amax(dim=(0, 2))  # [num_kv_heads]
            scale.copy_((amax / qmax).clamp_min(1e-8))
        self.calculate_kv_scales = False

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, spec: KVCacheSpec) -> tuple[int, ...]:
        """Shape of one layer's cache of ``num_blocks`` blocks. Only full-attention specs
        (any dtype) have a layout here; any other kind is refused by name."""
        if spec.kind != FullAttentionSpec.kind or not isinstance(spec, FullAttentionSpec):
            raise ValueError(
                f"the attention backends lay out {FullAttentionSpec.kind!r} KV caches only, "
                f"got a {spec.kind!r} spec"
            )
        return (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)

    @classmethod
    def get_builder_cls(cls) -> type[AttentionMetadataBuilder]:
        """The builder of the metadata this backend reads."""
        return AttentionMetadataBuilder

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
