"""Chained content hashes of full KV blocks, the keys of the prefix cache.

The hash of block ``i`` covers its ``block_size`` token ids, the hash of block ``i - 1``
(so equal hashes mean equal *prefixes*, not just equal blocks) and optional extra keys.
The request's ``cache_salt`` is an extra key of block 0 only: through the chain it
changes every later hash too, so tenants with different salts never share a block.
The request's LoRA adapter id is mixed in the same way (KV computed under different
weights is different KV); the base model (id 0) adds nothing, so its keys are unchanged.

SHA-256 over a fixed little-endian encoding (never pickle, never Python's ``hash``): the
32-byte digest is stable across processes and machines (a prefix-aware router can
compute the same keys) and collisions are not a practical concern.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from kvasir.core.request import Request

BlockHash = bytes  # 32-byte SHA-256 digest

_NONE = b"\x00"
_SOME = b"\x01"


def hash_block_tokens(
    parent_block_hash: BlockHash | None,
    block_token_ids: Sequence[int],
    extra_keys: bytes | None = None,
) -> BlockHash:
    """Hash of one full block given its parent's hash (None for block 0)."""
    h = hashlib.sha256()
    # Presence tags and the length prefix keep the encoding unambiguous:
    # (parent, extra, tokens) -> bytes is injective.
    if parent_block_hash is None:
        h.update(_NONE)
    else:
        h.update(_SOME)
        h.update(parent_block_hash)
    if extra_keys is None:
        h.update(_NONE)
    else:
        h.update(_SOME)
        h.update(struct.pack("<I", len(extra_keys)))
        h.update(extra_keys)
    h.update(struct.pack(f"<{len(block_token_ids)}q", *block_token_ids))
    return h.digest()


def _extra_keys(cache_salt: str | None, block_index: int, lora_id: int = 0) -> bytes | None:
    # The salt goes into block 0 only; the chain carries it to every later block.
    if block_index != 0:
        return None
    if lora_id:
        salt = b"" if cache_salt is None else cache_salt.encode("utf-8")
        return b"lora:" + struct.pack("<q", lora_id) + salt
    if cache_salt is not None:
        return cache_salt.encode("utf-8")
    return None


def hash_token_ids(
    token_ids: Sequence[int], block_size: int, cache_salt: str | None = None, lora_id: int = 0
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids`` (the trailing partial block has none)."""
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for i in range(len(token_ids) // block_size):
        parent = hash_block_tokens(
            parent,
            token_ids[i * block_size : (i + 1) * block_size],
            _extra_keys(cache_salt, i, lora_id),
        )
        hashes.append(parent)
    return hashes


def update_block_hashes(request: Request, block_size: int) -> None:
    """Extend ``request.block_hashes`` to cover every full block of ``all_token_ids``.

    Incremental: only blocks that became full since the last call are hashed, so calling
    it after every appended token costs one hash per ``block_size`` tokens.
    """
    hashes = request.block_hashes
    num_full_blocks = request.num_tokens // block_size
    if len(hashes) >= num_full_blocks:
        return
    token_ids = request.all_token_ids
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), num_full_blocks):
        parent = hash_block_tokens(
            parent,
            token_ids[i * block_size : (i + 1) * block_size],
            _extra_keys(request.cache_salt, i, request.lora_id),
        )
        hashes.append(parent)
