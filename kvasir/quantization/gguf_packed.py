"""``--quantization gguf``: a GGUF checkpoint's linear weights kept in their block
formats (``kvasir.kernels.gguf``: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K), never
dequantised to a float copy; float-typed ones (F32 / F16 / BF16) stay float.

The GGUF loader (``iterate_gguf(..., packed=True)``) hands each linear weight over as
two tensors, ``<module>.gguf_type`` (the ggml type id) and ``<module>.gguf_weight``
(``[N, row bytes]`` uint8, llama.cpp's q/k row permutation already undone on the rows);
``kvasir.models.loader.quant_loader`` loads them into the method's shards and gives the
model a shape-only weight. The token embedding (and a tied LM head) stay dequantised.

A fused layer (q/k/v, gate/up) whose parts share one type holds one ``[N, row bytes]``
matrix; parts of different types (llama.cpp's mixed "_M" files) each keep their own and
``apply`` concatenates their outputs.

Paths: CUDA: the Triton dequantising GEMM / GEMV (SiLU-and-mul fused at batch 1) for
every type but Q2_K / Q3_K, those dequantised to the activation dtype inside the call; CPU: the torch reference (each call dequantises, then one matmul).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType
from torch import nn

from kvasir.kernels.gguf import PACKED_TYPES, TRITON_TYPES, dequantize_gguf, row_bytes
from kvasir.layers.linear import LinearBase, LinearMethod, set_weight_loader
from kvasir.quantization import QuantizationConfig, register_quantization_config
from kvasir.quantization.wna16_linear import _shard_columns, _shard_ids

Q = GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
SUPPORTED = [t.name for t in (*PACKED_TYPES, *FLOAT_TYPES)]


def check_packed_type(name: str, kind: GGMLQuantizationType, path: str = "") -> None:
    """Refuse a linear weight whose type cannot be kept packed, naming it."""
    if kind not in PACKED_TYPES and kind not in FLOAT_TYPES:
        where = f" of GGUF file '{path}'" if path else ""
        raise ValueError(
            f"tensor {name!r}{where} has type {kind.name}, which --quantization gguf cannot "
            f"keep packed; supported: {SUPPORTED} (or load it dequantised with "
            f"--quantization none)"
        )


class GGUFLinearMethod(LinearMethod):
    """``layer.gguf_shards``: per part, ``(type, first output row, rows, tensor)`` with
    the tensor ``[rows, row bytes]`` uint8 (packed) or ``[rows, K]`` float."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def create_weights(
        self,
        layer: LinearBase,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None:
        if layer.tp_size > 1:
            raise ValueError(
                f"{layer.prefix}: --quantization gguf with tensor_parallel_size > 1 is not "
                "supported yet"
            )
        n, k = sum(output_partition_sizes), input_size_per_partition
        layer.gguf_pending = {}  # type: ignore[assignment]  # shard -> ggml type
        layer.gguf_parts = {}  # type: ignore[assignment]  # shard -> (type, offset, tensor)
        layer.gguf_dtype = params_dtype  # type: ignore[assignment]
        for leaf in ("gguf_type", "gguf_weight"):
            p = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
            layer.register_parameter(leaf, p)
            set_weight_loader(p, functools.partial(self._load, layer, leaf))
        placeholder = nn.Parameter(
            torch.empty(n, k, dtype=params_dtype, device="meta"), requires_grad=False
        )
        layer.register_parameter("weight", placeholder)
        set_weight_loader(placeholder, functools.partial(self._load_placeholder, layer))

    def _load_placeholder(
        self, layer: LinearBase, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        if loaded.device.type != "meta":
            raise ValueError(f"{layer.prefix}: expected the packed GGUF weight, got a float one")

    def _load(
        self,
        layer: LinearBase,
        leaf: str,
        param: nn.Parameter,
        loaded: torch.Tensor,
        shard_id: Any = None,
    ) -> None:
        where = f"{layer.prefix}" + (f" (shard {shard_id})" if shard_id is not None else "")
        if leaf == "gguf_type":
            kind = Q(int(loaded.reshape(-1)[0]))
            check_packed_type(where, kind)
            layer.gguf_pending[shard_id] = kind  # type: ignore[index]
            return
        kind = layer.gguf_pending.pop(shard_id, None)  # type: ignore[attr-defined]
        if kind is None:
            raise ValueError(f"{where}: packed GGUF weight without its type")
        offset, size = _shard_columns(layer, shard_id)
        k = layer.input_size_per_partition
        if kind in FLOAT_TYPES:
            want: tuple[int, ...] = (size, k)
            value = loaded.to(device=self.device, dtype=layer.gguf_dtype)  # type: ignore[arg-type]
        else:
            want = (size, row_bytes(kind, k))
            value = loaded.to(device=self.device, dtype=torch.uint8).contiguous()
        if tuple(loaded.shape) != want:
            raise ValueError(
                f"{where}: packed {kind.name} weight has shape {tuple(loaded.shape)}, "
                f"expected {want} (out {size}, in {k})"
            )
        layer.gguf_parts[shard_id] = (kind, offset, value)  # type: ignore[index]

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if not hasattr(layer, "gguf_parts"):
            return
        parts = []
        for shard in _shard_ids(layer):
            if shard not in layer.gguf_parts:
                name = layer.prefix + (f" (shard {shard})" if shard is not None else "")
                raise ValueError(f"{name}: the checkpoint has no weight for it")
            parts.append(layer.gguf_parts[shard])
        parts.sort(key=lambda p: p[1])
        kinds = {p[0] for p in parts}
        if len(kinds) == 1:  # one matrix: one kernel per call
            parts = [(parts[0][0], 0, torch.cat([p[2] for p in parts]))]
        layer.gguf_shards = [(kind, t) for kind, _, t in parts]  # type: ignore[assignment]
        for name in ("gguf_type", "gguf_weight", "weight"):
            del layer._parameters[name]
        del layer.gguf_parts, layer.gguf_pending

    def resident_bytes(self, layer: LinearBase) -> int:
        return sum(t.numel() * t.element_size() for _, t in layer.gguf_shards)

    def dequantized_weight(self, layer: LinearBase) -> torch.Tensor:
        """``[N, K]`` float32."""
        k = layer.input_size_per_partition
        return torch.cat([
            w.float() if kind in FLOAT_TYPES else dequantize_gguf(w, kind, k)
            for kind, w in layer.gguf_shards
        ])  # fmt: skip

    # ------------------------------------------------------------------ apply
    def _one(self, kind: GGMLQuantizationType, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if kind in FLOAT_TYPES:
            return F.linear(x, w.to(x.dtype))
        if x.is_cuda and kind in TRITON_TYPES:
            from kvasir.kernels.gguf import gguf_gemv, gguf_matmul

            x = x.contiguous()
            return gguf_gemv(x, w, kind) if x.shape[0] == 1 else gguf_matmul(x, w, kind)
        return F.linear(x, dequantize_gguf(w, kind, x.shape[1]).to(x.dtype))

    def apply(
        self,
        layer: LinearBase,
        x: torch.Tensor,  # [num_tokens, in_features]
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, out_features]
        shards = layer.gguf_shards
        if len(shards) == 1:
            y = self._one(*shards[0], x)
        else:
            y = torch.cat([self._one(kind, w, x) for kind, w in shards], dim=-1)
        return y if bias is None else y + bias

    def apply_silu_mul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor | None:
        shards = layer.gguf_shards
        if not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and len(shards) == 1):
            return None
        kind, w = shards[0]
        if kind not in TRITON_TYPES or layer.bias is not None:
            return None
        from kvasir.kernels.gemv import FUSE_SILU_MUL_OUT
        from kvasir.kernels.gguf import gguf_gemv

        return gguf_gemv(x.contiguous(), w, kind, fusion=FUSE_SILU_MUL_OUT)


@register_quantization_config("gguf")
class GGUFConfig(QuantizationConfig):
    """Every decoder linear layer of a GGUF checkpoint kept in its stored format."""

    checkpoint_leaves = ("gguf_type", "gguf_weight")
    checkpoint_primary_leaf = "gguf_weight"
    keeps_gguf_packed = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.types: set[str] = set()

    @classmethod
    def online(cls, device: torch.device) -> GGUFConfig:
        return cls(device)

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethod | None:
        if prefix == "lm_head":
            return None  # tied to the (dequantised) embedding, or dequantised like it
        return GGUFLinearMethod(self.device)

    def describe(self) -> str:
        if self.device.type == "cuda":
            path = (
                f"Triton dequantising GEMM/GEMV ({', '.join(t.name for t in TRITON_TYPES)}; "
                "other types dequantised inside each call)"
            )
        else:
            path = "CPU torch reference: blocks dequantised inside each matmul"
        return f"gguf (linear weights kept in their GGUF block formats) via {path}"
