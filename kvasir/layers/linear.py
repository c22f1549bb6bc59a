"""Linear layers as the decoder calls them, with a fast path on each device.

GPU: at one token per step (batch-1 decode, a static shape inside its CUDA graph) in
bf16/fp16, each projection runs as the single-row Triton GEMV of ``kvasir.kernels.gemv``
(closer to the copy bandwidth than cuBLAS at M = 1, no split-K reduce kernel), and the
SiLU-and-mul after ``gate_up_proj`` is fused into that GEMV's epilogue; both paths
round the activation the same way.

CPU, float32: oneDNN's matmul on weights reordered once into its blocked layout (the
op inductor uses for frozen CPU graphs). On this project's 2-core AVX-512 VM it runs
2-3.5x faster than ``F.linear`` (MKL sgemm) at every batch size from 1 to 2048 rows,
with float32 accuracy (max error ~1e-6 of the largest output, vs ~5e-7), so the CPU
engine still computes in float32. The reordered copy doubles the weights' memory.

Anything else takes ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Module switches for the fast paths (benchmarks flip them to measure their gain).
FUSED_GEMV_ENABLED = True
CPU_PACKED_ENABLED = True


def use_fused_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        FUSED_GEMV_ENABLED
        and x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
    )


def _cpu_packed_weight(weight: torch.Tensor, rows: slice | None = None) -> torch.Tensor | None:
    """``weight`` (or its ``rows``) reordered into oneDNN's blocked layout, made on first
    use and kept on the tensor; made again if the weight was changed in place since (its
    version counter moved). None where oneDNN cannot take it."""
    global CPU_PACKED_ENABLED
    key = "_kvasir_packed" if rows is None else f"_kvasir_packed_{rows.start}_{rows.stop}"
    entry = weight.__dict__.get(key)
    if entry is not None and entry[0] == weight._version:
        return entry[1]
    w = weight.detach() if rows is None else weight.detach()[rows].contiguous()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        CPU_PACKED_ENABLED = False
        return None
    weight.__dict__[key] = (weight._version, packed)
    return packed


# From this many rows on, the CPU gate/up projection runs as two matmuls with SiLU and
# the product fused in (below that, one matmul and a separate SiLU-and-mul is faster).
_CPU_FUSED_SILU_MIN_ROWS = 64


def cpu_gate_up_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``silu(x @ gate^T) * (x @ up^T)`` for ``weight = [gate; up]`` ``[2d, k]`` as two
    oneDNN matmuls, SiLU fused into the first and the product into the second (no
    ``[rows, 2d]`` intermediate and no elementwise passes: half the time of matmul +
    SiLU-and-mul at 2048 rows on a 2-core CPU). Only on the CPU in float32 with at
    least ``_CPU_FUSED_SILU_MIN_ROWS`` rows; None elsewhere (the caller runs
    ``linear`` and the activation)."""
    if not (
        CPU_PACKED_ENABLED
        and x.is_cpu
        and x.dim() == 2
        and x.shape[0] >= _CPU_FUSED_SILU_MIN_ROWS
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
    ):
        return None
    d = weight.shape[0] // 2
    gate = _cpu_packed_weight(weight, slice(0, d))
    up = _cpu_packed_weight(weight, slice(d, 2 * d))
    if gate is None or up is None:
        return None
    g = torch.ops.mkldnn._linear_pointwise(x, gate, None, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, g, up, None, "mul")


def linear(
    x: torch.Tensor,  # [num_tokens, in_features]
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, out_features]
    if x.is_cpu:
        if CPU_PACKED_ENABLED and x.dtype == torch.float32 and weight.dtype == torch.float32:
            packed = _cpu_packed_weight(weight)
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, weight, bias)
    if use_fused_gemv(x, weight):
        from kvasir.kernels.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def warm_up_cpu_linear(weights: list[torch.Tensor], max_rows: int) -> None:
    """Run the CPU float32 path once per distinct weight shape at every row count
    1..``max_rows`` (decode batch sizes). oneDNN builds a kernel for each new shape on
    its first call (2-6 ms on the 2-core VM, five shapes per model), which otherwise
    lands inside the first steps that reach each batch size; this is the CPU's
    counterpart of capturing CUDA graphs at start-up."""
    if not CPU_PACKED_ENABLED:
        return
    by_shape: dict[tuple[int, ...], torch.Tensor] = {}
    for w in weights:
        if w.is_cpu and w.dtype == torch.float32 and w.dim() == 2:
            by_shape.setdefault(tuple(w.shape), w)
    with torch.inference_mode():
        for w in by_shape.values():
            for m in range(1, max_rows + 1):
                linear(torch.zeros(m, w.shape[1]), w)


def gate_up_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``silu(x @ gate^T) * (x @ up^T)`` for ``weight = [gate; up]`` in one fused call
    where a device has one: oneDNN on the CPU (``cpu_gate_up_silu_mul``), the GEMV with
    the activation in its epilogue at one token on the GPU. None elsewhere: the caller
    runs ``linear`` and the activation."""
    if use_fused_gemv(x, weight):
        from kvasir.kernels.gemv import FUSE_SILU_MUL_OUT, gemv

        return gemv(x, weight, fusion=FUSE_SILU_MUL_OUT)
    return cpu_gate_up_silu_mul(x, weight)
