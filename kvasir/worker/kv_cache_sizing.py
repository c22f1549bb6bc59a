"""How many KV-cache blocks fit: a fixed size on the CPU, on a GPU what a profiling
forward pass at the largest batch leaves under ``gpu_memory_utilization``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from kvasir.attention.backend import AttentionMetadata

if TYPE_CHECKING:
    from kvasir.worker.model_runner import ModelRunner


def kv_bytes_per_block(runner: ModelRunner) -> int:
    a = runner.arch_config
    elem = torch.tensor([], dtype=runner.dtype).element_size()
    return 2 * a.num_hidden_layers * runner.block_size * a.num_key_value_heads * a.head_dim * elem


def determine_num_blocks(runner: ModelRunner) -> int:
    cc = runner.config.cache_config
    per_block = kv_bytes_per_block(runner)
    if cc.num_gpu_blocks_override is not None:
        return cc.num_gpu_blocks_override
    if cc.kv_cache_gb is not None:
        return max(int(cc.kv_cache_gb * (1 << 30)) // per_block, 1)
    if runner.device.type != "cuda":
        # CPU default: 1 GiB, like vLLM's CPU backend default order of magnitude.
        return max((1 << 30) // per_block, 1)
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
    num_blocks = int(budget // per_block)
    if num_blocks <= 0:
        raise ValueError(
            f"no memory left for the KV cache: the model and a forward pass take "
            f"{peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; raise "
            f"gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return num_blocks


@torch.inference_mode()
def profile_run(runner: ModelRunner) -> None:
    """A forward pass over max_num_batched_tokens tokens (several requests) plus the
    logits of max_num_seqs rows, with a throwaway 1-block-per-request cache."""
    n = runner.max_num_tokens
    num_reqs = min(runner.max_num_reqs, n)
    a = runner.arch_config
    bs = runner.block_size
    shape = runner.attn_backend_cls.get_kv_cache_shape(
        num_reqs * (-(-n // num_reqs) // bs + 1) + 1, bs, a.num_key_value_heads, a.head_dim
    )
    caches = [
        torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        for _ in range(a.num_hidden_layers)
    ]
    lens = [n // num_reqs] * num_reqs
    lens[-1] += n - sum(lens)
    blocks, start = [], 1
    for length in lens:
        nb = -(-length // bs)
        blocks.append(list(range(start, start + nb)))
        start += nb
    meta = _simple_metadata(lens, blocks, bs, runner.device)
    ids = torch.randint(0, a.vocab_size, (n,), device=runner.device)
    pos = torch.cat([torch.arange(length, device=runner.device) for length in lens])
    hidden = runner.model(ids, pos, caches, meta)
    logits = runner.model.compute_logits(hidden[:num_reqs])
    del logits, hidden, caches


def _simple_metadata(
    lens: list[int], blocks: list[list[int]], block_size: int, d: torch.device
) -> AttentionMetadata:
    qsl = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    width = max(len(b) for b in blocks)
    bt = torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.int32)
    slots = torch.cat(
        [
            torch.tensor(b, dtype=torch.int64).repeat_interleave(block_size)[:length] * block_size
            + torch.arange(length) % block_size
            for b, length in zip(blocks, lens, strict=True)
        ]
    )
    return AttentionMetadata(
        num_reqs=len(lens),
        num_actual_tokens=int(sum(lens)),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        query_start_loc=qsl.to(d),
        seq_lens=sl.to(d),
        block_table=bt.to(d),
        slot_mapping=slots.to(d),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=sl,
    )
