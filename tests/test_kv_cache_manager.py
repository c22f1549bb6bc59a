"""KVCacheManager: prefix hits, allocation, forking, freeing; hand cases + a random
model-based test that tracks what KV every block holds and checks every hit against it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvasir.core.kv_cache_manager import KVCacheManager
from kvasir.core.request import Request
from kvasir.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int], salt: str | None = None, **sp) -> Request:
    return Request(rid, tokens, SamplingParams(**sp), cache_salt=salt)


def _run_prefill(kv: KVCacheManager, req: Request) -> list[int]:
    blocks, num_computed = kv.get_computed_blocks(req)
    ids = kv.allocate_slots(req, req.num_tokens - num_computed, blocks, num_computed)
    assert ids is not None
    req.num_computed_tokens = req.num_tokens
    return ids


def test_prefix_hit_after_finish_and_counters() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True)
    a = _req("a", list(range(10)))
    ids_a = _run_prefill(kv, a)
    assert len(ids_a) == 3 and kv.prefix_cache_queries == 10 and kv.prefix_cache_hits == 0
    kv.free(a)
    b = _req("b", list(range(10)) + [99, 98])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and [blk.block_id for blk in blocks] == ids_a[:2]
    assert kv.prefix_cache_queries == 22 and kv.prefix_cache_hits == 8
    ids_b = kv.allocate_slots(b, 4, blocks, n)
    assert ids_b is not None and ids_b[:2] == ids_a[:2] and len(ids_b) == 3
    assert kv.get_block_ids("b") == ids_b
    # The prompt is on a block boundary: the last block is never a hit.
    c = _req("c", list(range(8)))
    blocks, n = kv.get_computed_blocks(c)
    assert n == 4 and len(blocks) == 1
    # A lookup without recording leaves the counters alone.
    before = (kv.prefix_cache_queries, kv.prefix_cache_hits)
    kv.get_computed_blocks(c, record_stats=False)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == before


def test_repeated_blocks_at_different_positions_are_distinct() -> None:
    # Equal block contents at different depths have different (chained) hashes.
    kv = KVCacheManager(10, 2, enable_caching=True)
    a = _req("a", [5] * 8)
    ids = _run_prefill(kv, a)
    assert len(set(ids)) == 4 and len(kv.block_pool.cached_block_hash_to_block) == 4
    kv.free(a)
    blocks, n = kv.get_computed_blocks(_req("b", [5] * 9))
    assert n == 8 and [b.block_id for b in blocks] == ids


def test_no_lookup_when_caching_off_or_prompt_logprobs() -> None:
    off = KVCacheManager(10, 4, enable_caching=False)
    a = _req("a", list(range(10)))
    _run_prefill(off, a)
    off.free(a)
    assert off.get_computed_blocks(_req("b", list(range(10)))) == ([], 0)
    assert off.prefix_cache_queries == 0

    on = KVCacheManager(10, 4, enable_caching=True)
    a = _req("a", list(range(10)))
    _run_prefill(on, a)
    on.free(a)
    queries = on.prefix_cache_queries
    assert on.get_computed_blocks(_req("b", list(range(10)), prompt_logprobs=0)) == ([], 0)
    assert on.prefix_cache_queries == queries


def test_cache_salt_isolation() -> None:
    kv = KVCacheManager(20, 4, enable_caching=True)
    prompt = list(range(13))
    a = _req("a", prompt, salt="tenant-a")
    _run_prefill(kv, a)
    kv.free(a)
    assert kv.get_computed_blocks(_req("x", prompt))[1] == 0
    assert kv.get_computed_blocks(_req("y", prompt, salt="tenant-b"))[1] == 0
    assert kv.get_computed_blocks(_req("z", prompt, salt="tenant-a"))[1] == 12


def test_allocate_failure_changes_nothing() -> None:
    kv = KVCacheManager(5, 4, enable_caching=True)  # 4 usable blocks
    a = _req("a", list(range(8)))
    _run_prefill(kv, a)
    kv.free(a)  # 2 cached free blocks
    b = _req("b", list(range(8)) + list(range(100, 112)))  # 20 tokens = 5 blocks
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8
    free_before = kv.block_pool.get_free_block_ids()
    assert kv.allocate_slots(b, 12, blocks, n) is None
    assert kv.block_pool.get_free_block_ids() == free_before
    assert all(blk.ref_cnt == 0 for blk in blocks) and kv.get_block_ids("b") == []
    assert kv.usage == 0.0
    # A request that fits evicts in LRU order: a's tail block (id 2) goes first.
    c = _req("c", list(range(50, 54)))
    assert kv.allocate_slots(c, 4) == [3]  # the never-used block comes before cached ones
    d = _req("d", list(range(60, 64)))
    assert kv.allocate_slots(d, 4) == [4]
    e = _req("e", list(range(70, 74)))
    assert kv.allocate_slots(e, 4) == [2]
    assert kv.get_computed_blocks(_req("f", list(range(8))))[1] == 4  # block 1 survived


def test_incremental_decode_allocation_and_delayed_caching() -> None:
    kv = KVCacheManager(10, 4, enable_caching=True)
    a = _req("a", list(range(6)))
    assert kv.allocate_slots(a, 6, delay_cache_blocks=True) == [1, 2]
    assert kv.block_pool.cached_block_hash_to_block == {}
    a.num_computed_tokens = 6
    kv.cache_blocks(a, a.num_computed_tokens)
    assert len(kv.block_pool.cached_block_hash_to_block) == 1
    for step, tok in enumerate([7, 8, 9]):
        a.append_output_token_ids([tok])
        ids = kv.allocate_slots(a, 1)
        assert ids == ([] if step < 2 else [3])
        a.num_computed_tokens += 1
    assert kv.get_block_ids("a") == [1, 2, 3]
    assert len(kv.block_pool.cached_block_hash_to_block) == 2  # 8 computed tokens


def test_uncache_blocks_past_the_computed_prefix() -> None:
    kv = KVCacheManager(10, 2, enable_caching=True)
    a = _req("a", list(range(1, 8)))  # 7 tokens
    a.num_computed_tokens = 3
    assert kv.allocate_slots(a, 4) == [1, 2, 3, 4]  # registers blocks 1..3 (6 tokens)
    assert len(kv.block_pool.cached_block_hash_to_block) == 3
    kv.uncache_blocks(a, 3)  # the step will not run: only block 1 (tokens 0..1) is real
    hashes = [kv.block_pool.blocks[i].block_hash for i in (1, 2, 3, 4)]
    assert hashes[0] is not None and hashes[1:] == [None, None, None]
    assert list(kv.block_pool.cached_block_hash_to_block.values()) == [kv.block_pool.blocks[1]]
    kv.free(a)
    assert kv.get_computed_blocks(_req("b", list(range(1, 8))))[1] == 2


def test_fork_shares_prompt_blocks_without_caching() -> None:
    kv = KVCacheManager(10, 4, enable_caching=False)
    parent = _req("p", list(range(10)))
    parent_ids = _run_prefill(kv, parent)
    child = Request("c", list(range(10)), SamplingParams(), fork_of="p")
    shared = kv.fork(parent, child, 9)
    assert shared == parent_ids[:2]
    assert [kv.block_pool.blocks[i].ref_cnt for i in parent_ids] == [2, 2, 1]
    child.num_computed_tokens = 8
    new_ids = kv.allocate_slots(child, 2)
    assert new_ids is not None and len(new_ids) == 1 and new_ids[0] not in parent_ids
    assert kv.get_block_ids("c") == parent_ids[:2] + new_ids
    kv.free(parent)
    assert [kv.block_pool.blocks[i].ref_cnt for i in parent_ids] == [1, 1, 0]
    kv.free(child)
    assert kv.num_free_blocks == kv.num_usable_blocks
    with pytest.raises(AssertionError):
        kv.get_fork_blocks(_req("q", [1, 2, 3, 4, 5]), 4)  # nothing computed


# ---------------------------------------------------------------- model-based test

_PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], [7, 7, 3, 4, 5, 6], [5] * 12, []]


def _sig(tokens: list[int], salt: str | None, pos: int) -> tuple:
    """What a real model's KV at ``pos`` depends on: the salt's tenant and tokens[:pos+1]."""
    return (salt, tuple(tokens[: pos + 1]))


_op = st.one_of(
    st.tuples(
        st.just("new"),
        st.integers(0, len(_PREFIXES) - 1),
        st.lists(st.integers(0, 3), max_size=7),
        st.sampled_from([None, "s"]),
        st.integers(1, 12),
    ),
    st.tuples(st.just("step"), st.integers(0, 100), st.integers(1, 6)),
    st.tuples(st.just("fork"), st.integers(0, 100)),
    st.tuples(st.just("free"), st.integers(0, 100)),
    st.tuples(st.just("reset")),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(2, 14),
    block_size=st.sampled_from([1, 2, 4]),
    enable_caching=st.booleans(),
    ops=st.lists(_op, max_size=40),
)
def test_random_manager_operations(
    num_blocks: int, block_size: int, enable_caching: bool, ops: list
) -> None:
    kv = KVCacheManager(num_blocks, block_size, enable_caching)
    pool = kv.block_pool
    live: dict[str, Request] = {}
    content: dict[int, list] = {}  # block id -> per-slot signature of the KV written there
    counter = 0
    exp_queries = exp_hits = 0

    def write(req: Request, start: int, end: int) -> None:
        table = kv.get_block_ids(req.request_id)
        assert len(table) * block_size >= end
        for pos in range(start, end):
            block = pool.blocks[table[pos // block_size]]
            assert block.ref_cnt == 1, "writing into a shared block"
            content.setdefault(block.block_id, [None] * block_size)[pos % block_size] = _sig(
                req.all_token_ids, req.cache_salt, pos
            )

    def check_hits(req: Request, block_ids: list[int]) -> None:
        for j, bid in enumerate(block_ids):
            for off in range(block_size):
                pos = j * block_size + off
                assert content[bid][off] == _sig(req.all_token_ids, req.cache_salt, pos)

    for op in ops:
        kind = op[0]
        keys = sorted(live)
        if kind == "new":
            _, prefix_idx, suffix, salt, chunk = op
            tokens = _PREFIXES[prefix_idx] + suffix
            if not tokens:
                continue
            req = _req(f"r{counter}", tokens, salt=salt)
            counter += 1
            blocks, n = kv.get_computed_blocks(req)
            if enable_caching:
                exp_queries += len(tokens)
                exp_hits += n
                assert n <= (len(tokens) - 1) // block_size * block_size
            else:
                assert n == 0
            check_hits(req, [b.block_id for b in blocks])
            num_new = min(chunk, req.num_tokens - n)
            ids = kv.allocate_slots(req, num_new, blocks, n)
            if ids is None:
                assert kv.get_block_ids(req.request_id) == []
                continue
            req.num_computed_tokens = n
            write(req, n, n + num_new)
            req.num_computed_tokens = n + num_new
            live[req.request_id] = req
        elif kind == "step" and keys:
            req = live[keys[op[1] % len(keys)]]
            if req.num_computed_tokens == req.num_tokens:
                req.append_output_token_ids([op[1] % 4])  # a "sampled" token
            num_new = min(op[2], req.num_tokens - req.num_computed_tokens)
            before = kv.get_block_ids(req.request_id)
            ids = kv.allocate_slots(req, num_new)
            if ids is None:
                assert kv.get_block_ids(req.request_id) == before
                continue
            assert kv.get_block_ids(req.request_id) == before + ids
            write(req, req.num_computed_tokens, req.num_computed_tokens + num_new)
            req.num_computed_tokens += num_new
        elif kind == "fork" and keys:
            parent = live[keys[op[1] % len(keys)]]
            if parent.num_computed_tokens < parent.num_prompt_tokens:
                continue
            child = Request(
                f"r{counter}",
                parent.prompt_token_ids,
                SamplingParams(),
                cache_salt=parent.cache_salt,
                fork_of=parent.request_id,
            )
            counter += 1
            num_shared = (parent.num_prompt_tokens - 1) // block_size * block_size
            blocks = kv.get_fork_blocks(parent, num_shared)
            check_hits(child, [b.block_id for b in blocks])
            ids = kv.allocate_slots(child, child.num_tokens - num_shared, blocks, num_shared)
            if ids is None:
                continue
            assert ids[: len(blocks)] == kv.get_block_ids(parent.request_id)[: len(blocks)]
            child.num_computed_tokens = num_shared
            write(child, num_shared, child.num_tokens)
            child.num_computed_tokens = child.num_tokens
            live[child.request_id] = child
        elif kind == "free" and keys:
            kv.free(live.pop(keys[op[1] % len(keys)]))
        elif kind == "reset":
            assert kv.reset_prefix_cache()
            assert pool.cached_block_hash_to_block == {}
        # Invariants after every operation.
        refs: dict[int, int] = {}
        for rid in live:
            for bid in kv.get_block_ids(rid):
                refs[bid] = refs.get(bid, 0) + 1
        free_ids = pool.get_free_block_ids()
        assert len(free_ids) == len(set(free_ids))
        for block in pool.blocks[1:]:
            assert block.ref_cnt == refs.get(block.block_id, 0)
            assert (block.ref_cnt == 0) == (block.block_id in free_ids)
            if block.block_hash is not None:
                assert pool.cached_block_hash_to_block[block.block_hash] is block
        for h, block in pool.cached_block_hash_to_block.items():
            assert block.block_hash == h
        assert len(refs) + kv.num_free_blocks == kv.num_usable_blocks
        assert kv.prefix_cache_queries == exp_queries and kv.prefix_cache_hits == exp_hits
    for rid in list(live):
        kv.free(live.pop(rid))
    assert kv.num_free_blocks == kv.num_usable_blocks and kv.usage == 0.0
    assert all(b.ref_cnt == 0 for b in pool.blocks)
