"""The Triton attention backend: cache write, then the decode or the prefill kernel.

Decode-only steps (``max_query_len == 1``) run the GQA-grouped split-K decode kernel;
anything else (prefill, chunked prefill, prefix-cache hits, mixed prefill + decode) runs
the varlen prefill kernel, which handles decode rows as ``q_len == 1`` requests.

CUDA graphs: ``forward`` never synchronises with the host and reads only device tensors
plus the host ints of the metadata; its allocations are sized by those ints alone. So
the common ``AttentionMetadataBuilder`` serves it, and a graph captures that builder's
``build_for_capture`` metadata (views of the runner's buffers, bounds for the ints). The
decode kernel's split count depends only on the batch shape (or ``decode_num_splits``),
never on context lengths, so an eager warm-up at a batch size compiles exactly the
kernels its graph capture launches, and a graph captured on short contexts stays fast
and correct when replayed on long ones (slices are cut per request on the device).
"""

from __future__ import annotations

import torch

from kvasir.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from kvasir.kernels.decode_attention import paged_decode_attention
from kvasir.kernels.kv_cache import reshape_and_cache, rotary_embedding_and_cache
from kvasir.kernels.prefill_attention import paged_prefill_attention


@register_backend("triton")
class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton kernels (see the module docstring for the contract).

    RoPE is fused with the cache write (``fuses_rotary``): one kernel rotates q and k in
    place and stores k and v, instead of ~16 elementwise torch kernels per layer.

    ``decode_num_splits`` fixes the decode kernel's split-K count; ``None`` chooses it
    from the batch shape.
    """

    fuses_rotary = True

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        decode_num_splits: int | None = None,
        pdl: bool = True,
        kv_cache_dtype: torch.dtype | None = None,
        calculate_kv_scales: bool = False,
    ) -> None:
        super().__init__(
            num_heads, head_dim, num_kv_heads, scale, pdl, kv_cache_dtype, calculate_kv_scales
        )
        self.decode_num_splits = decode_num_splits

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        md = attn_metadata
        num_actual = md.num_actual_tokens
        scales = self.kv_scales if kv_cache.dtype == self.kv_cache_dtype else None
        if rotary is not None:
            positions, cos_sin_cache = rotary
            if self.calculate_kv_scales:  # the scales of the rotated keys
                from kvasir.kernels.kv_cache import rotary_embedding_ref

                rotated = rotary_embedding_ref(
                    positions[:num_actual], key[:num_actual], cos_sin_cache
                )
                self.maybe_calculate_kv_scales(rotated, value, num_actual)
            rotary_embedding_and_cache(
                positions[:num_actual], query, key, value, cos_sin_cache, kv_cache,
                md.slot_mapping[:num_actual], pdl=self.pdl, kv_scales=scales,
            )  # fmt: skip
        else:
            self.maybe_calculate_kv_scales(key, value, num_actual)
            reshape_and_cache(key, value, kv_cache, md.slot_mapping[:num_actual], scales)
        out = torch.empty_like(query)
        if md.max_query_len == 1:
            paged_decode_attention(
                query,
                kv_cache,
                md.block_table,
                md.seq_lens,
                self.scale,
                num_reqs=md.num_reqs,
                num_splits=self.decode_num_splits,
                out=out,
                pdl=self.pdl,
                kv_scales=scales,
            )
            covered = md.num_reqs
        else:
            paged_prefill_attention(
                query,
                kv_cache,
                md.query_start_loc,
                md.seq_lens,
                md.block_table,
                self.scale,
                max_query_len=md.max_query_len,
                num_reqs=md.num_reqs,
                out=out,
                kv_scales=scales,
            )
            covered = num_actual
        if covered < out.shape[0]:
            out[covered:].zero_()  # padding rows: defined zeros, as the torch backend
        return out
