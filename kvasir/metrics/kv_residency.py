"""Sampled KV-block residency (vLLM's ``kv_block_lifetime_seconds``,
``kv_block_idle_before_evict_seconds``, ``kv_block_reuse_gap_seconds``).

A fixed random sample of the block pool's blocks is looked at once per engine step
(``--kv-cache-metrics``; ``--kv-cache-metrics-sample`` is the fraction). Each sampled
block is in one of three states (see ``kvasir.core.block_pool``): free, in use
(``ref_cnt > 0``) or free but cached (has a hash). Transitions between two looks give:

* lifetime: from the step its content was written (allocated) to the step it was lost
  (freed without a hash, or evicted: its hash dropped or replaced);
* idle before evict: from its last release (in use -> free cached) to its eviction;
* reuse gap: from its last release to a prefix-cache hit on the same content.

Resolution is one step; a block evicted and reused for new content between two looks
counts as one eviction. Plain Python over the pool's block objects: never torch.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvasir.core.block_pool import BlockPool
    from kvasir.engine.step_stats import StepStats

_FREE, _IN_USE, _CACHED = 0, 1, 2


class KVBlockResidencySampler:
    def __init__(self, pool: BlockPool, sample: float, now: float, seed: int = 0) -> None:
        if not 0.0 < sample <= 1.0:
            raise ValueError(f"kv_cache_metrics_sample must be in (0, 1], got {sample}")
        usable = list(range(1, pool.num_blocks))  # block 0 is the null block
        n = min(len(usable), max(1, round(sample * len(usable))))
        ids = sorted(random.Random(seed).sample(usable, n))
        self.blocks = [pool.blocks[i] for i in ids]
        self._state = [self._state_of(b) for b in self.blocks]
        self._hash = [b.block_hash for b in self.blocks]
        self._alloc_time = [now] * n
        self._release_time = [now] * n

    @staticmethod
    def _state_of(block) -> int:  # noqa: ANN001 - a KVCacheBlock
        if block.ref_cnt > 0:
            return _IN_USE
        return _CACHED if block.block_hash is not None else _FREE

    def sample(self, now: float, out: StepStats) -> None:
        """Compare each sampled block with its last look; append observations to ``out``."""
        for i, b in enumerate(self.blocks):
            old, new = self._state[i], self._state_of(b)
            same_content = b.block_hash is not None and b.block_hash == self._hash[i]
            if new == old:
                if b.block_hash == self._hash[i]:
                    continue
                if new == _IN_USE and self._hash[i] is None:
                    self._hash[i] = b.block_hash  # filled and registered while in use
                    continue
                # otherwise the content was replaced between two looks
            if old == _CACHED and new == _IN_USE and same_content:
                out.kv_block_reuse_gaps.append(now - self._release_time[i])
            elif old == _IN_USE and new == _CACHED and same_content:
                self._release_time[i] = now  # released, content kept for later hits
            elif old != _FREE or new != _IN_USE:
                # The content is gone (freed without a hash, evicted, or replaced).
                if old != _FREE:
                    out.kv_block_lifetimes.append(now - self._alloc_time[i])
                if old == _CACHED:
                    out.kv_block_idle_before_evict.append(now - self._release_time[i])
                self._alloc_time[i] = now
            else:  # free -> in use: fresh content
                self._alloc_time[i] = now
            self._state[i] = new
            self._hash[i] = b.block_hash
