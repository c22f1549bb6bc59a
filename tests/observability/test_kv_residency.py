"""Sampled KV-block residency against a hand-driven real BlockPool (every block
sampled): lifetimes, idle-before-evict and reuse gaps at the step times they happen."""

from __future__ import annotations

import pytest

from kvasir.core.block_pool import BlockPool
from kvasir.engine.step_stats import StepStats
from kvasir.metrics.kv_residency import KVBlockResidencySampler


def _step(sampler: KVBlockResidencySampler, t: float) -> StepStats:
    st = StepStats(t, 0.0, 0.0, 0.0)
    sampler.sample(t, st)
    return st


def test_lifetime_idle_and_reuse() -> None:
    pool = BlockPool(3, enable_caching=True)  # blocks 1 and 2 usable
    s = KVBlockResidencySampler(pool, 1.0, now=0.0)
    assert [b.block_id for b in s.blocks] == [1, 2]
    (a, b) = pool.get_new_blocks(2)  # t=1: both allocated
    assert _step(s, 1.0).kv_block_lifetimes == []
    pool.cache_full_blocks([a], [b"h1"], 0, 1)  # a filled and registered
    _step(s, 2.0)
    pool.free_blocks([b])  # t=3: b freed without a hash: its content is gone
    st = _step(s, 3.0)
    assert st.kv_block_lifetimes == [pytest.approx(2.0)]
    pool.free_blocks([a])  # t=4: a released, still cached
    assert _step(s, 4.0).kv_block_lifetimes == []
    pool.touch([a])  # t=6: a prefix hit on a
    st = _step(s, 6.0)
    assert st.kv_block_reuse_gaps == [pytest.approx(2.0)] and not st.kv_block_lifetimes
    pool.free_blocks([a])  # t=7 released again
    _step(s, 7.0)
    # t=10: a evicted for new content (both blocks taken: the free one first).
    pool.get_new_blocks(2)
    st = _step(s, 10.0)
    assert st.kv_block_idle_before_evict == [pytest.approx(3.0)]
    # a lived from t=1 to its eviction at t=10; b was merely reallocated (free -> used).
    assert st.kv_block_lifetimes == [pytest.approx(9.0)]


def test_sample_fraction() -> None:
    pool = BlockPool(201, enable_caching=True)
    s = KVBlockResidencySampler(pool, 0.05, now=0.0)
    assert len(s.blocks) == 10 and all(b.block_id != 0 for b in s.blocks)
    with pytest.raises(ValueError, match="kv_cache_metrics_sample"):
        KVBlockResidencySampler(pool, 0.0, now=0.0)
