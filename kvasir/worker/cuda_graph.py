"""CUDA graphs for decode-only steps, captured at start-up for bucketed batch sizes.

A decode step launches hundreds of small kernels; replaying one captured graph removes
their launch cost. Graphs capture against the runner's persistent buffers, so a replay
only needs those buffers filled in place. Batches are padded up to the next captured
size; padded rows write their K/V into a sink block that the scheduler never hands out.
The runner writes the padding rows into its host buffers with the real ones (one copy
per buffer, no extra kernels); ``run`` pads on the device instead.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from kvasir.attention.backend import AttentionMetadata

if TYPE_CHECKING:
    from kvasir.worker.model_runner import ModelRunner


def capture_sizes(max_num_reqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 (vLLM's buckets), capped at max_num_reqs."""
    sizes = [1, 2, 4] + list(range(8, 257, 8))
    out = [s for s in sizes if s <= max_num_reqs]
    if max_num_reqs not in out and max_num_reqs <= 256:
        out.append(max_num_reqs)
    return sorted(out)


class CUDAGraphRunner:
    def __init__(self, runner: ModelRunner, sink_block_id: int) -> None:
        self.runner = runner
        self.sink_block_id = sink_block_id
        self.sizes = capture_sizes(min(runner.max_num_reqs, runner.max_num_tokens))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [B, vocab] output buffers
        self.pool = None
        self.capture_time = 0.0
        self.arange = torch.arange(self.max_batch_size + 1, dtype=torch.int32, device=runner.device)

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def padded_size(self, num_reqs: int) -> int | None:
        for s in self.sizes:
            if s >= num_reqs:
                return s
        return None

    def _metadata(self, size: int) -> AttentionMetadata:
        r = self.runner
        return AttentionMetadata(
            num_reqs=size,
            num_actual_tokens=size,
            max_query_len=1,
            # An upper bound: kernels size their split-K grid from it, and the graph
            # must be valid for any context up to max_model_len.
            max_seq_len=r.max_model_len,
            query_start_loc=r.query_start_loc[: size + 1],
            seq_lens=r.seq_lens[:size],
            block_table=r.block_table[:size],
            slot_mapping=r.slot_mapping[:size],
            query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32),
            seq_lens_cpu=torch.ones(size, dtype=torch.int32),
        )

    def _fill_padding(self, start: int, size: int) -> None:
        """Rows start..size-1 are padding: one token at position 0 in the sink block."""
        r = self.runner
        if start >= size:
            return
        r.input_ids[start:size].zero_()
        r.positions[start:size].zero_()
        r.slot_mapping[start:size].fill_(self.sink_block_id * r.block_size)
        r.seq_lens[start:size].fill_(1)
        r.block_table[start:size, 0].fill_(self.sink_block_id)
        r.query_start_loc[start + 1 : size + 1].copy_(self.arange[start + 1 : size + 1])

    @torch.inference_mode()
    def capture(self) -> None:
        r = self.runner
        t0 = time.perf_counter()
        self._fill_padding(0, self.max_batch_size)
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # largest first: the pool fits the rest
                meta = self._metadata(size)
                for _ in range(2):  # warm-up: Triton autotune / compilation off-graph
                    h = r.model(r.input_ids[:size], r.positions[:size], r.kv_caches, meta)
                    r.model.compute_logits(h)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    h = r.model(r.input_ids[:size], r.positions[:size], r.kv_caches, meta)
                    self.logits[size] = r.model.compute_logits(h)
                self.graphs[size] = g
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_time = time.perf_counter() - t0

    def replay(self, size: int) -> torch.Tensor:
        """Replay the graph of a captured ``size`` whose inputs (padding rows included,
        see ``_fill_padding``) are already in the runner's buffers; returns the logits
        buffer [size, vocab], valid until the next replay."""
        self.graphs[size].replay()
        return self.logits[size]
