"""Per-request block tables over a ``BlockPool``, with prefix caching and forking.

A request's block table holds the KV of its first ``num_computed_tokens`` tokens plus
room for the tokens scheduled in the current step. Only *full* blocks are ever shared
(prefix-cache hits and forks), so a shared block is never written again: no copy on
write is needed.
"""

from __future__ import annotations

from kvasir.core.block_pool import BlockPool, KVCacheBlock
from kvasir.core.hashing import update_block_hashes
from kvasir.core.kv_cache_spec import FullAttentionSpec, KVCacheConfig, MambaStateSpec
from kvasir.core.request import Request

# Spec kinds one block table per request can serve: every layer keeps every token, or
# (state-space layers) keeps nothing per token but one state slot per request.
SUPPORTED_SPEC_KINDS = (FullAttentionSpec.kind, MambaStateSpec.kind)


class StateSlotPool:
    """Fixed-size state slots (``1..num_slots``; 0 is the runner's scratch slot) for the
    state-space layers: a request takes one when its first tokens are allocated and
    gives it back when it finishes or is preempted, so its state memory never grows
    with its length."""

    def __init__(self, num_slots: int) -> None:
        assert num_slots >= 1
        self.num_slots = num_slots
        self._free = list(range(num_slots, 0, -1))  # pop() hands out 1 first
        self.slot_of: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, request_id: str) -> int | None:
        """The request's slot (a new one on first use); None when none is free."""
        slot = self.slot_of.get(request_id)
        if slot is None:
            if not self._free:
                return None
            slot = self.slot_of[request_id] = self._free.pop()
        return slot

    def free(self, request_id: str) -> None:
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates, shares and frees KV blocks for requests.

    ``num_blocks`` includes the reserved null block 0 (see ``block_pool``), so
    ``num_usable_blocks == num_blocks - 1``. Counters ``prefix_cache_queries`` and
    ``prefix_cache_hits`` are cumulative, in tokens.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        max_model_len: int | None = None,
        num_state_slots: int = 0,
    ) -> None:
        """``num_state_slots`` > 0: the model has state-space layers. Each request then
        also holds a state slot; prefix caching and forks are off (a cached block
        cannot give back the recurrent state at its end)."""
        self.state_slots = StateSlotPool(num_state_slots) if num_state_slots else None
        if self.state_slots is not None:
            enable_caching = False
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Per request: how many leading blocks were already offered to the prefix cache.
        self.num_cached_block: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @classmethod
    def from_config(
        cls,
        kv_cache_config: KVCacheConfig,
        enable_caching: bool = True,
        max_model_len: int | None = None,
        max_num_seqs: int = 0,
    ) -> KVCacheManager:
        """A manager over the blocks of ``kv_cache_config``. One block table per request
        serves every layer, so every layer's spec must be of a kind that keeps every
        token (``SUPPORTED_SPEC_KINDS``); any other kind is refused here, by layer."""
        for i, spec in enumerate(kv_cache_config.layer_specs):
            if spec.kind not in SUPPORTED_SPEC_KINDS:
                raise ValueError(
                    f"layer {i}: KV cache spec kind {spec.kind!r} is not supported by the "
                    f"block pool (one block table per request for every layer); "
                    f"supported kinds: {list(SUPPORTED_SPEC_KINDS)}"
                )
        has_state = any(isinstance(s, MambaStateSpec) for s in kv_cache_config.layer_specs)
        if has_state and max_num_seqs < 1:
            raise ValueError("state-space layers need max_num_seqs >= 1 state slots")
        return cls(
            kv_cache_config.num_blocks,
            kv_cache_config.block_size,
            enable_caching,
            max_model_len,
            num_state_slots=max_num_seqs if has_state else 0,
        )

    # ------------------------------------------------------------------ queries

    @property
    def num_usable_blocks(self) -> int:
        return self.block_pool.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests."""
        return self.block_pool.get_usage()

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(
        self, request: Request, record_stats: bool = True
    ) -> tuple[list[KVCacheBlock], int]:
        """Longest run of leading full blocks of ``request`` found in the prefix cache,
        and the number of tokens they hold. Does not take references (pass the blocks to
        ``allocate_slots``).

        At most ``(num_tokens - 1) // block_size`` blocks: the last token is always
        recomputed so the model produces logits for it. Returns ``([], 0)`` when caching
        is off or the request wants prompt logprobs (those need every prompt position).
        ``record_stats=False`` lets a caller that may retry the lookup count it only once
        via ``record_prefix_cache_stats``.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        if request.pooling_params is not None and request.pooling_params.needs_all_positions:
            return [], 0
        update_block_hashes(request, self.block_size)
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_num_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        num_computed_tokens = len(blocks) * self.block_size
        if record_stats:
            self.record_prefix_cache_stats(request.num_tokens, num_computed_tokens)
        return blocks, num_computed_tokens

    def record_prefix_cache_stats(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def get_fork_blocks(self, parent: Request, num_tokens: int) -> list[KVCacheBlock]:
        """The parent's first ``num_tokens // block_size`` blocks (must be full and
        computed), for ``allocate_slots(child, ..., new_computed_blocks=...)``."""
        num_blocks = num_tokens // self.block_size
        parent_blocks = self.req_to_blocks.get(parent.request_id, [])
        assert num_blocks * self.block_size <= parent.num_computed_tokens, (
            "can only fork computed full blocks"
        )
        assert num_blocks <= len(parent_blocks)
        return parent_blocks[:num_blocks]

    # ------------------------------------------------------------------ mutations

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_new_computed_tokens: int = 0,
        delay_cache_blocks: bool = False,
    ) -> list[int] | None:
        """Grow the block table so it holds ``request.num_computed_tokens +
        num_new_computed_tokens + num_new_tokens`` tokens.

        ``new_computed_blocks`` (prefix hits or a parent's blocks, holding
        ``num_new_computed_tokens`` tokens) are shared: they get a reference and are
        appended first. Returns the ids of every block appended by this call (shared ones
        first, then fresh ones), or None -- changing nothing -- if too few blocks are free.

        Full blocks whose KV this step completes are registered in the prefix cache
        unless ``delay_cache_blocks`` (then call ``cache_blocks`` once the KV exists).
        """
        assert num_new_tokens >= 0 and num_new_computed_tokens >= 0
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.get(request.request_id, [])
        assert not (new_computed_blocks and req_blocks), (
            "shared blocks can only start an empty block table"
        )
        assert num_new_computed_tokens == len(new_computed_blocks) * self.block_size
        num_total_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        if self.max_model_len is not None:
            assert num_total_tokens <= self.max_model_len, "allocation beyond max_model_len"
        num_new_blocks = max(
            cdiv(num_total_tokens, self.block_size) - len(req_blocks) - len(new_computed_blocks),
            0,
        )
        # Touching a free cached block takes it out of the free list.
        num_evictable_computed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_evictable_computed:
            return None
        if self.state_slots is not None and self.state_slots.allocate(request.request_id) is None:
            return None

        self.block_pool.touch(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        if request.request_id not in self.req_to_blocks:
            self.req_to_blocks[request.request_id] = req_blocks
        if new_computed_blocks:
            req_blocks.extend(new_computed_blocks)
            # Shared blocks are already cached (or caching is off): skip them later.
            self.num_cached_block[request.request_id] = len(new_computed_blocks)
        req_blocks.extend(new_blocks)
        if not delay_cache_blocks:
            self.cache_blocks(request, min(num_total_tokens, request.num_tokens))
        return [b.block_id for b in new_computed_blocks] + [b.block_id for b in new_blocks]

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's full blocks within its first ``num_computed_tokens``
        tokens in the prefix cache (idempotent, incremental)."""
        if not self.enable_caching:
            return
        req_blocks = self.req_to_blocks.get(request.request_id)
        if not req_blocks:
            return
        update_block_hashes(request, self.block_size)
        num_full_blocks = min(
            num_computed_tokens // self.block_size, len(request.block_hashes), len(req_blocks)
        )
        num_cached_blocks = self.num_cached_block.get(request.request_id, 0)
        if num_full_blocks <= num_cached_blocks:
            return
        self.block_pool.cache_full_blocks(
            req_blocks, request.block_hashes, num_cached_blocks, num_full_blocks
        )
        self.num_cached_block[request.request_id] = num_full_blocks

    def uncache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Drop the prefix-cache entries of the request's blocks past its first
        ``num_computed_tokens // block_size`` (registered for KV that will not be
        computed after all, e.g. a request taken back out of a step)."""
        req_blocks = self.req_to_blocks.get(request.request_id, [])
        first = num_computed_tokens // self.block_size
        for block in req_blocks[first:]:
            # Blocks past the computed prefix are never shared: only this request
            # could have registered them.
            assert block.ref_cnt == 1
            self.block_pool.uncache_block(block)
        if self.num_cached_block.get(request.request_id, 0) > first:
            self.num_cached_block[request.request_id] = first

    def fork(self, parent: Request, child: Request, num_tokens: int) -> list[int]:
        """Share the parent's first ``num_tokens // block_size`` (computed, full) blocks
        with ``child``, whose block table must be empty. Returns the shared block ids.

        Works with prefix caching on or off (no hash lookup involved)."""
        assert not self.req_to_blocks.get(child.request_id), "child already has blocks"
        blocks = self.get_fork_blocks(parent, num_tokens)
        self.block_pool.touch(blocks)
        self.req_to_blocks[child.request_id] = list(blocks)
        self.num_cached_block[child.request_id] = len(blocks)
        return [b.block_id for b in blocks]

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first so its last blocks are evicted first."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_block.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))
        if self.state_slots is not None:
            self.state_slots.free(request.request_id)

    def get_state_slot(self, request_id: str) -> int:
        """The request's state slot (-1: the model has no state-space layers)."""
        if self.state_slots is None:
            return -1
        return self.state_slots.slot_of[request_id]

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
