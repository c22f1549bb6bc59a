"""``WNA16LinearMethod``: linear layers with 4- or 8-bit integer weights in groups with
scales and zero points, activations in the model dtype (W4A16 / W8A16), for GPTQ and
AWQ checkpoints.

Both formats are converted once, while loading, to the layout of
``kvasir.kernels.wna16`` (``qweight [K / P, N]`` int32 packed along the input dimension,
``scales`` / ``zeros`` ``[G, N]`` float32):

* GPTQ (AutoGPTQ / GPTQModel / HF transformers): ``qweight [K / P, N]`` is that layout
  already; ``qzeros [G, N / P]`` is packed along the output dimension and, in the
  original ``checkpoint_format: "gptq"``, stores each zero point minus one (``gptq_v2``
  stores it as is); ``g_idx [K]`` gives each input row's group. Act-order checkpoints'
  rows are sorted by group here (the packed rows permuted once) and the activations'
  columns gathered by the same permutation in ``apply``, so the kernels read groups
  contiguously.
* AWQ (AutoAWQ's GEMM packing): ``qweight [K, N / 8]`` and ``qzeros [G, N / 8]`` packed
  along the output dimension with the nibbles of each word in the order
  ``0, 2, 4, 6, 1, 3, 5, 7``; unpacked and repacked along the input dimension.

The checkpoint's ``q_proj.weight`` does not exist; ``kvasir.models.loader.quant_loader``
loads the packed tensors into this method's parameters and hands the model a
shape-only placeholder for the weight (the layer's ``weight`` parameter on the meta
device, dropped after loading).

Paths: CUDA: the Triton GEMV at one row (with SiLU-and-mul fused for ``gate_up_proj``),
the Triton GEMM otherwise; CPU: the torch reference (the weight dequantised inside each
call, then one matmul).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvasir.kernels.wna16 import SUPPORTED_BITS, dequantize_wna16, pack_along_k, unpack_along_k
from kvasir.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethod,
    set_weight_loader,
)

# GPTQ / AWQ checkpoint tensors of a quantised linear layer.
CHECKPOINT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ_ORDER[i]: the column in nibble i of a word


@dataclass(frozen=True)
class WNA16Scheme:
    bits: int
    group_size: int  # -1: one group per output channel
    packing: str  # "gptq" | "awq"
    desc_act: bool = False
    zero_offset: int = 0  # added to the stored zero points (1 for GPTQ v1 checkpoints)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {list(SUPPORTED_GROUP_SIZES)}, got {self.group_size!r}"
            )
        if self.packing not in ("gptq", "awq"):
            raise ValueError(f"packing must be 'gptq' or 'awq', got {self.packing!r}")
        if self.packing == "awq" and self.bits != 4:
            raise ValueError(f"AWQ GEMM packing is 4-bit, got bits={self.bits}")

    def describe(self) -> str:
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        act = ", act-order" if self.desc_act else ""
        return f"{self.packing} int{self.bits} weights, {group}{act}, activations unquantised"


def unpack_along_n(packed: torch.Tensor, n: int, bits: int, order: tuple[int, ...] | None = None):
    """``[R, ceil(N / P)] int32`` packed along the last dimension -> ``[R, N]`` int32;
    ``order[i]`` is the column (within its word) held in field ``i`` (AWQ's order)."""
    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    fields = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)  # [R, W, P]: field i
    if order is not None:
        inverse = [order.index(c) for c in range(pack)]  # column c sits in field inverse[c]
        fields = fields[:, :, inverse]
    return fields.reshape(packed.shape[0], -1)[:, :n]


