"""Block hashing and the block pool: hand cases plus a random-operation property test."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvasir.core.block_pool import BlockPool, KVCacheBlock
from kvasir.core.hashing import hash_block_tokens, hash_token_ids, update_block_hashes
from kvasir.core.request import Request
from kvasir.sampling_params import SamplingParams

# ---------------------------------------------------------------- hashing


def test_hash_is_sha256_of_documented_encoding() -> None:
    # Independent re-derivation of the encoding: tag byte, parent, tag byte, tokens int64 LE.
    expected = hashlib.sha256(b"\x00" + b"\x00" + struct.pack("<3q", 1, 2, 3)).digest()
    assert hash_block_tokens(None, [1, 2, 3]) == expected
    child = hash_block_tokens(expected, [4, 5, 6])
    assert (
        child == hashlib.sha256(b"\x01" + expected + b"\x00" + struct.pack("<3q", 4, 5, 6)).digest()
    )
    assert len(child) == 32


def test_hash_chain_depends_on_parent_and_salt() -> None:
    a = hash_token_ids([1, 2, 3, 4, 5, 6, 7, 8], block_size=4)
    b = hash_token_ids([9, 9, 9, 9, 5, 6, 7, 8], block_size=4)
    assert len(a) == 2 and a[0] != b[0]
    assert a[1] != b[1]  # same block tokens, different prefix
    salted = hash_token_ids([1, 2, 3, 4, 5, 6, 7, 8], block_size=4, cache_salt="tenant")
    assert salted[0] != a[0] and salted[1] != a[1]
    assert hash_token_ids([1, 2, 3, 4, 5], 4, cache_salt="") != hash_token_ids([1, 2, 3, 4, 5], 4)
    # Partial trailing block has no hash.
    assert len(hash_token_ids(list(range(11)), 4)) == 2


def test_incremental_block_hashes_match_full_computation() -> None:
    req = Request("r", [3, 1, 4, 1, 5], SamplingParams(), cache_salt="s")
    update_block_hashes(req, 2)
    assert req.block_hashes == hash_token_ids([3, 1, 4, 1], 2, cache_salt="s")
    for tok in [9, 2, 6, 5, 3]:
        req.append_output_token_ids([tok])
        update_block_hashes(req, 2)
    assert req.block_hashes == hash_token_ids(req.all_token_ids, 2, cache_salt="s")
    assert len(req.block_hashes) == 5


# ---------------------------------------------------------------- block pool, by hand


def _h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def test_null_block_reserved_and_counts() -> None:
    pool = BlockPool(5, enable_caching=True)
    assert pool.num_usable_blocks == 4 and pool.get_num_free_blocks() == 4
    blocks = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.get_usage() == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    with pytest.raises(ValueError):
        BlockPool(1, enable_caching=True)


def test_lru_eviction_order_and_reverse_free() -> None:
    pool = BlockPool(7, enable_caching=True)
    a = pool.get_new_blocks(3)  # ids 1, 2, 3
    b = pool.get_new_blocks(3)  # ids 4, 5, 6
    pool.cache_full_blocks(a, [_h(0), _h(1), _h(2)], 0, 3)
    pool.cache_full_blocks(b, [_h(10), _h(11)], 0, 2)  # b's last block stays uncached
    pool.free_blocks(reversed(a))
    pool.free_blocks(reversed(b))
    # Uncached block 6 goes first (head); then a's tail..head, then b's tail..head.
    assert pool.get_free_block_ids() == [6, 3, 2, 1, 5, 4]
    assert pool.get_cached_block(_h(2)) is a[2]
    got = pool.get_new_blocks(2)
    assert [g.block_id for g in got] == [6, 3]
    # Evicting block 3 removed its hash from the map.
    assert pool.get_cached_block(_h(2)) is None and got[1].block_hash is None
    assert pool.get_cached_block(_h(1)) is a[1]


def test_touch_takes_cached_free_block_out_of_free_list() -> None:
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, [_h(0), _h(1), _h(2)], 0, 3)
    pool.free_blocks(reversed(blocks))
    hit = pool.get_cached_block(_h(1))
    assert hit is blocks[1]
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.get_free_block_ids() == [3, 1]
    pool.touch([hit])  # shared by a second request
    assert hit.ref_cnt == 2 and pool.get_num_free_blocks() == 2
    pool.free_blocks([hit])
    assert hit.ref_cnt == 1 and pool.get_num_free_blocks() == 2
    pool.free_blocks([hit])
    assert pool.get_free_block_ids() == [3, 1, 2]  # back at the tail, most recently used
    with pytest.raises(AssertionError):
        pool.free_blocks([hit])  # double free


def test_duplicate_content_keeps_first_block() -> None:
    pool = BlockPool(3, enable_caching=True)
    x, y = pool.get_new_blocks(2)
    pool.cache_full_blocks([x], [_h(5)], 0, 1)
    pool.cache_full_blocks([y], [_h(5)], 0, 1)
    assert pool.get_cached_block(_h(5)) is x and y.block_hash is None


def test_caching_disabled_and_reset() -> None:
    off = BlockPool(3, enable_caching=False)
    blocks = off.get_new_blocks(2)
    off.cache_full_blocks(blocks, [_h(0), _h(1)], 0, 2)
    assert off.get_cached_block(_h(0)) is None and blocks[0].block_hash is None

    on = BlockPool(3, enable_caching=True)
    blocks = on.get_new_blocks(2)
    on.cache_full_blocks(blocks, [_h(0), _h(1)], 0, 2)
    on.free_blocks([blocks[1]])
    assert on.reset_prefix_cache()
    assert on.cached_block_hash_to_block == {}
    assert all(b.block_hash is None for b in on.blocks)
    assert blocks[0].ref_cnt == 1 and on.get_num_free_blocks() == 1


# ---------------------------------------------------------------- property test


def check_pool_invariants(pool: BlockPool, holders: dict[int, list[KVCacheBlock]]) -> None:
    """``holders``: each holder's blocks (a block may appear in several holders)."""
    expected_ref: dict[int, int] = {}
    for blocks in holders.values():
        for b in blocks:
            expected_ref[b.block_id] = expected_ref.get(b.block_id, 0) + 1
    free_ids = pool.get_free_block_ids()
    assert len(free_ids) == len(set(free_ids)) == pool.get_num_free_blocks()
    for block in pool.blocks[1:]:
        assert block.ref_cnt == expected_ref.get(block.block_id, 0) >= 0
        assert (block.ref_cnt == 0) == (block.block_id in set(free_ids))
        if block.block_hash is not None:
            assert pool.cached_block_hash_to_block[block.block_hash] is block
    assert 0 not in free_ids and pool.null_block.ref_cnt == 0
    for h, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == h
    num_in_use = sum(1 for b in pool.blocks[1:] if b.ref_cnt > 0)
    assert num_in_use + pool.get_num_free_blocks() == pool.num_usable_blocks


_ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free", "cache", "hit"]), st.integers(0, 50)),
    max_size=60,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(2, 12), enable_caching=st.booleans(), ops=_ops)
def test_random_pool_operations(num_blocks: int, enable_caching: bool, ops: list) -> None:
    pool = BlockPool(num_blocks, enable_caching)
    holders: dict[int, list[KVCacheBlock]] = {}
    next_holder = 0
    # Reference free list (eviction order): uncached blocks to the front, cached ones
    # to the back, allocation from the front, a hit removes from the middle.
    ref_free = list(range(1, num_blocks))
    for op, arg in ops:
        if op == "alloc":
            n = arg % (pool.num_usable_blocks + 1)
            if n > pool.get_num_free_blocks():
                with pytest.raises(ValueError):
                    pool.get_new_blocks(n)
            else:
                got = pool.get_new_blocks(n)
                assert [b.block_id for b in got] == ref_free[:n]
                del ref_free[:n]
                assert all(b.block_hash is None for b in got)
                holders[next_holder] = got
                next_holder += 1
        elif op == "free" and holders:
            key = sorted(holders)[arg % len(holders)]
            blocks = holders.pop(key)
            pool.free_blocks(reversed(blocks))
            for b in reversed(blocks):
                if b.ref_cnt == 0:
                    if b.block_hash is None:
                        ref_free.insert(0, b.block_id)
                    else:
                        ref_free.append(b.block_id)
        elif op == "cache" and holders:
            key = sorted(holders)[arg % len(holders)]
            blocks = holders[key]
            # Keys repeat across holders (key % 3) to exercise duplicate content.
            hashes = [
                b.block_hash if b.block_hash is not None else _h((key % 3) * 100 + i)
                for i, b in enumerate(blocks)
            ]
            pool.cache_full_blocks(blocks, hashes, 0, len(blocks))
            for b, h in zip(blocks, hashes, strict=True):
                if enable_caching:
                    assert pool.get_cached_block(h) is not None
                    assert b.block_hash in (h, None)
                else:
                    assert b.block_hash is None and pool.get_cached_block(h) is None
        elif op == "hit" and pool.cached_block_hash_to_block:
            hashes = sorted(pool.cached_block_hash_to_block)
            block = pool.get_cached_block(hashes[arg % len(hashes)])
            assert block is not None
            if block.ref_cnt == 0:
                ref_free.remove(block.block_id)
            pool.touch([block])
            holders[next_holder] = [block]
            next_holder += 1
        check_pool_invariants(pool, holders)
        assert pool.get_free_block_ids() == ref_free
    for key in list(holders):
        pool.free_blocks(reversed(holders.pop(key)))
    check_pool_invariants(pool, holders)
    assert pool.get_num_free_blocks() == pool.num_usable_blocks
