"""KV cache blocks, the free list with O(1) LRU eviction, and the prefix-cache map.

Every block is in exactly one of three states:

* in use: ``ref_cnt > 0``, held by one or more requests' block tables (shared after a
  prefix-cache hit or a fork), never in the free list;
* free and cached: ``ref_cnt == 0`` with a ``block_hash``: in the free list *and* the
  cache map, so a later request can still hit it until it is evicted;
* free: ``ref_cnt == 0``, no hash, in the free list.

The free list is ordered by eviction priority (head = evicted first). Freed cached
blocks go to the tail (LRU); freed blocks without a hash go to the head, since evicting
them loses nothing. Block 0 is the *null block*: never handed out, so the model runner
may point padding slots (e.g. CUDA-graph padding) at it. Usable blocks = num_blocks - 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from kvasir.core.hashing import BlockHash


class KVCacheBlock:
    """One block of ``block_size`` KV slots. ``prev_free``/``next_free`` link the free list."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free", "is_null")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None
        self.is_null = False

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={h})"


class FreeKVCacheBlockQueue:
    """Doubly linked list of free blocks between two sentinels: O(1) popleft, append,
    appendleft and remove-from-the-middle (a cached free block hit by a new request)."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels: no None checks on the hot path
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        assert block is not None
        if block is self._tail:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free list"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        self._insert_after(block, self._tail.prev_free)

    def appendleft(self, block: KVCacheBlock) -> None:
        self._insert_after(block, self._head)

    def _insert_after(self, block: KVCacheBlock, prev: KVCacheBlock | None) -> None:
        assert prev is not None
        assert block.prev_free is None and block.next_free is None, f"{block} already free"
        nxt = prev.next_free
        assert nxt is not None
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Blocks in eviction order (head first). For tests and debugging."""
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    """All KV blocks of one cache, the free list and the prefix-cache map.

    Invariants (checked by the tests): ``num_free + num_in_use == num_usable_blocks``;
    ``cached_block_hash_to_block[h].block_hash == h`` and every block with a hash is in
    the map; a block is in the free list iff ``ref_cnt == 0``; ``ref_cnt >= 0``.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.is_null = True
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks[1:])
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def get_num_free_blocks(self) -> int:
        """Free blocks, cached ones included (they can be evicted on demand)."""
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of usable blocks held by requests (0.0 .. 1.0)."""
        return 1.0 - self.get_num_free_blocks() / self.num_usable_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the head of the free list (ref_cnt 1 each),
        evicting their cached contents. Raises ValueError if there are not enough."""
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(
                f"cannot get {num_blocks} blocks: only {self.get_num_free_blocks()} free"
            )
        blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            assert block.ref_cnt == 0
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def uncache_block(self, block: KVCacheBlock) -> None:
        """Forget the block's content (its KV is not what its hash says)."""
        self._evict(block)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            cached = self.cached_block_hash_to_block.pop(block.block_hash)
            assert cached is block
            block.block_hash = None

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks a request now shares (prefix hit or fork); a free
        cached block leaves the free list so it cannot be evicted."""
        for block in blocks:
            assert not block.is_null
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference per block; blocks reaching 0 join the free list in the given
        order (pass a request's blocks reversed so its tail is evicted first)."""
        for block in ordered_blocks:
            assert not block.is_null
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_block_queue.appendleft(block)
                else:
                    self.free_block_queue.append(block)

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[BlockHash],
        num_cached_blocks: int,
        num_full_blocks: int,
    ) -> None:
        """Register ``blocks[num_cached_blocks:num_full_blocks]`` (full, KV computed or
        being computed) under ``block_hashes[i]``.

        A block that already has a hash (a prefix hit or forked block) is left as is. If
        another block already holds the same content, the new one stays unregistered:
        one block per hash keeps the map a plain dict.
        """
        if not self.enable_caching:
            return
        assert num_full_blocks <= len(blocks) and num_full_blocks <= len(block_hashes)
        for i in range(num_cached_blocks, num_full_blocks):
            block, block_hash = blocks[i], block_hashes[i]
            if block.block_hash is not None:
                assert block.block_hash == block_hash, f"{block} hash mismatch at index {i}"
                continue
            if block_hash in self.cached_block_hash_to_block:
                continue
            block.block_hash = block_hash
            self.cached_block_hash_to_block[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (free and in-use blocks alike). Always succeeds;
        blocks in use keep their KV and simply are no longer findable."""
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True

    def get_free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (head first). For tests and debugging: O(n)."""
        return [block.block_id for block in self.free_block_queue]