def pack_along_n(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None):
    """``[R, N]`` values in ``[0, 2^bits)`` -> ``[R, N / P] int32``, field ``i`` of word
    ``j`` holding column ``j * P + order[i]`` (the inverse of ``unpack_along_n``)."""
    pack = 32 // bits
    r, n = values.shape
    assert n % pack == 0, f"{n} columns do not fill whole {bits}-bit words"
    fields = values.to(torch.int64).reshape(r, n // pack, pack)
    if order is not None:
        fields = fields[:, :, list(order)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (fields << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _shard_columns(layer: LinearBase, shard_id: int | str | None) -> tuple[int, int]:
    """(first output column of this shard in the local weight, its width)."""
    if isinstance(layer, ColumnParallelLinear) and shard_id is not None:
        offset, size, _ = layer._shard(shard_id)
        return offset, size
    return 0, layer.output_size_per_partition


def _shard_ids(layer: LinearBase) -> list[int | str | None]:
    from kvasir.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(len(layer.output_partition_sizes)))
    return [None]


class WNA16LinearMethod(LinearMethod):
    """Integer weights (``layer.qweight``, ``layer.scales``, ``layer.qzeros`` holding the
    unpacked zero points as float32, ``layer.g_idx``) in the layout of the module
    docstring."""

    def __init__(self, scheme: WNA16Scheme, device: torch.device) -> None:
        self.scheme = scheme
        self.path = "triton" if device.type == "cuda" else "cpu-reference"

    def create_weights(
        self,
        layer: LinearBase,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None:
        s = self.scheme
        if layer.tp_size > 1:
            raise ValueError(
                f"{layer.prefix}: {s.packing} checkpoints with tensor_parallel_size > 1 are "
                "not supported yet"
            )
        n, k = sum(output_partition_sizes), input_size_per_partition
        pack = 32 // s.bits
        if k % pack:
            raise ValueError(
                f"{layer.prefix}: input size {k} is not a multiple of {pack} "
                f"({s.bits}-bit values per int32)"
            )
        group = k if s.group_size == -1 else s.group_size
        num_groups = -(-k // group)
        layer.wna16_group_size = group  # type: ignore[assignment]
        layer.wna16_loaded = set()  # type: ignore[assignment]

        def param(name: str, shape: tuple[int, ...], dtype: torch.dtype, fill: float) -> None:
            p = nn.Parameter(torch.full(shape, fill, dtype=dtype), requires_grad=False)
            p.keep_dtype = True  # type: ignore[attr-defined]
            layer.register_parameter(name, p)
            set_weight_loader(p, functools.partial(self._load, layer, name))

        param("qweight", (k // pack, n), torch.int32, 0)
        param("scales", (num_groups, n), torch.float32, float("nan"))
        param("qzeros", (num_groups, n), torch.float32, float("nan"))
        param("g_idx", (k,), torch.int32, -1)
        # Shape-only stand-in for the float weight the model expects (module docstring).
        placeholder = nn.Parameter(
            torch.empty(n, k, dtype=params_dtype, device="meta"), requires_grad=False
        )
        layer.register_parameter("weight", placeholder)
        set_weight_loader(placeholder, functools.partial(self._load_placeholder, layer))

    # ------------------------------------------------------------------ loading
    def _load_placeholder(
        self,
        layer: LinearBase,
        param: nn.Parameter,
        loaded: torch.Tensor,
        shard_id: int | str | None = None,
    ) -> None:
        if loaded.device.type != "meta":
            raise ValueError(
                f"{layer.prefix}: the checkpoint has a float weight for a layer its "
                f"quantization_config quantises ({self.scheme.describe()}); expected "
                f"{list(CHECKPOINT_LEAVES)}"
            )

    def _load(
        self,
        layer: LinearBase,
        leaf: str,
        param: nn.Parameter,
        loaded: torch.Tensor,
        shard_id: int | str | None = None,
    ) -> None:
        s = self.scheme
        offset, size = _shard_columns(layer, shard_id)
        k = layer.input_size_per_partition
        num_groups = param.shape[0]
        pack = 32 // s.bits
        where = f"{layer.prefix}.{leaf}" + (f" (shard {shard_id})" if shard_id is not None else "")
        if leaf != "scales" and loaded.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where} has dtype {loaded.dtype}, expected int32")

        def expect(shape: tuple[int, ...]) -> None:
            if tuple(loaded.shape) != shape:
                raise ValueError(
                    f"{where} has shape {tuple(loaded.shape)}, expected {shape} for "
                    f"{s.describe()} (in {k}, out {size})"
                )

        words_n = -(-size // pack)
        if leaf == "qweight":
            if s.packing == "gptq":
                expect((k // pack, size))
                value = loaded.to(torch.int32)
            else:
                expect((k, words_n))
                value = pack_along_k(unpack_along_n(loaded.to(torch.int32), size, 4, AWQ_ORDER), 4)
        elif leaf == "qzeros":
            expect((num_groups, words_n))
            order = AWQ_ORDER if s.packing == "awq" else None
            value = unpack_along_n(loaded.to(torch.int32), size, s.bits, order)
            value = (value + s.zero_offset).float()
        elif leaf == "scales":
            expect((num_groups, size))
            value = loaded.float()
        else:  # g_idx: one per input row, shared by every shard
            expect((k,))
            if not bool(((loaded >= 0) & (loaded < num_groups)).all()):
                raise ValueError(f"{where} has group ids outside [0, {num_groups})")
            if (leaf, None) in layer.wna16_loaded and not torch.equal(  # type: ignore[operator]
                param.data, loaded.to(torch.int32)
            ):
                raise ValueError(
                    f"{where} differs from another fused projection's g_idx; kvasir fuses "
                    f"them into one layer with one input permutation"
                )
            param.data.copy_(loaded.to(torch.int32))
            layer.wna16_loaded.add((leaf, None))  # type: ignore[attr-defined]
            return
        with torch.no_grad():
            param.data.narrow(1, offset, size).copy_(value)
        layer.wna16_loaded.add((leaf, shard_id))  # type: ignore[attr-defined]

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if not hasattr(layer, "wna16_loaded"):
            return  # already processed
        s = self.scheme
        for shard in _shard_ids(layer):
            for leaf in ("qweight", "qzeros", "scales"):
                if (leaf, shard) not in layer.wna16_loaded:
                    name = leaf if shard is None else f"{leaf} of shard {shard}"
                    raise ValueError(f"{layer.prefix}: the checkpoint has no {name}")
        k = layer.input_size_per_partition
        group = layer.wna16_group_size
        default = torch.arange(k, dtype=torch.int32) // group
        g_idx = layer.g_idx.data if ("g_idx", None) in layer.wna16_loaded else default
        layer.wna16_perm = None  # type: ignore[assignment]
        layer.wna16_g_idx = None  # type: ignore[assignment]
        if not torch.equal(g_idx, default):
            perm = torch.argsort(g_idx, stable=True)
            q = unpack_along_k(layer.qweight.data, k, s.bits)[perm]  # rows sorted by group
            layer.qweight.data = pack_along_k(q, s.bits)
            sorted_g = g_idx[perm].contiguous()
            layer.wna16_perm = perm  # type: ignore[assignment]
            if not torch.equal(sorted_g, default):  # unequal groups: the kernel reads g_idx
                layer.wna16_g_idx = sorted_g  # type: ignore[assignment]
        del layer.g_idx, layer.wna16_loaded
        del layer._parameters["weight"]

    # ------------------------------------------------------------------ apply
    def _operands(self, layer: LinearBase) -> tuple:
        return (
            layer.qweight, layer.scales, layer.qzeros, layer.wna16_group_size,
            self.scheme.bits, layer.wna16_g_idx,
        )  # fmt: skip

    def _dequantized_sorted(self, layer: LinearBase) -> torch.Tensor:
        """``[N, K]`` float32 in the input order ``apply`` uses (act-order: sorted)."""
        q, sc, z, group, bits, g = self._operands(layer)
        return dequantize_wna16(q, sc, z, layer.input_size_per_partition, group, bits, g)

    def dequantized_weight(self, layer: LinearBase) -> torch.Tensor:
        """``[N, K]`` float32 in the checkpoint's input order."""
        w = self._dequantized_sorted(layer)
        if layer.wna16_perm is None:
            return w
        out = torch.empty_like(w)
        out[:, layer.wna16_perm] = w
        return out

    def apply(
        self,
        layer: LinearBase,
        x: torch.Tensor,  # [num_tokens, in_features]
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, out_features]
        if layer.wna16_perm is not None:
            x = x[:, layer.wna16_perm]
        if self.path == "cpu-reference" or not x.is_cuda:
            return F.linear(x, self._dequantized_sorted(layer).to(x.dtype), bias)
        from kvasir.kernels.wna16 import wna16_gemv, wna16_matmul

        q, sc, z, group, bits, g = self._operands(layer)
        x = x.contiguous()
        if x.shape[0] == 1:
            return wna16_gemv(x, q, sc, z, group, bits, g, bias)
        return wna16_matmul(x, q, sc, z, group, bits, g, bias)

    def apply_silu_mul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor | None:
        if not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1) or layer.bias is not None:
            return None
        from kvasir.kernels.gemv import FUSE_SILU_MUL_OUT
        from kvasir.kernels.wna16 import wna16_gemv

        if layer.wna16_perm is not None:
            x = x[:, layer.wna16_perm]
        q, sc, z, group, bits, g = self._operands(layer)
        return wna16_gemv(x.contiguous(), q, sc, z, group, bits, g, fusion=FUSE_SILU_MUL_OUT)


PATH_DESCRIPTIONS = {
    "triton": "Triton W{bits}A16 GEMM (GEMV at batch 1), weights dequantised in registers",
    "cpu-reference": "CPU torch reference: weights dequantised inside each matmul",
}
