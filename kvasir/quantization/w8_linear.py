"""``W8LinearMethod``: linear layers with 8-bit weights (FP8 E4M3 or INT8), optionally
with 8-bit activations (W8A8), for every scheme of this package (``fp8``, ``int8``,
``w8a8``, compressed-tensors and HF FP8 checkpoints).

A ``W8Scheme`` says what the weights and activations are; the method picks one kernel
path at construction (from the device), named in the start-up line:

* ``scaled_mm``: FP8 W8A8 on GPUs with FP8 units (compute capability >= 8.9): activations
  quantised per token, ``torch._scaled_mm`` with row-wise scales; batch-1 decode takes
  the Triton GEMV instead (weights dequantised in the kernel);
* ``triton-w8a8``: INT8 W8A8 (and FP8 with block scales) on CUDA: ``quant_matmul``;
* ``triton-weight-only``: weight-only on CUDA (W8A16, or FP8 on GPUs without FP8
  units): the GEMV at one row, ``quant_matmul`` with float activations otherwise;
* ``cpu-int8-w8a8``: INT8 W8A8 on the CPU: per-token int8 activations and
  ``torch._int_mm`` (oneDNN, VNNI/AMX where present), scales applied after;
* ``cpu-weight-only``: the CPU's fallback for every other scheme: the weight dequantised
  to the activation dtype inside the call, then one matmul (activations unquantised).

At one row with per-channel (or per-tensor) scales the GEMV is the unquantised path's
fused one (``kvasir.kernels.gemv`` with ``scale``: one byte per weight, the row scale
applied after the reduction, SiLU-and-mul fused into gate_up, PDL, tuned configs);
block scales take ``kvasir.kernels.quant_gemm.w8_gemv``.

Weights quantised online (a float checkpoint) are loaded in the model dtype, quantised
once in ``process_weights_after_loading`` and the float copy dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvasir.kernels.quant_gemm import QUANT_BLOCK, dequantize_weight
from kvasir.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethod,
    RowParallelLinear,
    set_weight_loader,
)
from kvasir.quantization.utils import FP8_E4M3, quantize_activation, quantize_weight

_QDTYPE_NAMES = {FP8_E4M3: "fp8_e4m3", torch.int8: "int8"}


@dataclass(frozen=True)
class W8Scheme:
    weight_dtype: torch.dtype  # float8_e4m3fn or int8
    weight_strategy: str = "channel"  # channel | tensor | block (128 x 128)
    act_strategy: str | None = None  # None: weight-only; token | group | tensor
    act_static: bool = False  # per-tensor activation scale read from the checkpoint
    prequantized: bool = False  # the checkpoint holds the 8-bit weights and scales

    def __post_init__(self) -> None:
        if self.weight_dtype not in _QDTYPE_NAMES:
            raise ValueError(f"weight dtype must be fp8_e4m3 or int8, got {self.weight_dtype}")
        if self.act_static and self.act_strategy != "tensor":
            raise ValueError("static activation scales are per tensor")
        if self.act_strategy == "group" and self.weight_strategy != "block":
            raise ValueError("per-group activation scales go with block weight scales")

    @property
    def w8a8(self) -> bool:
        return self.act_strategy is not None

    def describe(self) -> str:
        w = f"{_QDTYPE_NAMES[self.weight_dtype]} weights per {self.weight_strategy}"
        if self.weight_strategy == "block":
            w = f"{_QDTYPE_NAMES[self.weight_dtype]} weights per 128x128 block"
        if not self.w8a8:
            return f"{w}, activations unquantised"
        kind = "static" if self.act_static else "dynamic"
        return f"{w}, {kind} per-{self.act_strategy} activations"


def select_path(scheme: W8Scheme, device: torch.device) -> str:
    """The kernel path this scheme runs on ``device`` (module docstring)."""
    if device.type == "cuda":
        fp8_units = torch.cuda.get_device_capability(device) >= (8, 9)
        if scheme.w8a8 and scheme.weight_dtype == FP8_E4M3 and fp8_units:
            return "triton-w8a8" if scheme.weight_strategy == "block" else "scaled_mm"
        if scheme.w8a8 and scheme.weight_dtype == torch.int8:
            return "triton-w8a8"
        return "triton-weight-only"
    if scheme.w8a8 and scheme.weight_dtype == torch.int8:
        return "cpu-int8-w8a8"
    return "cpu-weight-only"


PATH_DESCRIPTIONS = {
    "scaled_mm": "torch._scaled_mm FP8 GEMM (FP8 Triton GEMV at batch 1)",
    "triton-w8a8": "Triton 8-bit GEMM on quantised activations",
    "triton-weight-only": "weight-only fallback: Triton GEMM/GEMV dequantising the weights "
    "in the kernel, activations unquantised",
    "cpu-int8-w8a8": "CPU int8 GEMM (torch._int_mm) on per-token int8 activations",
    "cpu-weight-only": "CPU weight-only fallback: weights dequantised inside each matmul, "
    "activations unquantised",
}


class W8LinearMethod(LinearMethod):
    """8-bit weights (``layer.weight [N, K]``, ``layer.weight_scale [N]`` or
    ``[N/128, K/128]`` float32, ``layer.input_scale [1]`` for static activations)."""

    def __init__(self, scheme: W8Scheme, device: torch.device) -> None:
        self.scheme = scheme
        self.path = select_path(scheme, device)

    # ------------------------------------------------------------------ weights
    def create_weights(
        self,
        layer: LinearBase,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None:
        s = self.scheme
        n, k = sum(output_partition_sizes), input_size_per_partition
        layer.act_dtype = params_dtype  # type: ignore[assignment]
        if not s.prequantized:
            weight = nn.Parameter(torch.empty(n, k, dtype=params_dtype), requires_grad=False)
            layer.register_parameter("weight", weight)
            set_weight_loader(weight, layer.weight_loader)
            return
        if s.weight_strategy == "block":
            for size in output_partition_sizes if isinstance(layer, ColumnParallelLinear) else []:
                if size % QUANT_BLOCK:
                    raise ValueError(
                        f"{layer.prefix}: block-quantised weights need every output shard "
                        f"to be a multiple of {QUANT_BLOCK} rows, got {output_partition_sizes}"
                    )
            if isinstance(layer, RowParallelLinear) and layer.tp_size > 1 and k % QUANT_BLOCK:
                raise ValueError(f"{layer.prefix}: input shard {k} is not a multiple of 128")
        weight = nn.Parameter(torch.empty(n, k, dtype=s.weight_dtype), requires_grad=False)
        layer.register_parameter("weight", weight)
        set_weight_loader(weight, functools.partial(self._load_weight, layer))
        if s.weight_strategy == "block":
            shape: tuple[int, ...] = (-(-n // QUANT_BLOCK), -(-k // QUANT_BLOCK))
        else:
            shape = (n,)
        scale = nn.Parameter(torch.full(shape, float("nan")), requires_grad=False)
        scale.keep_dtype = True  # type: ignore[attr-defined]
        layer.register_parameter("weight_scale", scale)
        set_weight_loader(scale, functools.partial(self._load_weight_scale, layer))
        if s.act_static:
            input_scale = nn.Parameter(torch.zeros(1), requires_grad=False)
            input_scale.keep_dtype = True  # type: ignore[attr-defined]
            layer.register_parameter("input_scale", input_scale)
            set_weight_loader(input_scale, _load_input_scale)

    def _load_weight(
        self,
        layer: LinearBase,
        param: nn.Parameter,
        loaded: torch.Tensor,
        shard_id: int | str | None = None,
    ) -> None:
        if loaded.dtype != param.dtype:
            raise ValueError(
                f"quantised weight has dtype {loaded.dtype}, expected {param.dtype} "
                f"(the checkpoint's quantization_config says {self.scheme.describe()})"
            )
        layer.weight_loader(param, loaded, shard_id)

    def _load_weight_scale(
        self,
        layer: LinearBase,
        param: nn.Parameter,
        loaded: torch.Tensor,
        shard_id: int | str | None = None,
    ) -> None:
        loaded = loaded.float()
        with torch.no_grad():
            if self.scheme.weight_strategy == "block":
                _load_block_scale(layer, param, loaded, shard_id)
            elif isinstance(layer, ColumnParallelLinear):
                offset, size, start = layer._shard(shard_id)
                dst = param.data.narrow(0, offset, size)
                if loaded.numel() == 1:  # per-tensor scale of this shard
                    dst.fill_(loaded.reshape(()))
                else:
                    full = loaded.reshape(-1)
                    _check_scale(full.numel(), size * layer.tp_size, layer, "weight_scale")
                    dst.copy_(full.narrow(0, start, size))
            elif loaded.numel() == 1:
                param.data.fill_(loaded.reshape(()))
            elif hasattr(layer, "vocab_start"):  # the LM head: this rank's vocabulary rows
                full = loaded.reshape(-1)
                n = param.numel()
                _check_scale(full.numel(), n * layer.tp_size, layer, "weight_scale")
                param.data.copy_(full.narrow(0, layer.vocab_start, n))
            else:
                full = loaded.reshape(-1)
                _check_scale(full.numel(), param.numel(), layer, "weight_scale")
                param.data.copy_(full)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        s = self.scheme
        if not s.prequantized:
            q, scale = quantize_weight(layer.weight.data, s.weight_dtype, s.weight_strategy)
            del layer.weight
            layer.register_parameter("weight", nn.Parameter(q, requires_grad=False))
            layer.register_parameter("weight_scale", nn.Parameter(scale, requires_grad=False))
        elif torch.isnan(layer.weight_scale).any():
            raise ValueError(f"{layer.prefix}: the checkpoint has no weight_scale for it")
        if s.act_static and not float(layer.input_scale) > 0:
            raise ValueError(f"{layer.prefix}: the checkpoint has no input_scale for it")
        if self.path == "scaled_mm":
            # [K, N] column-major view of the row-major weight: what _scaled_mm takes.
            layer.weight_t = layer.weight.data.t()  # type: ignore[assignment]
            layer.scale_b = layer.weight_scale.data.reshape(1, -1).contiguous()  # type: ignore[assignment]

    # ------------------------------------------------------------------ apply
    def apply(
        self,
        layer: LinearBase,
        x: torch.Tensor,  # [num_tokens, in_features]
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, out_features]
        s, path = self.scheme, self.path
        w, ws = layer.weight, layer.weight_scale
        if path == "cpu-weight-only":
            return F.linear(x, dequantize_weight(w, ws).to(x.dtype), bias)
        static = layer.input_scale if s.act_static else None
        if path == "cpu-int8-w8a8":
            xq, xs = quantize_activation(x, torch.int8, s.act_strategy or "token", static)
            y = torch._int_mm(xq, w.t()).float() * xs[:, None] * ws[None, :]
            if bias is not None:
                y = y + bias
            return y.to(x.dtype)
        from kvasir.kernels.quant_gemm import quant_matmul, w8_gemv

        if path == "triton-weight-only" or (path == "scaled_mm" and x.shape[0] == 1):
            if x.shape[0] == 1:
                if self._use_gemv(layer, x):
                    from kvasir.kernels.gemv import gemv

                    return gemv(x.contiguous(), w, bias, scale=ws, pdl=layer.kernel_config.pdl)
                return w8_gemv(x.contiguous(), w, ws, bias)
            return quant_matmul(x.contiguous(), w, ws, bias=bias)
        xq, xs = quantize_activation(x, s.weight_dtype, s.act_strategy or "token", static)
        if path == "scaled_mm":
            return torch._scaled_mm(
                xq, layer.weight_t, scale_a=xs[:, None], scale_b=layer.scale_b,
                bias=bias, out_dtype=x.dtype,
            )  # fmt: skip
        return quant_matmul(xq, w, ws, xs, bias=bias, out_dtype=x.dtype)

    def _use_gemv(self, layer: LinearBase, x: torch.Tensor) -> bool:
        """Batch-1 decode through the fused GEMV of the unquantised path (one byte per
        weight, the row scale after the reduction, SiLU-and-mul in gate_up's epilogue):
        CUDA, one bf16/fp16 row, per-channel scales, weight-only semantics at one row."""
        return (
            self.path in ("triton-weight-only", "scaled_mm")
            and layer.kernel_config.fused_gemv
            and x.is_cuda
            and x.dim() == 2
            and x.shape[0] == 1
            and x.dtype in (torch.bfloat16, torch.float16)
            and layer.weight_scale.dim() == 1
        )

    def apply_silu_mul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor | None:
        if layer.bias is not None or not self._use_gemv(layer, x):
            return None
        from kvasir.kernels.gemv import FUSE_SILU_MUL_OUT, gemv

        return gemv(
            x.contiguous(), layer.weight, fusion=FUSE_SILU_MUL_OUT, scale=layer.weight_scale,
            pdl=layer.kernel_config.pdl,
        )  # fmt: skip


def _check_scale(got: int, want: int, layer: LinearBase, name: str) -> None:
    if got != want:
        raise ValueError(
            f"{layer.prefix}: {name} has {got} entries, expected {want} (one per output "
            f"channel) or 1 (per tensor)"
        )


def _load_block_scale(
    layer: LinearBase, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None
) -> None:
    b = QUANT_BLOCK
    if loaded.dim() != 2:
        raise ValueError(
            f"{layer.prefix}: block weight_scale must be 2-D [rows/128, cols/128], "
            f"got shape {tuple(loaded.shape)}"
        )
    if isinstance(layer, ColumnParallelLinear):
        offset, size, start = layer._shard(shard_id)
        full_rows = size * layer.tp_size
        want = (-(-full_rows // b), param.shape[1])
        if tuple(loaded.shape) != want:
            raise ValueError(
                f"{layer.prefix}: weight_scale has shape {tuple(loaded.shape)}, expected {want}"
            )
        param.data.narrow(0, offset // b, -(-size // b)).copy_(
            loaded.narrow(0, start // b, -(-size // b))
        )
        return
    if isinstance(layer, RowParallelLinear):
        kb = param.shape[1]
        want = (param.shape[0], kb * layer.tp_size) if layer.tp_size > 1 else tuple(param.shape)
        if tuple(loaded.shape) != want:
            raise ValueError(
                f"{layer.prefix}: weight_scale has shape {tuple(loaded.shape)}, expected {want}"
            )
        param.data.copy_(loaded.narrow(1, layer.tp_rank * kb, kb))
        return
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(
            f"{layer.prefix}: weight_scale has shape {tuple(loaded.shape)}, "
            f"expected {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


def _load_input_scale(
    param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
) -> None:
    # q, k and v (gate and up) share their input: one scale, the largest calibrated.
    if loaded.numel() != 1:
        raise ValueError(f"input_scale must be one value (per tensor), got {loaded.numel()}")
    with torch.no_grad():
        param.data.copy_(torch.maximum(param.data, loaded.float().reshape(1)))
