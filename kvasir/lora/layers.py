"""LoRA wrappers around the model's ``LinearBase`` layers (the model file never knows).

A wrapper keeps the base layer (any ``LinearMethod``: unquantised, FP8, 4-bit...) and
computes ``base(x) + B[slot] (A[slot] x)`` per token, the slot coming from the step's
``LoRAStepState`` (shared by every wrapper, filled once per step by the manager; -1:
the base model). A fused layer (``qkv_proj``, ``gate_up_proj``) holds one A per
sub-projection stacked (``[slots, num_sub * max_rank, in]``) and a block-diagonal B
(``[slots, out, num_sub * max_rank]``), so one shrink and one expand cover every
sub-projection; a smaller rank, or a sub-projection the adapter does not target, is
zero padding (it adds exact zeros).

(IA)^3 slots multiply the output (``[slots + 1, out]``, row 0 all ones for the base)
or, for feed-forward modules, the input. Those buffers exist only once an (IA)^3
adapter was loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvasir.layers.activation import silu_and_mul
from kvasir.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear
from kvasir.lora.adapter import AdapterError, LoRAAdapter
from kvasir.lora.ops import PaddedGroups, batched_delta, segmented_delta

# kvasir's fused layer -> the HF sub-projections in it, in shard order (a model class
# can override with a ``packed_modules_mapping`` attribute, vLLM's name).
PACKED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


@dataclass
class LoRAStepState:
    """This step's per-token adapter slots, shared by every wrapper.

    ``token_slots`` ``[max_num_tokens]`` int32 is a persistent device buffer (CUDA
    graphs read it); ``mode`` says how the wrappers compute the delta: "off" (no token
    uses an adapter, or the adapter is merged: the base layer alone), "torch"
    (``slot_indices``: per slot, its token rows), "bgmv" (the gather kernel over
    ``token_slots``) or "sgmv" (the segment kernel over ``seg_starts`` / ``seg_slots``).
    """

    token_slots: torch.Tensor
    ia3_rows: torch.Tensor  # [max_num_tokens] int64: token_slots + 1 (row 0: ones)
    mode: str = "off"
    has_lora: bool = False
    has_ia3: bool = False
    num_tokens: int = 0
    slot_indices: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)
    groups: PaddedGroups | None = None  # "torch" with many slots: the batched path
    seg_starts: torch.Tensor | None = None  # [num_segments + 1] int32
    seg_slots: torch.Tensor | None = None  # [num_segments] int32
    max_seg_len: int = 0


class LoRALinear(nn.Module):
    """``base_layer`` plus the batched delta of the adapters in ``max_loras`` slots.

    ``sub_names``: the HF module name of each sub-projection of the base layer (one for
    an unfused layer). Slot buffers are written only by ``set_slot``."""

    def __init__(
        self,
        base_layer: LinearBase,
        sub_names: list[str],
        state: LoRAStepState,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        if base_layer.tp_size > 1:
            raise ValueError("enable_lora: LoRA with tensor parallelism is not supported yet")
        self.base_layer = base_layer
        self.sub_names = sub_names
        self.state = state
        self.max_rank = max_rank
        self.out_sizes = list(base_layer.output_partition_sizes)
        self.offsets = [sum(self.out_sizes[:j]) for j in range(len(self.out_sizes))]
        assert len(sub_names) == len(self.out_sizes)
        dev = state.token_slots.device
        self.in_features = base_layer.input_size_per_partition
        self.out_features = base_layer.output_size_per_partition
        k = len(sub_names) * max_rank
        self.register_buffer(
            "lora_a", torch.zeros(max_loras, k, self.in_features, dtype=dtype, device=dev),
            persistent=False,
        )  # fmt: skip
        self.register_buffer(
            "lora_b", torch.zeros(max_loras, self.out_features, k, dtype=dtype, device=dev),
            persistent=False,
        )  # fmt: skip
        self.ia3_out: torch.Tensor | None = None  # [max_loras + 1, out]
        self.ia3_in: torch.Tensor | None = None  # [max_loras + 1, in]
        self.max_loras = max_loras

    # ------------------------------------------------------------------ slots
    def set_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Write ``adapter``'s weights for this layer into ``slot`` (None: clear it)."""
        r_max = self.max_rank
        a, b = self.lora_a[slot], self.lora_b[slot]
        a.zero_()
        b.zero_()
        if self.ia3_out is not None:
            self.ia3_out[slot + 1].fill_(1.0)
        if self.ia3_in is not None:
            self.ia3_in[slot + 1].fill_(1.0)
        if adapter is None:
            return
        for j, name in enumerate(self.sub_names):
            if name in adapter.lora:
                wa, wb = adapter.lora[name]  # [r, in], [out_j, r]
                r = wa.shape[0]
                a[j * r_max : j * r_max + r].copy_(wa, non_blocking=True)
                o, n = self.offsets[j], self.out_sizes[j]
                b[o : o + n, j * r_max : j * r_max + r].copy_(wb, non_blocking=True)
            if name in adapter.ia3:
                vec, scales_input = adapter.ia3[name]
                if scales_input:
                    if len(self.sub_names) > 1:
                        raise AdapterError(
                            f"(IA)^3 input scaling of {name}, a part of a fused layer "
                            f"({'/'.join(self.sub_names)}), is not supported"
                        )
                    self._ia3_in()[slot + 1].copy_(vec, non_blocking=True)
                else:
                    o, n = self.offsets[j], self.out_sizes[j]
                    self._ia3_out()[slot + 1, o : o + n].copy_(vec, non_blocking=True)

    def _ia3_out(self) -> torch.Tensor:
        if self.ia3_out is None:
            self.ia3_out = torch.ones(
                self.max_loras + 1, self.out_features, dtype=self.lora_a.dtype,
                device=self.lora_a.device,
            )  # fmt: skip
        return self.ia3_out

    def _ia3_in(self) -> torch.Tensor:
        if self.ia3_in is None:
            self.ia3_in = torch.ones(
                self.max_loras + 1, self.in_features, dtype=self.lora_a.dtype,
                device=self.lora_a.device,
            )  # fmt: skip
        return self.ia3_in

    def slot_delta_weight(self, slot: int) -> torch.Tensor:
        """``B A`` of ``slot`` as a dense ``[out, in]`` matrix (merging)."""
        return self.lora_b[slot] @ self.lora_a[slot]

    # ------------------------------------------------------------------ forward
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        n = x.shape[0]
        if st.has_ia3 and self.ia3_in is not None:
            x = x * self.ia3_in.index_select(0, st.ia3_rows[:n])
        y = self.base_layer(x)  # [num_tokens, out] through the base layer's method
        if st.has_ia3 and self.ia3_out is not None:
            y = y * self.ia3_out.index_select(0, st.ia3_rows[:n])
        if not st.has_lora:
            return y
        if st.mode == "torch":
            if st.groups is not None:
                return batched_delta(x, self.lora_a, self.lora_b, st.groups, y)
            return segmented_delta(x, self.lora_a, self.lora_b, st.slot_indices, y)
        from kvasir.kernels import lora as lora_kernels

        if st.mode == "sgmv":
            assert st.seg_starts is not None and st.seg_slots is not None
            s = lora_kernels.sgmv_shrink(
                x, self.lora_a, st.seg_starts, st.seg_slots, st.max_seg_len
            )
            lora_kernels.sgmv_expand(s, self.lora_b, st.seg_starts, st.seg_slots, st.max_seg_len, y)
        else:
            slots = st.token_slots[:n]
            s = lora_kernels.bgmv_shrink(x, self.lora_a, slots)
            lora_kernels.bgmv_expand(s, self.lora_b, slots, y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [.., out]
        if self.state.mode == "off":
            return self.base_layer(x)
        return self._apply(x)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """For a wrapped ``gate_up_proj``: the base layer's fused path when no adapter
        runs, else the delta added before the activation."""
        if self.state.mode == "off":
            return self.base_layer.silu_and_mul(x)  # type: ignore[operator]
        return silu_and_mul(self._apply(x))

    def extra_repr(self) -> str:
        return f"sub_modules={self.sub_names}, max_rank={self.max_rank}"


def sub_module_names(model: nn.Module, name: str, layer: LinearBase) -> list[str]:
    """The HF module names of ``layer``'s sub-projections (``name``: its path in the
    kvasir model, whose leaf is its attribute name)."""
    hf_name = layer.prefix or name
    parent, _, leaf = hf_name.rpartition(".")
    packed = getattr(model, "packed_modules_mapping", PACKED_MODULES)
    n = len(layer.output_partition_sizes)
    if leaf in packed and len(packed[leaf]) == n:
        return [f"{parent}.{sub}" if parent else sub for sub in packed[leaf]]
    if n != 1 or isinstance(layer, (QKVParallelLinear, MergedColumnParallelLinear)):
        if n != 1:
            raise ValueError(
                f"enable_lora: the fused layer {hf_name!r} has {n} sub-projections and no "
                "packed_modules_mapping entry"
            )
    return [hf_name]


def wrap_linear_layers(
    model: nn.Module, state: LoRAStepState, max_loras: int, max_rank: int, dtype: torch.dtype
) -> list[LoRALinear]:
    """Replace every ``LinearBase`` inside the decoder layers by a ``LoRALinear``
    (the embedding and the LM head stay as they are). Call after the weights are
    loaded: the base layers keep their parameter names under ``base_layer``."""
    wrapped: list[LoRALinear] = []
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LinearBase) and ".layers." in f".{name}"
    ]
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        subs = sub_module_names(model, name, layer)
        w = LoRALinear(layer, subs, state, max_loras, max_rank, dtype)
        setattr(parent, attr, w)
        wrapped.append(w)
    return wrapped
