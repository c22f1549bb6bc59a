"""What each layer keeps in the KV cache, per block, and the cache those specs make up.

Every layer with a cache declares a ``KVCacheSpec``: its kind, the shape and dtype of
one block of its cache and so its bytes per block (``page_size_bytes``). Sizing (bytes
per block = the sum over layers), allocation (one tensor per spec, laid out by the
attention backend) and the block pool read the specs, so a new kind of cache (sliding
window, FP8, SSM state) is added by declaring a new spec; a part that cannot serve a
kind refuses it by name at start-up.

Pure Python (no torch): dtypes are names (``"bfloat16"``) with their element size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class KVCacheSpec:
    """One layer's cache, per block of ``block_size`` token positions.

    Invariant: ``page_size_bytes == prod(block_shape) * element_size``; a cache of
    ``num_blocks`` blocks for this layer takes ``num_blocks * page_size_bytes`` bytes.
    """

    kind: ClassVar[str] = "abstract"

    block_size: int  # token positions per block
    dtype: str  # torch dtype name, e.g. "bfloat16"
    element_size: int  # bytes per element of ``dtype``

    def __post_init__(self) -> None:
        _check(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        _check(self.element_size >= 1, "element_size", f"must be >= 1, got {self.element_size}")

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block of this layer's cache."""
        raise NotImplementedError

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one block of this layer's cache."""
        n = 1
        for d in self.block_shape:
            n *= d
        return n * self.element_size


@dataclass(frozen=True, kw_only=True)
class FullAttentionSpec(KVCacheSpec):
    """Causal attention over every earlier token: K and V of ``block_size`` positions
    per block, ``block_shape = (2, block_size, num_kv_heads, head_dim)`` (0 = K, 1 = V).
    ``num_kv_heads`` is the heads this process holds (its share under tensor parallelism).
    """

    kind: ClassVar[str] = "full_attention"

    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_kv_heads >= 1, "num_kv_heads", f"must be >= 1, got {self.num_kv_heads}")
        _check(self.head_dim >= 1, "head_dim", f"must be >= 1, got {self.head_dim}")

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (2, self.block_size, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True, kw_only=True)
class MambaStateSpec(KVCacheSpec):
    """A state-space (Mamba) layer: no per-token cache at all, but one fixed-size *state
    slot* per running request -- its conv state (the last ``d_conv - 1`` inputs of the
    convolution, ``conv_shape``) and its recurrent SSM state (``ssm_shape``, float32) --
    however long the request grows. Blocks of this kind take no bytes
    (``block_shape == (0,)``); ``state_bytes`` is what one request's slot takes."""

    kind: ClassVar[str] = "mamba_state"

    conv_shape: tuple[int, ...]
    ssm_shape: tuple[int, ...]
    ssm_element_size: int = 4  # the recurrent state stays float32

    def __post_init__(self) -> None:
        super().__post_init__()
        # Lists after a trip through a message: back to tuples (the spec is hashable).
        object.__setattr__(self, "conv_shape", tuple(self.conv_shape))
        object.__setattr__(self, "ssm_shape", tuple(self.ssm_shape))
        for name in ("conv_shape", "ssm_shape"):
            shape = getattr(self, name)
            _check(bool(shape) and all(d >= 1 for d in shape), name, f"must be >= 1, got {shape}")

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (0,)

    @property
    def state_bytes(self) -> int:
        conv = ssm = 1
        for d in self.conv_shape:
            conv *= d
        for d in self.ssm_shape:
            ssm *= d
        return conv * self.element_size + ssm * self.ssm_element_size


# Kind -> spec class: how a spec crosses a process boundary (``spec_to_dict`` /
# ``spec_from_dict``); a new kind registers here.
SPEC_TYPES: dict[str, type[KVCacheSpec]] = {
    FullAttentionSpec.kind: FullAttentionSpec,
    MambaStateSpec.kind: MambaStateSpec,
}


def state_bytes_per_request(specs: Sequence[KVCacheSpec]) -> int:
    """Bytes of one request's state slot across every state-space layer (0: none)."""
    return sum(s.state_bytes for s in specs if isinstance(s, MambaStateSpec))


def spec_to_dict(spec: KVCacheSpec) -> dict[str, Any]:
    """A spec as plain data (its kind and fields), for typed messages between processes."""
    return {"kind": spec.kind, **dataclasses.asdict(spec)}


def spec_from_dict(data: dict[str, Any]) -> KVCacheSpec:
    """The spec ``spec_to_dict`` wrote. Raises ValueError for an unknown kind."""
    fields = dict(data)
    kind = fields.pop("kind", None)
    cls = SPEC_TYPES.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown KV cache spec kind {kind!r}; known: {sorted(SPEC_TYPES)}")
    return cls(**fields)


def bytes_per_block(specs: Sequence[KVCacheSpec]) -> int:
    """Bytes one block id takes across every layer (each layer has its own block)."""
    return sum(spec.page_size_bytes for spec in specs)


def num_blocks_in(budget_bytes: int, specs: Sequence[KVCacheSpec]) -> int:
    """How many block ids fit ``budget_bytes`` (at least 1)."""
    return max(int(budget_bytes) // bytes_per_block(specs), 1)


@dataclass(frozen=True)
class KVCacheConfig:
    """The KV cache of one process: ``num_blocks`` block ids (the reserved null block
    0 included, as the scheduler counts them) and one spec per layer, in the order of
    the model's layers (``layer_specs[i]`` describes ``kv_caches[i]``).

    Invariants: at least one layer; every layer has the same ``block_size`` (one block
    id addresses the same token positions in every layer).
    """

    num_blocks: int
    layer_specs: tuple[KVCacheSpec, ...]

    def __post_init__(self) -> None:
        _check(self.num_blocks >= 2, "num_blocks", f"must be >= 2, got {self.num_blocks}")
        _check(len(self.layer_specs) >= 1, "layer_specs", "must hold at least one layer")
        sizes = sorted({s.block_size for s in self.layer_specs})
        _check(len(sizes) == 1, "layer_specs", f"must share one block_size, got {sizes}")

    @property
    def block_size(self) -> int:
        return self.layer_specs[0].block_size

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.layer_specs)

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{name} {msg}")
