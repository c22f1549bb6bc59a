"""The runner's side of multi-LoRA: adapter registry, host cache, device slots, and
the per-step adapter index the wrapped layers read.

The scheduler decides which adapter holds which slot (``kvasir.core.lora_slots``)
and reports new assignments in ``SchedulerOutput.lora_loads``; ``apply_loads`` copies
those adapters from the host cache into the slot buffers of every wrapped layer.
``prepare_step`` turns the step's requests into per-token slots (``LoRAStepState``)
and picks how the delta is computed: off (no adapter in the step), the torch path on
the CPU, BGMV (decode steps, CUDA graphs) or SGMV (prefill chunks) on CUDA.

Strategy (``LoRAConfig.lora_strategy``): "unmerged" always adds the delta;
"merged" folds ``B A`` into the base weights while one adapter is the only one in the
step (the wrapped layers then run the base path) and restores the saved originals, bit
for bit, as soon as another adapter or a base request joins; "auto" merges when the
measured cost says it pays (``_StrategyModel``). Merging needs unquantised base layers
(a quantised base runs unmerged).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kvasir.config import LoRAConfig
from kvasir.layers.linear_method import UnquantizedLinearMethod
from kvasir.lora.adapter import (
    AdapterError,
    AdapterInfo,
    LoRAAdapter,
    inspect_adapter,
    load_adapter,
)
from kvasir.lora.cache import HostAdapterCache
from kvasir.lora.layers import LoRALinear, LoRAStepState, wrap_linear_layers
from kvasir.lora.ops import PaddedGroups
from kvasir.lora.request import LoRARequest

if TYPE_CHECKING:
    from kvasir.worker.input_buffers import StepInputs

logger = logging.getLogger(__name__)

# CPU: from this many adapters in one step the delta runs as two batched products over
# tokens grouped by adapter (padded) rather than two products per adapter.
# Only for small steps (decodes): with long prefill chunks the padding and the gathered
# weights cost more than the per-adapter products (benchmarks/RESULTS.md, multi-LoRA).
_BATCHED_MIN_SLOTS = 3
_BATCHED_MAX_TOKENS = 128


class _StrategyModel:
    """``auto``: per-token step costs measured unmerged and merged (exponential moving
    averages over single-adapter steps) and the measured cost of one merge + unmerge.
    Merge when the run of single-adapter steps so far, repeated, would save more than
    a merge and an unmerge cost; without a merged measurement yet, try it once the run
    is ``explore_after`` steps long."""

    def __init__(self, explore_after: int = 4) -> None:
        self.unmerged: float | None = None  # seconds per token
        self.merged: float | None = None
        self.switch: float | None = None  # seconds per merge + unmerge
        self.explore_after = explore_after

    @staticmethod
    def _ema(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new

    def record(self, merged: bool, seconds: float, num_tokens: int) -> None:
        per_token = seconds / max(num_tokens, 1)
        if merged:
            self.merged = self._ema(self.merged, per_token)
        else:
            self.unmerged = self._ema(self.unmerged, per_token)

    def record_switch(self, seconds: float) -> None:
        self.switch = self._ema(self.switch, seconds)

    def should_merge(self, run_steps: int, num_tokens: int) -> bool:
        if self.unmerged is None:
            return False
        if self.merged is None:
            return run_steps >= self.explore_after
        gain = (self.unmerged - self.merged) * num_tokens * run_steps
        return gain > (self.switch or 0.0)


class LoRAManager:
    """Wraps the model's linear layers at construction (after its weights are loaded)."""

    def __init__(
        self,
        model: nn.Module,
        config: LoRAConfig,
        max_num_tokens: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config
        self.device = device
        self.max_loras = config.max_loras
        self.state = LoRAStepState(
            token_slots=torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device),
            ia3_rows=torch.zeros(max_num_tokens, dtype=torch.int64, device=device),
        )
        self.layers: list[LoRALinear] = wrap_linear_layers(
            model, self.state, config.max_loras, config.max_lora_rank, dtype
        )
        if not self.layers:
            raise ValueError("enable_lora: this model has no linear layers an adapter can target")
        self.module_shapes: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            for j, name in enumerate(layer.sub_names):
                self.module_shapes[name] = (layer.in_features, layer.out_sizes[j])
        self.requests: dict[int, LoRARequest] = {}
        self.infos: dict[int, AdapterInfo] = {}
        self.host = HostAdapterCache(config.num_cpu_loras, self._load_from_disk)
        self.slot_lora = [0] * config.max_loras  # adapter id in each slot (0: empty)
        self.slot_has_lora = [False] * config.max_loras
        self.slot_has_ia3 = [False] * config.max_loras
        # CUDA: the wrappers always run the kernels (reading the persistent slot
        # buffer), so CUDA graphs captured once serve every adapter mix.
        self.always_on = device.type == "cuda"
        if self.always_on:
            self.state.mode, self.state.has_lora = "bgmv", True
        self.num_device_loads = 0
        # Merging.
        self.strategy = config.lora_strategy
        self.can_merge = all(
            isinstance(layer.base_layer.method, UnquantizedLinearMethod) for layer in self.layers
        )
        self.merged_slot = -1
        self._originals: dict[int, torch.Tensor] = {}
        self._auto = _StrategyModel()
        self._run_slot, self._run_steps = -1, 0
        # The last step with adapters: (start, merged, tokens, one adapter only).
        self._last_step: tuple[float, bool, int, bool] | None = None
        self.num_merged_steps = 0
        self.num_unmerged_steps = 0
        self.num_merges = 0

    # ------------------------------------------------------------------ registry
    def register(self, req: LoRARequest) -> AdapterInfo:
        """Check an adapter against this model (config and safetensors header only);
        raises ``ValueError`` naming the adapter. Idempotent for the same request."""
        lora_id = req.lora_int_id
        known = self.requests.get(lora_id)
        if known is not None:
            if known.lora_path != req.lora_path or known.lora_name != req.lora_name:
                raise ValueError(
                    f"lora_request: adapter id {lora_id} is already {known.lora_name!r} "
                    f"({known.lora_path}); each adapter needs its own lora_int_id"
                )
            return self.infos[lora_id]
        what = f"adapter {req.lora_name!r}"
        if not req.lora_path:
            raise ValueError(f"{what}: lora_path is required")
        info = inspect_adapter(req.lora_path, self.module_shapes, self.config.max_lora_rank, what)
        if info.ia3 and self.device.type == "cuda":
            raise AdapterError(f"{what}: (IA)^3 adapters run on the CPU only so far")
        self.requests[lora_id] = req
        self.infos[lora_id] = info
        return info

    def unregister(self, lora_id: int) -> None:
        """Forget an adapter (unloaded at run time); its slot is cleared when reused."""
        self.requests.pop(lora_id, None)
        self.infos.pop(lora_id, None)
        self.host.drop(lora_id)

    def _load_from_disk(self, lora_id: int) -> LoRAAdapter:
        info = self.infos.get(lora_id)
        if info is None:
            raise AdapterError(f"adapter id {lora_id} is not registered")
        adapter = load_adapter(info, f"adapter {self.requests[lora_id].lora_name!r}")
        if self.device.type == "cuda":
            adapter.lora = {
                k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.lora.items()
            }
        return adapter

    def prefetch(self, lora_id: int) -> None:
        """Start loading an adapter into host memory (a waiting request needs it)."""
        self.host.request(lora_id)

    def is_ready(self, lora_id: int) -> bool:
        """Whether ``apply_loads`` can copy the adapter into a slot now; if not, a
        background load is started (or already running)."""
        if lora_id in self.host:
            return True
        self.host.request(lora_id)
        return False

    def take_failed(self) -> list[tuple[int, str]]:
        return self.host.take_failed()

    # ------------------------------------------------------------------ slots
    def apply_loads(self, loads: dict[int, int]) -> None:
        """Copy each (slot -> adapter) assignment of the scheduler into the slots."""
        for slot, lora_id in loads.items():
            if self.merged_slot == slot:
                self._unmerge()
            adapter = self.host.take(lora_id)
            dtype = self.layers[0].lora_a.dtype
            converted = LoRAAdapter(
                adapter.info,
                {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in adapter.lora.items()},
                {k: (v.to(dtype), f) for k, (v, f) in adapter.ia3.items()},
            )
            for layer in self.layers:
                layer.set_slot(slot, converted)
            self.slot_lora[slot] = lora_id
            self.slot_has_lora[slot] = bool(adapter.lora)
            self.slot_has_ia3[slot] = bool(adapter.ia3)
            self.num_device_loads += 1

    def slot_of(self, lora_id: int) -> int:
        for s, i in enumerate(self.slot_lora):
            if i == lora_id:
                return s
        raise KeyError(f"adapter {lora_id} is in no device slot")

    # ------------------------------------------------------------------ step
    def prepare_step(self, step: StepInputs) -> None:
        """Fill ``LoRAStepState`` for the step's tokens (in flat-batch order)."""
        now = time.perf_counter()
        self._account_last_step(now)
        st = self.state
        n = step.num_tokens
        lora_ids = [s.lora_id for s in step.states]
        if not any(lora_ids):
            self._set_off(n)
            return
        slot_index = {i: s for s, i in enumerate(self.slot_lora) if i}
        req_slots = np.array([slot_index[i] if i else -1 for i in lora_ids], dtype=np.int32)
        distinct = set(req_slots.tolist())
        single = len(distinct) == 1 and -1 not in distinct
        slot0 = req_slots[0]
        if single:
            self._run_steps = self._run_steps + 1 if self._run_slot == slot0 else 1
            self._run_slot = int(slot0)
        else:
            self._run_slot, self._run_steps = -1, 0
        if single and self._wants_merged(int(slot0), n):
            if self.merged_slot != slot0:
                self._merge(int(slot0))
            self._set_off(n, merged=True)
            return
        if self.merged_slot >= 0:
            self._unmerge()
        token_slots = np.repeat(req_slots, step.num_scheduled)  # [n]
        st.num_tokens = n
        st.has_lora = self.always_on or any(self.slot_has_lora[s] for s in distinct if s >= 0)
        st.has_ia3 = any(self.slot_has_ia3[s] for s in distinct if s >= 0)
        slots_t = torch.from_numpy(token_slots)
        st.token_slots.fill_(-1)
        st.token_slots[:n].copy_(slots_t, non_blocking=True)
        if st.has_ia3:
            st.ia3_rows[:n].copy_(slots_t.long() + 1, non_blocking=True)
        if self.device.type == "cpu":
            st.mode = "torch"
            st.groups = None
            lora_slots = [s for s in sorted(distinct) if s >= 0 and self.slot_has_lora[s]]
            if single:
                st.slot_indices = [(int(slot0), None)]
            elif len(lora_slots) >= _BATCHED_MIN_SLOTS and n <= _BATCHED_MAX_TOKENS:
                st.groups = PaddedGroups(torch.from_numpy(token_slots), lora_slots)
            else:
                st.slot_indices = [
                    (s, torch.from_numpy(np.nonzero(token_slots == s)[0])) for s in lora_slots
                ]
        elif step.graph_size or step.mixed_graph_tokens or int(step.num_scheduled.max()) == 1:
            st.mode = "bgmv"
        else:
            # Runs of one slot: each request's tokens are contiguous, and neighbours with
            # the same adapter merge into one segment.
            change = np.nonzero(np.diff(token_slots))[0] + 1
            starts = np.concatenate(([0], change, [n])).astype(np.int32)
            st.seg_starts = torch.from_numpy(starts).to(self.device, non_blocking=True)
            st.seg_slots = torch.from_numpy(token_slots[starts[:-1]].copy()).to(
                self.device, non_blocking=True
            )
            st.max_seg_len = int(np.diff(starts).max())
            st.mode = "sgmv"
        self._last_step = (time.perf_counter(), False, n, single)

    def _set_off(self, n: int, merged: bool = False) -> None:
        st = self.state
        st.num_tokens = n
        st.has_ia3 = False
        if self.merged_slot >= 0 and not merged:
            self._unmerge()
        if self.always_on:
            st.token_slots.fill_(-1)  # the kernels still run (graphs): no token has a slot
            st.mode, st.has_lora = "bgmv", True
        else:
            st.mode, st.has_lora = "off", False
        self._last_step = (time.perf_counter(), True, n, True) if merged else None

    def _account_last_step(self, now: float) -> None:
        last = self._last_step
        if last is None:
            return
        start, merged, n, single = last
        if merged:
            self.num_merged_steps += 1
        else:
            self.num_unmerged_steps += 1
        if self.strategy == "auto" and single:
            self._auto.record(merged, now - start, n)

    def _wants_merged(self, slot: int, num_tokens: int) -> bool:
        if self.strategy == "unmerged" or not self.can_merge or self.slot_has_ia3[slot]:
            return False
        if self.strategy == "merged":
            return True
        if self.merged_slot == slot:
            a = self._auto
            return a.merged is None or a.unmerged is None or a.merged <= a.unmerged
        return self._auto.should_merge(self._run_steps, num_tokens)

    # ------------------------------------------------------------------ merging
    def _merge(self, slot: int) -> None:
        if self.merged_slot >= 0:
            self._unmerge()
        t0 = time.perf_counter()
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                base = layer.base_layer
                w = base.weight
                self._originals[i] = w.detach().clone()
                w.add_(layer.slot_delta_weight(slot).to(w.dtype))
                base.method.process_weights_after_loading(base)
        self.merged_slot = slot
        self.num_merges += 1
        self._switch_t0 = time.perf_counter() - t0

    def _unmerge(self) -> None:
        """Restore the saved base weights (bit for bit) and their derived packs."""
        t0 = time.perf_counter()
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                base = layer.base_layer
                base.weight.copy_(self._originals.pop(i))
                base.method.process_weights_after_loading(base)
        self.merged_slot = -1
        self._auto.record_switch(getattr(self, "_switch_t0", 0.0) + time.perf_counter() - t0)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, float]:
        h = self.host
        stats = {
            "device_loads": self.num_device_loads,
            "host_hits": h.num_hits,
            "host_misses": h.num_misses,
            "disk_loads": h.num_disk_loads,
            "cold_starts": len(h.cold_start_seconds),
            "cold_start_seconds_sum": sum(h.cold_start_seconds),
            "merged_steps": self.num_merged_steps,
            "unmerged_steps": self.num_unmerged_steps,
            "merges": self.num_merges,
            "merged": self.merged_slot >= 0,
        }
        return {k: float(v) for k, v in stats.items()}

    def shutdown(self) -> None:
        self.host.shutdown()
