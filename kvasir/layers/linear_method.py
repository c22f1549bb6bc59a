"""How a linear layer stores and multiplies its weight: the ``LinearMethod`` interface
and ``UnquantizedLinearMethod``, which holds the fast paths:

* CUDA, one token (batch-1 decode) in bf16/fp16: the single-row Triton GEMV of
  ``kvasir.kernels.gemv`` (closer to the copy bandwidth than cuBLAS at M = 1), with
  SiLU-and-mul fused into ``gate_up_proj``'s epilogue;
* CPU, float32: oneDNN's matmul on the weight reordered once, after loading, into its
  blocked layout (the op inductor uses for frozen CPU graphs; faster than MKL's sgemm
  at every batch size measured, with float32 accuracy, see benchmarks/RESULTS.md). The
  reordered copy doubles the weights' memory;
* anything else: ``F.linear``.

Quantised methods (``kvasir.quantization``) implement the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kvasir.config import KernelConfig

if TYPE_CHECKING:
    from kvasir.layers.linear import LinearBase

# From this many rows on, the CPU gate/up projection runs as two matmuls with SiLU and
# the product fused in (below that, one matmul and a separate SiLU-and-mul is faster).
_CPU_FUSED_SILU_MIN_ROWS = 64


def set_weight_loader(param: nn.Parameter, loader) -> None:  # noqa: ANN001
    param.weight_loader = loader  # type: ignore[attr-defined]


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """A replicated parameter: the whole tensor."""
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(
            f"weight has shape {tuple(loaded_weight.shape)}, expected {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.data.copy_(loaded_weight)


def _cpu_reorder(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` in oneDNN's blocked layout, or None where this torch has no oneDNN."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
    except (AttributeError, RuntimeError):
        return None


class LinearMethod(ABC):
    """How a linear layer stores and applies its weight (unquantised, FP8, INT4, ...).

    ``create_weights`` registers the parameters on the layer (each with a
    ``weight_loader``), shaped for this rank's shard; ``process_weights_after_loading``
    runs once every checkpoint tensor is in (repacking, scales); ``apply`` computes
    ``x @ W^T + bias`` for ``x`` ``[num_tokens, input_size_per_partition]``.
    """

    @abstractmethod
    def create_weights(
        self,
        layer: LinearBase,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None: ...

    def process_weights_after_loading(self, layer: LinearBase) -> None:  # noqa: B027
        """Repack or derive what ``apply`` needs; the default keeps the weights."""

    @abstractmethod
    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def apply_silu_mul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(x @ gate^T) * (x @ up^T)`` for a ``[gate; up]`` layer in one fused call
        where the method has one; None: the caller applies the layer, then the
        activation."""
        return None

    def warm_up(self, layer: LinearBase, max_rows: int) -> None:  # noqa: B027
        """Build whatever kernels the first calls at 1..``max_rows`` rows would build."""


class UnquantizedLinearMethod(LinearMethod):
    """Weights in the model's dtype; the fast paths of the module docstring."""

    def __init__(self, kernel_config: KernelConfig) -> None:
        self.kernel_config = kernel_config

    def create_weights(
        self,
        layer: LinearBase,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None:
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        layer.register_parameter("weight", weight)
        set_weight_loader(weight, layer.weight_loader)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        w = layer.weight
        layer.cpu_packed = layer.cpu_packed_halves = None
        if not (self.kernel_config.cpu_prepack and w.is_cpu and w.dtype == torch.float32):
            return
        layer.cpu_packed = _cpu_reorder(w)
        sizes = layer.output_partition_sizes
        if layer.cpu_packed is not None and len(sizes) == 2 and sizes[0] == sizes[1]:
            d = sizes[0]  # a [gate; up] layer: each half for the fused SiLU path
            gate, up = _cpu_reorder(w[:d]), _cpu_reorder(w[d:])
            if gate is not None and up is not None:
                layer.cpu_packed_halves = (gate, up)

    def _use_gemv(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            self.kernel_config.fused_gemv
            and x.is_cuda
            and x.dim() == 2
            and x.shape[0] == 1
            and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype
        )

    def apply(
        self,
        layer: LinearBase,
        x: torch.Tensor,  # [num_tokens, in_features]
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, out_features]
        w = layer.weight
        if x.is_cpu:
            packed = layer.cpu_packed
            if packed is not None and x.dtype == torch.float32:
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
            return F.linear(x, w, bias)
        if self._use_gemv(x, w):
            from kvasir.kernels.gemv import gemv

            return gemv(x, w, bias, pdl=self.kernel_config.pdl)
        return F.linear(x, w, bias)

    def apply_silu_mul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor | None:
        w = layer.weight
        if self._use_gemv(x, w):
            from kvasir.kernels.gemv import FUSE_SILU_MUL_OUT, gemv

            return gemv(x, w, fusion=FUSE_SILU_MUL_OUT, pdl=self.kernel_config.pdl)
        halves = layer.cpu_packed_halves
        if (
            halves is not None
            and x.is_cpu
            and x.dim() == 2
            and x.shape[0] >= _CPU_FUSED_SILU_MIN_ROWS
            and x.dtype == torch.float32
        ):
            # Two oneDNN matmuls, SiLU fused into the first and the product into the
            # second: no [rows, 2d] intermediate and no elementwise passes.
            gate, up = halves
            g = torch.ops.mkldnn._linear_pointwise(x, gate, None, "swish", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, g, up, None, "mul")
        return None

    def warm_up(self, layer: LinearBase, max_rows: int) -> None:
        # oneDNN builds a kernel for each new shape on its first call (a few ms each),
        # which would otherwise land inside the first steps that reach a batch size: the
        # CPU's counterpart of capturing CUDA graphs at start-up.
        if layer.cpu_packed is None:
            return
        with torch.inference_mode():
            for m in range(1, max_rows + 1):
                self.apply(layer, torch.zeros(m, layer.weight.shape[1]))


def warm_up_linears(layers: Iterable[LinearBase], max_rows: int) -> None:
    """``LinearMethod.warm_up`` once per distinct (method type, layer shape)."""
    seen: set[tuple[type, int, int]] = set()
    for layer in layers:
        key = (type(layer.method), layer.output_size_per_partition, layer.input_size_per_partition)
        if key not in seen:
            seen.add(key)
            layer.method.warm_up(layer, max_rows)
