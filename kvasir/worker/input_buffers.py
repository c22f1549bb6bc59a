"""One step's flat batch, built with numpy over the persistent batch rows.

``InputBuffers`` owns the device tensors the model reads every step (CUDA graphs
capture against them) and a pinned host twin of each (numpy views). A step writes its
flat batch (token ids, positions, slot mapping, query_start_loc, seq_lens, block-table
rows) into the twins and copies them over without waiting; tokens that the previous
step sampled and that never came to the host are then copied into ``input_ids`` on
the device. CUDA-graph padding rows are written with the real ones, so a replay needs
no extra kernels; one writer (``_write_padding``) lays padding out for the steps that
replay a graph and for the graph's capture alike. The step's ``AttentionMetadata`` comes
from ``metadata_builder`` (the attention backend's) over these buffers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from kvasir.attention.backend import AttentionMetadata, AttentionMetadataBuilder
from kvasir.worker.input_batch import InputBatch
from kvasir.worker.request_state import CachedRequestState


class StepInputs(NamedTuple):
    """One step's batch in batch order (row order of the ``InputBatch``)."""

    rows: np.ndarray  # [n] batch row of each request
    states: list[CachedRequestState]  # [n]
    req_ids: list[str]  # [n]
    dense: bool  # every row of the batch runs, in row order
    num_tokens: int  # tokens in the flat batch (unpadded)
    num_scheduled: np.ndarray  # [n]
    num_computed: np.ndarray  # [n] before this step
    seq_lens: np.ndarray  # [n] after this step
    query_start_loc: np.ndarray  # [n + 1]
    graph_size: int | None  # decode CUDA graph: padded batch size
    mixed_graph_tokens: int | None  # mixed-step CUDA graph: padded token count
    attn_metadata: AttentionMetadata


class GraphSizes(NamedTuple):
    """The captured CUDA graphs: decode batch sizes and mixed-step token counts."""

    decode: list[int]  # ascending
    mixed: list[int]  # ascending


def _bucket(sizes: list[int], n: int) -> int | None:
    """The smallest captured size >= n (None: larger than all of them)."""
    return next((s for s in sizes if s >= n), None)


def mixed_graph_num_reqs(num_tokens: int, max_num_reqs: int) -> int:
    """Requests in the mixed-step graph of ``num_tokens`` tokens: a mixed step has a
    request of >= 2 tokens, so at most ``num_tokens - 1`` requests (and never more than
    ``max_num_reqs``), plus one that owns the padding tokens."""
    return min(num_tokens - 1, max_num_reqs) + 1


