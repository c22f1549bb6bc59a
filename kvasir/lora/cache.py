"""The host tier of the adapter cache, with a background loader.

Disk -> host: ``request(lora_id)`` queues a load on one background thread (reading an
adapter's safetensors never runs on the engine's loop); ``get(lora_id)`` is the
loaded adapter or None. At most ``capacity`` adapters are held, least recently used
evicted first; adapters fetched for waiting requests and not yet copied to a device
slot are *wanted* and evicted only when nothing else can go (so a prefetch is not lost
before its request runs, and a full cache of wanted adapters cannot deadlock).
On CUDA the tensors are pinned, so the copy into a device slot runs asynchronously.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kvasir.lora.adapter import LoRAAdapter

logger = logging.getLogger(__name__)


class HostAdapterCache:
    """``loader(lora_id) -> LoRAAdapter`` reads one adapter from disk (raising
    ``ValueError`` on a bad one: reported by ``take_failed``)."""

    def __init__(
        self,
        capacity: int,
        loader: Callable[[int], LoRAAdapter],
        background: bool = True,
    ) -> None:
        self.capacity = capacity
        self.loader = loader
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._wanted: set[int] = set()
        self._pending: set[int] = set()
        self._failed: list[tuple[int, str]] = []
        self._requested_at: dict[int, float] = {}
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="lora-prefetch") if background else None
        )
        self.num_disk_loads = 0
        self.num_hits = 0
        self.num_misses = 0
        # Seconds from an adapter's first request to its being in host memory, per load.
        self.cold_start_seconds: list[float] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, lora_id: int) -> bool:
        return lora_id in self._entries

    def request(self, lora_id: int) -> None:
        """Make sure ``lora_id`` is (or is being) loaded; it is wanted until taken."""
        with self._lock:
            self._wanted.add(lora_id)
            if lora_id in self._entries or lora_id in self._pending:
                return
            self._pending.add(lora_id)
            self._requested_at.setdefault(lora_id, time.perf_counter())
        if self._pool is None:
            self._load(lora_id)
        else:
            self._pool.submit(self._load, lora_id)

    def _load(self, lora_id: int) -> None:
        try:
            adapter = self.loader(lora_id)
        except Exception as e:  # reported to the engine, which fails its requests
            logger.error("LoRA adapter %d failed to load: %s", lora_id, e)
            with self._lock:
                self._pending.discard(lora_id)
                self._wanted.discard(lora_id)
                self._failed.append((lora_id, str(e)))
            return
        with self._lock:
            self._pending.discard(lora_id)
            self.num_disk_loads += 1
            self._insert(lora_id, adapter)
            self._ready_after(lora_id)

    def _insert(self, lora_id: int, adapter: LoRAAdapter) -> None:
        entries = self._entries
        entries[lora_id] = adapter
        entries.move_to_end(lora_id)
        while len(entries) > self.capacity:
            victim = next((i for i in entries if i not in self._wanted and i != lora_id), None)
            if victim is None:  # all wanted: the oldest goes (it is fetched again later)
                victim = next(i for i in entries if i != lora_id)
                self._wanted.discard(victim)
            del entries[victim]

    def _ready_after(self, lora_id: int) -> None:
        # A cold start ends when the adapter is in host memory (ready for a slot).
        t0 = self._requested_at.pop(lora_id, None)
        if t0 is not None:
            self.cold_start_seconds.append(time.perf_counter() - t0)

    def get(self, lora_id: int) -> LoRAAdapter | None:
        """The adapter if it is in host memory (marked recently used), else None."""
        with self._lock:
            adapter = self._entries.get(lora_id)
            if adapter is not None:
                self._entries.move_to_end(lora_id)
                self.num_hits += 1
            return adapter

    def take(self, lora_id: int) -> LoRAAdapter:
        """The adapter for a device slot, loading it here if it is not in host memory
        (a miss); no longer wanted."""
        adapter = self.get(lora_id)
        if adapter is None:
            self.num_misses += 1
            with self._lock:
                self._requested_at.setdefault(lora_id, time.perf_counter())
            adapter = self.loader(lora_id)
            with self._lock:
                self.num_disk_loads += 1
                self._insert(lora_id, adapter)
                self._ready_after(lora_id)
        with self._lock:
            self._wanted.discard(lora_id)
        return adapter

    def drop(self, lora_id: int) -> None:
        with self._lock:
            self._entries.pop(lora_id, None)
            self._wanted.discard(lora_id)
            self._requested_at.pop(lora_id, None)

    def take_failed(self) -> list[tuple[int, str]]:
        with self._lock:
            failed, self._failed = self._failed, []
        return failed

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no load is pending (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.005)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
