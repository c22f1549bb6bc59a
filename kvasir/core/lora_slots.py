"""Which adapter holds which device slot: the scheduler's side of multi-LoRA.

Pure Python over integer adapter ids (0: the base model, which needs no slot). A
request holds its adapter's slot from admission until it finishes or is preempted, so
an adapter in use is never evicted and a step never runs more than ``max_loras``
distinct adapters. A slot whose adapter no running request uses is reused least
recently used first; every (re)assignment is reported once in ``take_loads()`` (the
runner copies that adapter in before the step runs).

Admission policy (``admit``):

* an adapter that is not ready (still loading from disk on the runner's prefetch
  thread) or has no free slot: the request is skipped, the others go on (no
  head-of-line blocking);
* resident adapters are preferred: a request whose adapter is resident takes its slot
  without evicting anyone;
* age bound: once a skipped request has waited ``max_wait_steps`` admission passes,
  requests for other adapters are no longer admitted unless they are the base model
  (so the running ones drain and free a slot for it: a cold adapter is never starved);
* fairness: while such a request starves, no adapter runs more than its share
  (``max_num_seqs`` over the adapters with demand) of new requests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class LoRASlots:
    """``max_loras`` slots. ``is_ready(lora_id)`` says whether the runner can copy the
    adapter in now (in host memory); ``None``: always."""

    def __init__(
        self,
        max_loras: int,
        max_wait_steps: int = 32,
        max_num_seqs: int = 256,
        is_ready: Callable[[int], bool] | None = None,
    ) -> None:
        self.max_loras = max_loras
        self.max_wait_steps = max_wait_steps
        self.max_num_seqs = max_num_seqs
        self.is_ready = is_ready or (lambda _lora_id: True)
        self.slot_of: dict[int, int] = {}  # resident adapter -> slot
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident adapters, oldest first
        self.num_running: dict[int, int] = {}  # adapter -> requests holding its slot
        self._free = list(range(max_loras - 1, -1, -1))
        self._loads: dict[int, int] = {}  # slot -> adapter, since the last take_loads()
        self._waits: dict[str, int] = {}  # request id -> admission passes it was skipped
        self.starving: int | None = None  # an adapter past the age bound (one at a time)
        self.num_loads = 0  # cumulative slot (re)assignments
        self.num_hits = 0  # admissions whose adapter was resident

    # ------------------------------------------------------------------ slots
    def _acquire(self, lora_id: int) -> int | None:
        slot = self.slot_of.get(lora_id)
        if slot is not None:
            self._lru.move_to_end(lora_id)
            self.num_hits += 1
        else:
            if self._free:
                slot = self._free.pop()
            else:
                victim = next((i for i in self._lru if not self.num_running.get(i)), None)
                if victim is None:
                    return None  # every resident adapter is in use
                slot = self.slot_of.pop(victim)
                del self._lru[victim]
            self.slot_of[lora_id] = slot
            self._lru[lora_id] = None
            self._loads[slot] = lora_id
            self.num_loads += 1
        self.num_running[lora_id] = self.num_running.get(lora_id, 0) + 1
        return slot

    def release(self, lora_id: int) -> None:
        """A request of ``lora_id`` stopped running (finished, aborted, preempted)."""
        if lora_id <= 0:
            return
        n = self.num_running.get(lora_id, 0) - 1
        assert n >= 0, f"adapter {lora_id} released more often than acquired"
        if n:
            self.num_running[lora_id] = n
        else:
            self.num_running.pop(lora_id, None)

    def evict(self, lora_id: int) -> bool:
        """Drop an unused adapter from its slot (unloaded at run time); False if in use."""
        if self.num_running.get(lora_id):
            return False
        slot = self.slot_of.pop(lora_id, None)
        if slot is not None:
            del self._lru[lora_id]
            self._free.append(slot)
            self._loads.pop(slot, None)
        return True

    def take_loads(self) -> dict[int, int]:
        """Slot -> adapter for every slot (re)assigned since the last call."""
        loads, self._loads = self._loads, {}
        return loads

    # ------------------------------------------------------------------ admission
    def admit(self, request_id: str, lora_id: int, waiting_lora_ids: set[int]) -> int | None:
        """The slot for a waiting request's adapter, or None: skip it this pass.
        ``waiting_lora_ids``: adapters with requests still waiting (for fairness)."""
        starving = self.starving
        if lora_id <= 0:
            return -1
        if starving is not None and lora_id != starving:
            # Age bound: let the running requests drain until the starving adapter gets
            # a slot; an adapter over its fair share admits nobody meanwhile.
            share = max(1, self.max_num_seqs // max(1, len(waiting_lora_ids)))
            if lora_id not in self.slot_of or self.num_running.get(lora_id, 0) >= share:
                self._skip(request_id, lora_id)
                return None
            if not self._would_leave_room(starving):
                self._skip(request_id, lora_id)
                return None
        if lora_id not in self.slot_of and not self.is_ready(lora_id):
            self._skip(request_id, lora_id)
            return None
        slot = self._acquire(lora_id)
        if slot is None:
            self._skip(request_id, lora_id)
            return None
        self._waits.pop(request_id, None)
        if starving == lora_id:
            self.starving = None
        return slot

    def _would_leave_room(self, starving: int) -> bool:
        # A resident adapter may still admit while a free or idle slot exists for the
        # starving one (then it is not what blocks it).
        return bool(self._free) or any(not self.num_running.get(i) for i in self._lru)

    def _skip(self, request_id: str, lora_id: int) -> None:
        n = self._waits.get(request_id, 0) + 1
        self._waits[request_id] = n
        if n >= self.max_wait_steps and self.starving is None:
            self.starving = lora_id

    def forget(self, request_id: str, lora_id: int) -> None:
        """A waiting request left (aborted) without being admitted."""
        self._waits.pop(request_id, None)
        if self.starving == lora_id:
            self.starving = None  # flagged again if another of its requests starves
