"""CUDA graphs captured at start-up: decode steps by batch size, mixed steps by tokens.

A decode step launches hundreds of small kernels; replaying one captured graph removes
their launch cost. Graphs capture against the runner's persistent buffers, so a replay
only needs those buffers filled in place. ``InputBuffers`` writes padding into its host
twins with the real rows (one copy per buffer, no extra kernels), with the same writer
that lays out each graph's all-padding batch for its capture; padded tokens write their
K/V into a sink block that the scheduler never hands out. The metadata a graph captures
comes from the attention backend's builder (``InputBuffers.graph_metadata``).

- Decode-only steps: batch sizes 1, 2, 4, 8, 16, ... 256, padded up to the next one;
  the graph ends with the logits of every row.
- Mixed steps (prefill chunks beside decode rows) of up to ``cuda_graph_mixed_tokens``
  tokens: token counts 16, 32, 64, ... padded up to the next one, and a fixed number of
  requests (``mixed_graph_num_reqs``): the real ones, one that owns the padding tokens,
  then empty ones. The prefill kernel numbers its query tiles flat across requests, so
  one graph serves every mix of requests within its token count. The graph ends with the
  hidden states; the runner gathers the rows it samples and computes their logits.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from kvasir.worker.input_buffers import GraphSizes

if TYPE_CHECKING:
    from kvasir.worker.model_runner import ModelRunner


def capture_sizes(max_num_reqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 (vLLM's buckets), capped at max_num_reqs."""
    sizes = [1, 2, 4] + list(range(8, 257, 8))
    out = [s for s in sizes if s <= max_num_reqs]
    if max_num_reqs not in out and max_num_reqs <= 256:
        out.append(max_num_reqs)
    return sorted(out)


def mixed_capture_sizes(max_tokens: int, limit: int) -> list[int]:
    """Token counts of the mixed-step graphs: 16, 32, 64, 128, 256, 384, 512, ... (every
    128 past 256) up to ``max_tokens``, capped at ``limit`` (the step's token budget and
    max_model_len, whichever is smaller)."""
    cap = min(max_tokens, limit)
    sizes = [16, 32, 64, 128] + list(range(256, cap + 1, 128))
    out = [s for s in sizes if s <= cap]
    if cap >= 2 and cap not in out:
        out.append(cap)
    return sorted(out)


class CUDAGraphRunner:
    """Captures and replays the runner's CUDA graphs (the module docstring lists them).

    Contract with the runner: ``capture`` runs once, after the KV cache exists and the
    buffers' sink block is set, with an attention backend whose builder supports graphs
    (its forward reads only device tensors and host ints the capture fixes). Each graph
    reads the runner's persistent buffers and KV caches and writes one output buffer
    (``logits[size]`` for decode, ``hidden[num_tokens]`` for mixed). Before a replay the
    buffers must hold the step padded to the graph's size (``InputBuffers.prepare`` does
    so when given ``graph_sizes``); the returned output is valid until the next replay.
    Sizes never captured have no graph: those steps run eagerly.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.sizes = capture_sizes(min(runner.max_num_reqs, runner.max_num_tokens))
        # Capped at max_model_len too: the padding request's tokens must fit one row of
        # the block table.
        self.mixed_sizes = mixed_capture_sizes(
            runner.config.cuda_graph_mixed_tokens, min(runner.max_num_tokens, runner.max_model_len)
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [B, vocab] output buffers
        self.mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # [T, hidden_size] output buffers
        self.num_replays = {"decode": 0, "mixed": 0}  # steps run as graphs (tests, stats)
        self.pool = None
        self.capture_time = 0.0

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    @property
    def graph_sizes(self) -> GraphSizes:
        return GraphSizes(self.sizes, self.mixed_sizes)

    def padded_size(self, num_reqs: int) -> int | None:
        for s in self.sizes:
            if s >= num_reqs:
                return s
        return None

    @torch.inference_mode()
    def capture(self) -> None:
        r = self.runner
        buffers = r.buffers
        t0 = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Largest first (the pool then fits the rest): mixed graphs, then decode.
            # Each graph is captured on its own all-padding batch (copied on ``stream``).
            for tokens in reversed(self.mixed_sizes):
                meta = buffers.prepare_capture(tokens, mixed=True, max_seq_len=r.max_model_len)
                ids, pos = r.input_ids[:tokens], r.positions[:tokens]
                for _ in range(2):  # warm-up: Triton compilation off-graph
                    r.model(ids, pos, r.kv_caches, meta)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    self.hidden[tokens] = r.model(ids, pos, r.kv_caches, meta)
                self.mixed_graphs[tokens] = g
            for size in reversed(self.sizes):
                # max_seq_len: an upper bound, valid for any context up to max_model_len.
                meta = buffers.prepare_capture(size, mixed=False, max_seq_len=r.max_model_len)
                ids, pos = r.input_ids[:size], r.positions[:size]
                for _ in range(2):  # warm-up: Triton autotune / compilation off-graph
                    r.model.compute_logits(r.model(ids, pos, r.kv_caches, meta))
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    h = r.model(ids, pos, r.kv_caches, meta)
                    self.logits[size] = r.model.compute_logits(h)
                self.graphs[size] = g
            if r.spec_decoder is not None:  # the draft model's one-token passes
                r.spec_decoder.proposer.capture_graphs(self.sizes, self.pool, stream)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_time = time.perf_counter() - t0

    def replay(self, size: int) -> torch.Tensor:
        """Replay the graph of a captured ``size`` whose inputs (padding rows included,
        see ``InputBuffers.prepare``) are already in the runner's buffers; returns the
        logits buffer [size, vocab], valid until the next replay."""
        self.graphs[size].replay()
        self.num_replays["decode"] += 1
        return self.logits[size]

    def replay_mixed(self, num_tokens: int) -> torch.Tensor:
        """Replay the mixed-step graph of a captured token count whose inputs (padding
        included) are in the runner's buffers; returns the hidden-states buffer
        [num_tokens, hidden_size], valid until the next replay."""
        self.mixed_graphs[num_tokens].replay()
        self.num_replays["mixed"] += 1
        return self.hidden[num_tokens]