class InputBuffers:
    """Persistent device buffers of the model's inputs and their pinned host twins.

    A twin is rewritten only after the previous step's copies out of it ran
    (``wait_for_copies``); the same holds for the ``InputBatch`` block table, which
    is copied straight from when every row runs. After a ``prepare*`` call the twins
    and (once the queued copies ran) the device buffers hold the same batch, padding
    included. ``metadata_builder`` is the common builder until the runner installs its
    attention backend's.
    """

    def __init__(
        self,
        max_num_tokens: int,
        max_num_reqs: int,
        max_num_blocks_per_req: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.device = device
        self.block_size = block_size
        self.sink_block_id = 0  # set once the KV cache exists (CUDA-graph padding)
        d, pin = device, device.type == "cuda"
        self.non_blocking = pin
        self.max_num_reqs = max_num_reqs
        # One request more than the scheduler runs: a mixed-step CUDA graph's padding
        # request (mixed_graph_num_reqs).
        t, r, b = max_num_tokens, max_num_reqs + 1, max_num_blocks_per_req

        def both(n: int | tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
            return (
                torch.zeros(n, dtype=dtype, device=d),
                torch.zeros(n, dtype=dtype, pin_memory=pin),
            )

        self.input_ids, self.input_ids_cpu = both(t, torch.int64)
        self.positions, self.positions_cpu = both(t, torch.int64)
        self.slot_mapping, self.slot_mapping_cpu = both(t, torch.int64)
        self.query_start_loc, self.query_start_loc_cpu = both(r + 1, torch.int32)
        self.seq_lens, self.seq_lens_cpu = both(r, torch.int32)
        # Device block table; its host source is the InputBatch's (every row runs) or
        # this staging copy of the running rows in batch order.
        self.block_table, self.block_table_staging_cpu = both((r, b), torch.int32)
        # State-space layers' slot and continue flag per request (filled only once the
        # runner sets has_state_slots, for a model with such layers).
        self.has_state_slots = False
        self.state_slots, self.state_slots_cpu = both(r, torch.int32)
        self.state_init, self.state_init_cpu = both(r, torch.int32)
        # Where last step's sampled tokens go in input_ids: [dst..., src...].
        self.scatter_index, self.scatter_cpu = both(2 * r, torch.int64)
        self._copy_event = torch.cuda.Event() if pin else None
        # numpy views of the twins, for the host-side batch build
        self.input_ids_np = self.input_ids_cpu.numpy()
        self.positions_np = self.positions_cpu.numpy()
        self.slot_mapping_np = self.slot_mapping_cpu.numpy()
        self.query_start_loc_np = self.query_start_loc_cpu.numpy()
        self.seq_lens_np = self.seq_lens_cpu.numpy()
        self.state_slots_np = self.state_slots_cpu.numpy()
        self.state_init_np = self.state_init_cpu.numpy()
        self.metadata_builder: AttentionMetadataBuilder = AttentionMetadataBuilder(self)

    def graph_metadata(self, num_tokens: int, mixed: bool, max_seq_len: int) -> AttentionMetadata:
        """The metadata a CUDA graph captures, over the buffers at the graph's padded
        sizes (``prepare`` pads replayed steps so): a decode graph of ``num_tokens``
        one-token requests, or a mixed graph of ``num_tokens`` tokens in
        ``mixed_graph_num_reqs`` requests. The host ints are upper bounds (the kernels'
        grids follow from the token and request counts alone)."""
        if mixed:
            num_reqs = mixed_graph_num_reqs(num_tokens, self.max_num_reqs)
            return self.metadata_builder.build_for_capture(
                num_reqs, num_tokens, num_tokens, max_seq_len
            )
        return self.metadata_builder.build_for_capture(num_tokens, num_tokens, 1, max_seq_len)

    def prepare_capture(self, num_tokens: int, mixed: bool, max_seq_len: int) -> AttentionMetadata:
        """Fill the buffers with a graph's batch made of padding alone (the layout a
        replayed step is padded to) and return the metadata the graph captures."""
        self.wait_for_copies()
        num_reqs = mixed_graph_num_reqs(num_tokens, self.max_num_reqs) if mixed else num_tokens
        self.query_start_loc_np[0] = 0
        staging = self.block_table_staging_cpu
        bt_rows = self._write_padding(0, 0, num_reqs, num_tokens, mixed, staging.numpy())
        self._copy_to_device(num_tokens, num_reqs, staging, bt_rows)
        self._record_copies()
        return self.graph_metadata(num_tokens, mixed, max_seq_len)

    def prepare_prompts(
        self, token_ids: np.ndarray, query_lens: np.ndarray, block_table: np.ndarray
    ) -> AttentionMetadata:
        """Fresh prompts, nothing cached (the profiling run): request ``i``'s
        ``query_lens[i]`` tokens at positions 0.., its blocks in row ``i`` of
        ``block_table`` [n, blocks]; ``token_ids`` [sum(query_lens)]. Eager: no padding.
        """
        self.wait_for_copies()
        n, bs = len(query_lens), self.block_size
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(query_lens, out=cu[1:])
        total = int(cu[-1])
        tok_rows = np.repeat(np.arange(n), query_lens)
        positions = np.arange(total) - np.repeat(cu[:-1], query_lens)
        self.input_ids_np[:total] = token_ids
        self.positions_np[:total] = positions
        slots = block_table[tok_rows, positions // bs] * bs + positions % bs
        self.slot_mapping_np[:total] = slots
        self.query_start_loc_np[: n + 1] = cu
        self.seq_lens_np[:n] = query_lens
        if self.has_state_slots:  # fresh prompts on the scratch slot: nothing kept
            self.state_slots_np[:n] = 0
            self.state_init_np[:n] = 0
        staging = self.block_table_staging_cpu
        staging.numpy()[:n, : block_table.shape[1]] = block_table
        self._copy_to_device(total, n, staging, n)
        self._record_copies()
        max_len = int(query_lens.max())
        return self.metadata_builder.build(n, total, max_len, max_len)

    def wait_for_copies(self) -> None:
        """Block until the last step's host->device copies have read their sources
        (normally long done: they run right after the step before it)."""
        if self._copy_event is not None:
            self._copy_event.synchronize()

    def prepare(
        self,
        ib: InputBatch,
        rows: np.ndarray,
        num_sched: np.ndarray,
        states: list[CachedRequestState],
        req_ids: list[str],
        dense: bool,
        graph_sizes: GraphSizes | None,
        prev_sampled: torch.Tensor | None,
        num_computed: np.ndarray | None = None,
    ) -> StepInputs:
        """Build and launch the copies of the batch ``rows`` (ascending) advancing by
        ``num_sched`` tokens. ``graph_sizes``: the captured CUDA graphs (None: eager).
        ``num_computed``: where each row's query starts (default: its computed tokens;
        a draft model's passes start where its own KV ends)."""
        n = len(rows)
        if num_computed is None:
            num_computed = ib.num_computed_tokens[rows]
        seq_lens = num_computed + num_sched
        max_query_len = int(num_sched.max())
        cu = np.zeros(n + 1, dtype=np.int64)
        if max_query_len == 1:
            cu[1:] = np.arange(1, n + 1)
            total, tok_rows, positions = n, rows, num_computed
        else:
            np.cumsum(num_sched, out=cu[1:])
            total = int(cu[-1])
            tok_rows = np.repeat(rows, num_sched)
            positions = np.arange(total) + np.repeat(num_computed - cu[:-1], num_sched)
        graph_size = mixed_tokens = None
        if graph_sizes is not None:
            if max_query_len == 1:
                graph_size = _bucket(graph_sizes.decode, n)
            else:
                mixed_tokens = _bucket(graph_sizes.mixed, total)
        # Decode graphs: one token per request, padding rows included. Mixed graphs:
        # ``mixed_tokens`` tokens and ``mixed_graph_num_reqs`` requests (see below).
        if mixed_tokens is not None:
            padded = mixed_graph_num_reqs(mixed_tokens, self.max_num_reqs)
            padded_tokens = mixed_tokens
        else:
            padded = graph_size or n
            padded_tokens = graph_size or total

        bs = self.block_size
        # Known tokens; a token still on the device is put in place below.
        self.input_ids_np[:total] = ib.token_ids[tok_rows, positions]
        self.positions_np[:total] = positions
        block_ids = ib.block_table[tok_rows, positions // bs]
        self.slot_mapping_np[:total] = block_ids * bs + positions % bs
        self.query_start_loc_np[: n + 1] = cu
        self.seq_lens_np[:n] = seq_lens
        if self.has_state_slots:
            self.state_slots_np[:n] = [st.state_slot for st in states]
            self.state_init_np[:n] = seq_lens > num_sched
        if dense:
            bt_src = ib.block_table_cpu
            bt_np = ib.block_table  # rows >= n are free
        else:
            bt_src = self.block_table_staging_cpu
            bt_np = bt_src.numpy()
            bt_np[:n] = ib.block_table[rows]
        is_mixed = mixed_tokens is not None
        bt_rows = self._write_padding(n, total, padded, padded_tokens, is_mixed, bt_np)
        self._copy_to_device(padded_tokens, padded, bt_src, bt_rows)
        self._scatter_pending(ib, rows, cu, num_computed, max_query_len, prev_sampled)
        self._record_copies()

        meta = self.metadata_builder.build(n, total, max_query_len, int(seq_lens.max()))
        return StepInputs(
            rows=rows,
            states=states,
            req_ids=req_ids,
            dense=dense,
            num_tokens=total,
            num_scheduled=num_sched,
            num_computed=num_computed,
            seq_lens=seq_lens,
            query_start_loc=cu,
            graph_size=graph_size,
            mixed_graph_tokens=mixed_tokens,
            attn_metadata=meta,
        )

    def _write_padding(
        self, n: int, total: int, num_reqs: int, num_tokens: int, mixed: bool, bt_np: np.ndarray
    ) -> int:
        """Pad the host twins' batch of ``n`` requests / ``total`` tokens (already
        written) to a CUDA graph's ``num_reqs`` requests / ``num_tokens`` tokens; returns
        how many block-table rows the device needs. No-op when nothing is padded.

        Decode graphs: each padding row is one token at position 0 in the sink block.
        Mixed graphs: request ``n`` owns the padding tokens (all at position 0, written
        to the sink block; its keys are read from the sink block); the requests after it
        have no tokens and are skipped by the kernels, so their block-table rows are
        never read."""
        if num_reqs == n and num_tokens == total:
            return n
        if self.has_state_slots:  # padding requests use the scratch slot 0, from zeros
            self.state_slots_np[n:num_reqs] = 0
            self.state_init_np[n:num_reqs] = 0
        bs, sink = self.block_size, self.sink_block_id
        qsl_np, sl_np = self.query_start_loc_np, self.seq_lens_np
        self.input_ids_np[total:num_tokens] = 0
        self.positions_np[total:num_tokens] = 0
        self.slot_mapping_np[total:num_tokens] = sink * bs
        if mixed:
            pad = num_tokens - total
            qsl_np[n + 1 : num_reqs + 1] = num_tokens
            sl_np[n] = pad
            sl_np[n + 1 : num_reqs] = 0
            bt_np[n, : -(-pad // bs)] = sink
            return n + 1
        qsl_np[n + 1 : num_reqs + 1] = np.arange(n + 1, num_reqs + 1)
        sl_np[n:num_reqs] = 1
        bt_np[n:num_reqs, 0] = sink
        return num_reqs

    def _copy_to_device(
        self, num_tokens: int, num_reqs: int, bt_src: torch.Tensor, bt_rows: int
    ) -> None:
        """Queue the copies of the twins' first ``num_tokens`` tokens, ``num_reqs``
        requests and ``bt_rows`` rows of ``bt_src`` (the block table's host source)."""
        nb = self.non_blocking
        t, r = num_tokens, num_reqs
        self.input_ids[:t].copy_(self.input_ids_cpu[:t], non_blocking=nb)
        self.positions[:t].copy_(self.positions_cpu[:t], non_blocking=nb)
        self.slot_mapping[:t].copy_(self.slot_mapping_cpu[:t], non_blocking=nb)
        self.query_start_loc[: r + 1].copy_(self.query_start_loc_cpu[: r + 1], non_blocking=nb)
        self.seq_lens[:r].copy_(self.seq_lens_cpu[:r], non_blocking=nb)
        if self.has_state_slots:
            self.state_slots[:r].copy_(self.state_slots_cpu[:r], non_blocking=nb)
            self.state_init[:r].copy_(self.state_init_cpu[:r], non_blocking=nb)
        self.block_table[:bt_rows].copy_(bt_src[:bt_rows], non_blocking=nb)

    def _record_copies(self) -> None:
        """Mark the queued copies (``wait_for_copies`` waits for them)."""
        if self._copy_event is not None:
            self._copy_event.record()

    def _scatter_pending(
        self,
        ib: InputBatch,
        rows: np.ndarray,
        cu: np.ndarray,
        num_computed: np.ndarray,
        max_query_len: int,
        prev_sampled: torch.Tensor | None,
    ) -> None:
        """Rows whose next input token was sampled by the last step and never came to
        the host: copy it on the device from that step's sampled ids into input_ids."""
        known = ib.num_known_tokens[rows]
        pending = np.nonzero(ib.num_tokens[rows] > known)[0]
        if not len(pending):
            return
        assert prev_sampled is not None
        # A row that sampled last step computed all its known tokens, so its query
        # starts exactly at the pending token.
        assert (known[pending] == num_computed[pending]).all()
        src = ib.prev_sample_index[rows[pending]]
        m = len(pending)
        if max_query_len == 1 and m == len(rows) == len(prev_sampled) and (src == pending).all():
            self.input_ids[:m].copy_(prev_sampled)  # steady decode: same rows, same order
            return
        stage = self.scatter_cpu.numpy()
        stage[:m] = cu[pending]
        stage[m : 2 * m] = src
        self.scatter_index[: 2 * m].copy_(self.scatter_cpu[: 2 * m], non_blocking=self.non_blocking)
        dst, src_t = self.scatter_index[:m], self.scatter_index[m : 2 * m]
        self.input_ids.index_copy_(0, dst, prev_sampled.index_select(0, src_t))
