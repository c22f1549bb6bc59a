"""The KV cache from the layers' specs: what each layer declares, how many blocks fit (a
fixed size on the CPU; on a GPU what a profiling forward pass at the largest batch
leaves under ``gpu_memory_utilization``) and the allocation, one tensor per spec."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvasir.attention.backend import AttentionBackend
from kvasir.core.kv_cache_spec import (
    KVCacheSpec,
    MambaStateSpec,
    bytes_per_block,
    num_blocks_in,
    state_bytes_per_request,
)
from kvasir.distributed.parallel_state import IntermediateTensors
from kvasir.layers.attention import Attention
from kvasir.layers.mamba import StateSpaceLayer

if TYPE_CHECKING:
    from kvasir.worker.model_runner import ModelRunner


def kv_cache_specs(
    model: torch.nn.Module, block_size: int, dtype: torch.dtype
) -> list[KVCacheSpec]:
    """One spec per ``Attention`` module of ``model``, in module order: the order of the
    model's own (local) layers, which is the order of its ``kv_caches`` argument."""
    return [
        m.kv_cache_spec(block_size, dtype)
        for m in model.modules()
        if isinstance(m, (Attention, StateSpaceLayer))
    ]


def has_state_layers(model: torch.nn.Module) -> bool:
    return any(isinstance(m, StateSpaceLayer) for m in model.modules())


def copy_state(model: torch.nn.Module, src: int, dst: int) -> None:
    """Every state-space layer's state slot ``src`` into slot ``dst``."""
    for m in model.modules():
        if isinstance(m, StateSpaceLayer):
            m.conv_state[dst].copy_(m.conv_state[src])
            m.ssm_state[dst].copy_(m.ssm_state[src])


def allocate_state_caches(model: torch.nn.Module, num_slots: int, device: torch.device) -> int:
    """Give every state-space layer of ``model`` its ``num_slots`` state slots (slot 0
    is scratch for padding and profiling); returns the bytes allocated."""
    total = 0
    for m in model.modules():
        if isinstance(m, StateSpaceLayer):
            total += m.allocate_state(num_slots, device)
    return total


def allocate_kv_caches(
    specs: Sequence[KVCacheSpec],
    num_blocks: int,
    backend_cls: type[AttentionBackend],
    device: torch.device,
) -> list[torch.Tensor]:
    """One zeroed cache of ``num_blocks`` blocks per spec, laid out by the backend.
    Zeroed: stale NaNs in never-written slots would poison masked-out products."""
    caches = []
    for spec in specs:
        if isinstance(spec, MambaStateSpec):
            continue  # per-request state slots live in their layers (allocate_state_caches)
        dtype = getattr(torch, spec.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"KV cache spec dtype {spec.dtype!r} is not a torch dtype")
        shape = backend_cls.get_kv_cache_shape(num_blocks, spec)
        cache = torch.zeros(shape, dtype=dtype, device=device)
        assert cache.numel() * cache.element_size() == num_blocks * spec.page_size_bytes
        caches.append(cache)
    return caches


def determine_num_blocks(runner: ModelRunner) -> int:
    """Block ids for the KV cache (the null block 0 included, as the scheduler counts
    them; the runner allocates one sink block more)."""
    cc = runner.config.cache_config
    if cc.num_gpu_blocks_override is not None:
        return cc.num_gpu_blocks_override
    specs = runner.kv_cache_specs()
    if bytes_per_block(specs) == 0:
        # State-space layers only: blocks cost nothing; enough for every request at
        # max_model_len (the state slots, not blocks, bound the memory).
        return runner.max_num_reqs * runner.max_num_blocks_per_req + 1
    if cc.kv_cache_gb is not None:
        return num_blocks_in(int(cc.kv_cache_gb * (1 << 30)), specs)
    if runner.device.type != "cuda":
        # CPU default: 1 GiB, like vLLM's CPU backend default order of magnitude.
        return num_blocks_in(1 << 30, specs)
    # GPU: measure peak memory of a profiling forward pass at the largest batch,
    # then give the KV cache what is left under gpu_memory_utilization.
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    profile_run(runner)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    free, total = torch.cuda.mem_get_info()
    used_by_others = total - free - torch.cuda.memory_reserved()
    budget = total * cc.gpu_memory_utilization - peak - max(used_by_others, 0)
    budget -= (runner.max_num_reqs + 1) * state_bytes_per_request(specs)  # state slots
    num_blocks = int(budget // bytes_per_block(specs))
    if num_blocks <= 0:
        raise ValueError(
            f"no memory left for the KV cache: the model and a forward pass take "
            f"{peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; raise "
            f"gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return num_blocks


@torch.inference_mode()
def profile_run(runner: ModelRunner) -> None:
    """A forward pass over the largest step (max_num_batched_tokens tokens, as fresh
    prompts of several requests, none longer than max_model_len) plus the logits of
    max_num_seqs rows, with a throwaway cache. Its batch goes through the runner's
    input buffers and metadata builder, as a real step's does."""
    bs = runner.block_size
    # No step holds more than max_num_seqs requests of max_model_len tokens.
    n = min(runner.max_num_tokens, runner.max_num_reqs * runner.max_model_len)
    num_reqs = min(runner.max_num_reqs, n)
    lens = np.full(num_reqs, n // num_reqs, dtype=np.int64)
    lens[: n % num_reqs] += 1  # at most ceil(n / num_reqs) <= max_model_len each
    num_blocks = -(-lens // bs)
    # Blocks 1.. in request order (block 0 is the null block, as in the real cache).
    table = np.zeros((num_reqs, int(num_blocks.max())), dtype=np.int64)
    first = 1 + np.concatenate([[0], np.cumsum(num_blocks)[:-1]])
    for i in range(num_reqs):
        table[i, : num_blocks[i]] = np.arange(first[i], first[i] + num_blocks[i])
    # The target model's layers only (a draft proposer's caches follow them).
    specs = kv_cache_specs(runner.model, bs, runner.dtype)
    num_cache_blocks = int(num_blocks.sum()) + 1
    caches = allocate_kv_caches(specs, num_cache_blocks, runner.attn_backend_cls, runner.device)
    ids = np.random.default_rng(0).integers(0, runner.arch_config.vocab_size, n)
    meta = runner.buffers.prepare_prompts(ids, lens, table)
    par = runner.parallel
    intermediate = None
    if not par.is_first_stage:  # a later pipeline stage: its input has this shape
        h = torch.zeros(n, runner.arch_config.hidden_size, dtype=runner.dtype, device=runner.device)
        intermediate = IntermediateTensors(h, h.clone())
    hidden = runner.model(runner.input_ids[:n], runner.positions[:n], caches, meta, intermediate)
    if par.is_last_stage:
        logits = runner.model.compute_logits(hidden[:num_reqs])
        del logits
    del hidden, caches
