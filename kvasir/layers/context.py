"""What every layer of a model is built with: fixed at construction, never module state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvasir.attention.backend import AttentionBackend
from kvasir.config import KernelConfig, ParallelConfig
from kvasir.distributed.parallel_state import ParallelState, single_process_state

if TYPE_CHECKING:
    from kvasir.quantization import QuantizationConfig


@dataclass(frozen=True)
class LayerContext:
    """Passed down the model's constructors. ``parallel`` says which shard of each
    weight this rank holds; ``kernel_config`` which fast paths the layers take;
    ``params_dtype`` the dtype weights are created in; ``quant_config`` (None: none)
    which ``LinearMethod`` each linear layer gets; ``kv_cache_dtype`` (None: the model's)
    and ``calculate_kv_scales`` what the attention backends store."""

    attn_backend_cls: type[AttentionBackend]
    params_dtype: torch.dtype = torch.float32
    kernel_config: KernelConfig = field(default_factory=KernelConfig)
    parallel: ParallelState = field(default_factory=lambda: single_process_state("cpu"))
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    quant_config: QuantizationConfig | None = None
    kv_cache_dtype: torch.dtype | None = None
    calculate_kv_scales: bool = False

    def attn_backend_kwargs(self) -> dict:
        """What every attention backend is built with besides its shape."""
        return {
            "pdl": self.kernel_config.pdl,
            "kv_cache_dtype": self.kv_cache_dtype,
            "calculate_kv_scales": self.calculate_kv_scales,
        }
