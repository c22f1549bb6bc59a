"""KV-cache specs: bytes per block against hand-computed values, sizing and allocation
from the specs, and the parts that refuse a spec kind they cannot serve."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from torch import nn

from kvasir.attention.backend import get_backend_cls
from kvasir.config import CacheConfig
from kvasir.core.kv_cache_manager import KVCacheManager
from kvasir.core.kv_cache_spec import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    bytes_per_block,
    num_blocks_in,
)
from kvasir.layers.attention import Attention
from kvasir.worker import kv_cache_sizing


def _spec(block_size: int = 16, num_kv_heads: int = 3, head_dim: int = 64) -> FullAttentionSpec:
    return FullAttentionSpec(
        block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype="bfloat16", element_size=2,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class _WindowSpec(KVCacheSpec):
    """A kind nothing serves yet (a sliding window keeps only its last tokens)."""

    kind: ClassVar[str] = "sliding_window"
    window: int

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (2, self.block_size, 1, 8)


def test_full_attention_bytes_per_block_hand_computed() -> None:
    s = _spec()
    assert s.kind == "full_attention"
    assert s.block_shape == (2, 16, 3, 64)
    # K and V: 2 x 16 positions x 3 heads x 64 dims x 2 bytes (bfloat16)
    assert s.page_size_bytes == 2 * 16 * 3 * 64 * 2 == 12288
    fp8 = FullAttentionSpec(block_size=16, num_kv_heads=3, head_dim=64,
                            dtype="float8_e4m3fn", element_size=1)  # fmt: skip
    assert fp8.page_size_bytes == 6144  # an FP8 cache is just another dtype


def test_cache_config_sums_layers_and_checks_its_fields() -> None:
    cfg = KVCacheConfig(num_blocks=10, layer_specs=(_spec(), _spec(head_dim=128)))
    assert cfg.block_size == 16
    assert cfg.bytes_per_block == 12288 + 24576 == bytes_per_block(cfg.layer_specs)
    assert cfg.total_bytes == 10 * 36864
    with pytest.raises(ValueError, match="block_size"):
        KVCacheConfig(num_blocks=10, layer_specs=(_spec(16), _spec(32)))
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheConfig(num_blocks=1, layer_specs=(_spec(),))
    with pytest.raises(ValueError, match="layer_specs"):
        KVCacheConfig(num_blocks=4, layer_specs=())
    with pytest.raises(ValueError, match="num_kv_heads"):
        _spec(num_kv_heads=0)


def test_num_blocks_from_a_budget() -> None:
    specs = [_spec()] * 30  # 30 layers x 12288 B = 368640 B per block id
    assert num_blocks_in(1 << 30, specs) == (1 << 30) // 368640 == 2912
    assert num_blocks_in(1000, specs) == 1  # never zero


def test_block_pool_and_backend_refuse_unknown_kinds() -> None:
    window = _WindowSpec(block_size=16, dtype="bfloat16", element_size=2, window=128)
    cfg = KVCacheConfig(num_blocks=8, layer_specs=(_spec(), window))
    with pytest.raises(ValueError, match="layer 1: KV cache spec kind 'sliding_window'"):
        KVCacheManager.from_config(cfg)
    manager = KVCacheManager.from_config(KVCacheConfig(num_blocks=8, layer_specs=(_spec(),) * 2))
    assert manager.block_size == 16 and manager.num_usable_blocks == 7
    backend = get_backend_cls("torch")
    with pytest.raises(ValueError, match="'sliding_window'"):
        backend.get_kv_cache_shape(8, window)
    assert backend.get_kv_cache_shape(8, _spec()) == (2, 8, 16, 3, 64)


class _TwoLayers(nn.Module):
    """Attention modules nested as in a model, one of them with a different shape."""

    def __init__(self) -> None:
        super().__init__()
        backend = get_backend_cls("torch")(4, 32, 2, 32**-0.5)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(2, 2), Attention(4, 32, kvh, 32**-0.5, backend))
            for kvh in (2, 1)
        )


def test_specs_come_from_the_attention_modules_in_order() -> None:
    specs = kv_cache_sizing.kv_cache_specs(_TwoLayers(), 8, torch.float32)
    assert specs == [
        FullAttentionSpec(block_size=8, num_kv_heads=2, head_dim=32, dtype="float32",
                          element_size=4),
        FullAttentionSpec(block_size=8, num_kv_heads=1, head_dim=32, dtype="float32",
                          element_size=4),
    ]  # fmt: skip
    # 2 x 8 x 2 x 32 x 4 + 2 x 8 x 1 x 32 x 4
    assert bytes_per_block(specs) == 4096 + 2048


def test_sizing_and_allocation_read_the_specs() -> None:
    specs = kv_cache_sizing.kv_cache_specs(_TwoLayers(), 8, torch.float32)  # 6144 B / block
    runner = SimpleNamespace(
        config=SimpleNamespace(cache_config=CacheConfig(block_size=8, kv_cache_gb=0.001)),
        kv_cache_specs=lambda: specs,
        device=torch.device("cpu"),
    )
    assert kv_cache_sizing.determine_num_blocks(runner) == int(0.001 * (1 << 30)) // 6144 == 174
    runner.config.cache_config = CacheConfig(block_size=8)  # CPU default: 1 GiB
    assert kv_cache_sizing.determine_num_blocks(runner) == (1 << 30) // 6144
    caches = kv_cache_sizing.allocate_kv_caches(specs, 5, get_backend_cls("torch"), runner.device)
    assert [tuple(c.shape) for c in caches] == [(2, 5, 8, 2, 32), (2, 5, 8, 1, 32)]
    assert all(c.dtype == torch.float32 and not c.any() for c in caches)
    assert sum(c.numel() * c.element_size() for c in caches) == 5 * 6144


def test_spec_crosses_processes_as_plain_data() -> None:
    import msgspec

    from kvasir.core.kv_cache_spec import spec_from_dict, spec_to_dict

    spec = FullAttentionSpec(
        block_size=16, dtype="bfloat16", element_size=2, num_kv_heads=3, head_dim=64
    )
    data = msgspec.msgpack.decode(msgspec.msgpack.encode(spec_to_dict(spec)))
    again = spec_from_dict(data)
    assert again == spec and again.page_size_bytes == 2 * 16 * 3 * 64 * 2
    with pytest.raises(ValueError, match="unknown KV cache spec kind 'sliding_window'"):
        spec_from_dict(dict(data, kind="sliding_window"))
