"""The model runner: turns a SchedulerOutput into one forward pass and one sample.

It keeps each request's state in a row of the persistent ``InputBatch`` and receives
only diffs from the scheduler. Every step it builds a flat varlen batch (in row order)
plus explicit AttentionMetadata (no module-level state) with numpy over those rows,
copies it from pinned host buffers into persistent device buffers without waiting,
runs the model (a CUDA graph for decode batches), gathers the logits of the tokens that
sample, and samples. Nothing waits for the device: the sampled ids come back through an
``AsyncModelRunnerOutput`` that the caller reads when it needs them.

Async scheduling: when the caller launches step N + 1 before reading step N back, a
request that sampled in step N decodes in step N + 1 from a token the host has not
seen; the runner copies it on the device from step N's sampled-token tensor into
``input_ids`` (``InputBatch.prev_sample_index`` says where it is).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from kvasir.attention.backend import AttentionMetadata, get_backend_cls
from kvasir.config import EngineConfig, ModelArchConfig
from kvasir.core.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from kvasir.layers.sampler import (
    LogprobsTensors,
    Sampler,
    SamplingMetadata,
    compute_token_logprobs,
)
from kvasir.worker.async_output import AsyncModelRunnerOutput, logprobs_to_lists
from kvasir.worker.cuda_graph import CUDAGraphRunner
from kvasir.worker.input_batch import InputBatch, to_device
from kvasir.worker.request_state import CachedRequestState

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, arch_config: ModelArchConfig) -> None:
        from kvasir.models.loader import load_model

        self.config = config
        self.arch_config = arch_config
        self.device = resolve_device(config.device_config.device)
        self.dtype = resolve_dtype(config.model_config.dtype, self.device)
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend == "triton" and self.device.type != "cuda":
            raise ValueError("attention_backend 'triton' needs a CUDA GPU; use 'torch' on CPU")
        self.attn_backend_name = backend
        self.attn_backend_cls = get_backend_cls(backend)
        self.block_size = config.cache_config.block_size
        sched = config.scheduler_config
        assert sched.max_model_len is not None
        self.max_model_len = sched.max_model_len
        self.max_num_tokens = sched.max_num_batched_tokens
        self.max_num_reqs = sched.max_num_seqs
        self.max_num_blocks_per_req = -(-self.max_model_len // self.block_size)

        torch.manual_seed(config.model_config.seed)
        t0 = time.perf_counter()
        self.model = load_model(
            config.model_config, arch_config, self.attn_backend_cls, self.dtype, self.device
        )
        self.load_time = time.perf_counter() - t0
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.requests: dict[str, CachedRequestState] = {}
        self.cuda_graph: CUDAGraphRunner | None = None

        # Persistent device buffers, updated in place every step (CUDA graphs capture
        # against them), each filled from a pinned host twin (numpy views) by an
        # asynchronous copy.
        d = self.device
        pin = d.type == "cuda"
        num_tokens, num_reqs = self.max_num_tokens, self.max_num_reqs
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=d)
        self.positions = torch.zeros(num_tokens, dtype=torch.int64, device=d)
        self.slot_mapping = torch.zeros(num_tokens, dtype=torch.int64, device=d)
        self.query_start_loc = torch.zeros(num_reqs + 1, dtype=torch.int32, device=d)
        self.seq_lens = torch.zeros(num_reqs, dtype=torch.int32, device=d)
        self.block_table = torch.zeros(
            (num_reqs, self.max_num_blocks_per_req), dtype=torch.int32, device=d
        )

        def host(n: int | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, pin_memory=pin)

        self.input_ids_cpu = host(num_tokens, torch.int64)
        self.positions_cpu = host(num_tokens, torch.int64)
        self.slot_mapping_cpu = host(num_tokens, torch.int64)
        self.query_start_loc_cpu = host(num_reqs + 1, torch.int32)
        self.seq_lens_cpu = host(num_reqs, torch.int32)
        # Block-table rows gathered in batch order when not every row runs.
        self.block_table_staging_cpu = host((num_reqs, self.max_num_blocks_per_req), torch.int32)
        # Where last step's sampled tokens go in input_ids: [dst..., src...].
        self.scatter_cpu = host(2 * num_reqs, torch.int64)
        self.scatter_index = torch.zeros(2 * num_reqs, dtype=torch.int64, device=d)
        self.input_batch = InputBatch(
            num_reqs, self.max_model_len, self.max_num_blocks_per_req, arch_config.vocab_size, pin
        )
        self._empty = torch.empty(0, dtype=torch.float32, device=d)
        # Recorded after each step's host->device copies: the pinned sources (and the
        # batch's block table) are rewritten only once they have been read.
        self._copy_event = torch.cuda.Event() if pin else None
        self._prev_sampled: torch.Tensor | None = None  # [S] last step's sampled ids
        self._unread: list[AsyncModelRunnerOutput] = []  # launched, not yet read back
        self._sampling_cache: tuple[tuple[int, int], SamplingMetadata] | None = None
        self._batch_ids_cache: tuple[int, list[CachedRequestState], list[str]] | None = None
        self.sink_block_id = 0

    # ------------------------------------------------------------------ KV cache
    def kv_bytes_per_block(self) -> int:
        a = self.arch_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * a.num_hidden_layers * self.block_size * a.num_key_value_heads * a.head_dim * elem

    def determine_num_blocks(self) -> int:
        cc = self.config.cache_config
        per_block = self.kv_bytes_per_block()
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        if cc.kv_cache_gb is not None:
            return max(int(cc.kv_cache_gb * (1 << 30)) // per_block, 1)
        if self.device.type != "cuda":
            # CPU default: 1 GiB, like vLLM's CPU backend default order of magnitude.
            return max((1 << 30) // per_block, 1)
        # GPU: measure peak memory of a profiling forward pass at the largest batch,
        # then give the KV cache what is left under gpu_memory_utilization.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.profile_run()
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
    def profile_run(self) -> None:
        """A forward pass over max_num_batched_tokens tokens (several requests) plus the
        sampler at max_num_seqs rows, with a throwaway 1-block-per-request cache."""
        n = self.max_num_tokens
        num_reqs = min(self.max_num_reqs, n)
        a = self.arch_config
        shape = self.attn_backend_cls.get_kv_cache_shape(
            num_reqs * (-(-n // num_reqs) // self.block_size + 1) + 1,
            self.block_size,
            a.num_key_value_heads,
            a.head_dim,
        )
        caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(a.num_hidden_layers)
        ]
        lens = [n // num_reqs] * num_reqs
        lens[-1] += n - sum(lens)
        blocks, start = [], 1
        for length in lens:
            nb = -(-length // self.block_size)
            blocks.append(list(range(start, start + nb)))
            start += nb
        meta = self._build_metadata_simple(lens, blocks)
        ids = torch.randint(0, a.vocab_size, (n,), device=self.device)
        pos = torch.cat([torch.arange(length, device=self.device) for length in lens])
        hidden = self.model(ids, pos, caches, meta)
        logits = self.model.compute_logits(hidden[:num_reqs])
        del logits, hidden, caches

    def _build_metadata_simple(self, lens: list[int], blocks: list[list[int]]) -> AttentionMetadata:
        d = self.device
        qsl = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
        sl = torch.tensor(lens, dtype=torch.int32)
        width = max(len(b) for b in blocks)
        bt = torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.int32)
        slots = torch.cat(
            [
                torch.tensor(b, dtype=torch.int64).repeat_interleave(self.block_size)[:length]
                * self.block_size
                + torch.arange(length) % self.block_size
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

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate num_blocks for the scheduler plus one sink block (id num_blocks) that
        padded CUDA-graph rows write into; then capture CUDA graphs on a GPU."""
        a = self.arch_config
        shape = self.attn_backend_cls.get_kv_cache_shape(
            num_blocks + 1, self.block_size, a.num_key_value_heads, a.head_dim
        )
        # Zeroed: stale NaNs in never-written slots would poison masked-out products.
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(a.num_hidden_layers)
        ]
        self.num_blocks = num_blocks
        self.sink_block_id = num_blocks
        # The torch backend reads host-side metadata, so graphs need the Triton backend.
        if (
            self.device.type == "cuda"
            and not self.config.enforce_eager
            and self.attn_backend_name == "triton"
        ):
            self.cuda_graph = CUDAGraphRunner(self, sink_block_id=num_blocks)
            self.cuda_graph.capture()
            print(
                f"kvasir: captured CUDA graphs for decode batch sizes "
                f"{self.cuda_graph.sizes[0]}..{self.cuda_graph.max_batch_size} in "
                f"{self.cuda_graph.capture_time:.1f}s",
                flush=True,
            )

    @property
    def cuda_graphs_enabled(self) -> bool:
        return self.cuda_graph is not None

    # ------------------------------------------------------------------ state
    def _update_states(self, so: SchedulerOutput) -> None:
        ib = self.input_batch
        for rid in so.finished_req_ids:
            st = self.requests.pop(rid, None)
            if st is not None and st.row >= 0:
                ib.remove(st)
        for rid in so.preempted_req_ids:
            st = self.requests.get(rid)
            if st is not None and st.row >= 0:
                ib.remove(st)  # keeps its state (generator) for when it resumes
        eos = list(self.arch_config.eos_token_id)
        for new in so.scheduled_new_reqs:
            old = self.requests.get(new.req_id)
            if old is not None and old.row >= 0:
                ib.remove(old)
            sp = new.sampling_params
            gen = old.generator if old is not None else None
            if gen is None and sp.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(sp.seed)
            stop_ids: list[int] = []
            if sp.min_tokens:
                stop_ids = list(sp.stop_token_ids or []) + ([] if sp.ignore_eos else eos)
            st = CachedRequestState(
                req_id=new.req_id,
                sampling_params=sp,
                num_prompt_tokens=len(new.prompt_token_ids),
                generator=gen,
                min_tokens_stop_ids=stop_ids,
                prompt_logprobs_done=old.prompt_logprobs_done if old is not None else 0,
            )
            self.requests[new.req_id] = st
            ib.add(
                st,
                list(new.prompt_token_ids) + list(new.output_token_ids),
                new.block_ids,
                new.num_computed_tokens,
            )
        reqs, num_computed = self.requests, ib.num_computed_tokens
        for cached in so.scheduled_cached_reqs:
            row = reqs[cached.req_id].row
            num_computed[row] = cached.num_computed_tokens
            if cached.new_block_ids:
                ib.append_block_ids(row, cached.new_block_ids)

    def _read_back(self, upto: AsyncModelRunnerOutput) -> None:
        """Read launched steps back, oldest first, through ``upto``; their sampled ids
        join the known tokens of their rows."""
        while self._unread:
            out = self._unread.pop(0)
            tokens = out.materialize()
            if len(tokens):
                self.input_batch.record_sampled(out.sampled_states, tokens)
            if out is upto:
                return

    # ------------------------------------------------------------------ step
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its sampled tokens."""
        out = self.execute_model_async(so)
        if out is None:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        return out.get_output()

    @torch.inference_mode()
    def execute_model_async(self, so: SchedulerOutput) -> AsyncModelRunnerOutput | None:
        """Queue one step on the device and return without waiting for it (None when
        nothing is scheduled). At most one earlier step may still be unread: its
        sampled ids are this step's decode inputs; anything older is read back first."""
        if len(self._unread) > 1:
            self._read_back(self._unread[-2])
        if self._copy_event is not None:
            self._copy_event.synchronize()  # last step's copies read the pinned buffers
        self._update_states(so)
        if not so.num_scheduled_tokens:
            return None
        ib = self.input_batch
        if self._unread and ib.num_penalized:
            self._read_back(self._unread[-1])  # penalties need every token on the host
        step = self._prepare_inputs(so)
        rows, n = step.rows, len(step.rows)
        prompt_lp: dict[str, list[TokenLogprobs]] = {}
        all_logits = hidden = None
        if step.graph_size:
            assert self.cuda_graph is not None
            all_logits = self.cuda_graph.replay(step.graph_size)[:n]  # [n, vocab]
        else:
            hidden = self.model(
                self.input_ids[: step.num_tokens],
                self.positions[: step.num_tokens],
                self.kv_caches,
                step.attn_metadata,
            )  # [num_tokens, hidden]
            if ib.num_prompt_logprobs:
                prompt_lp = self._prompt_logprobs(step, hidden)

        sample_idx = np.nonzero(step.seq_lens >= ib.num_tokens[rows])[0]
        num_sampled = len(sample_idx)
        ib.num_computed_tokens[rows] = step.seq_lens
        ib.prev_sample_index[: ib.num_reqs] = -1
        d = self.device
        sampled = torch.empty(0, dtype=torch.int64, device=d)
        lp: LogprobsTensors | None = None
        if num_sampled:
            if all_logits is not None:
                logits = all_logits
                if num_sampled < n:
                    logits = all_logits.index_select(0, to_device(sample_idx, d))
            else:
                assert hidden is not None
                idx = to_device(step.query_start_loc[1:][sample_idx] - 1, d)
                logits = self.model.compute_logits(hidden.index_select(0, idx))  # [S, vocab]
            rows_s = rows[sample_idx]
            md = self._sampling_metadata(rows_s, step.dense and num_sampled == n)
            out = self.sampler(logits, md)
            sampled, lp = out.sampled_token_ids, out.logprobs_tensors
            ib.prev_sample_index[rows_s] = np.arange(num_sampled)
            ib.num_tokens[rows_s] += 1
        self._prev_sampled = sampled if num_sampled else None
        states = step.states
        sampled_states = states if num_sampled == n else [states[i] for i in sample_idx]
        event = None
        if d.type == "cuda" and num_sampled:
            # Into pinned memory behind the sampler; the event says when it landed.
            sampled_host = torch.empty(num_sampled, dtype=torch.int64, pin_memory=True)
            sampled_host.copy_(sampled, non_blocking=True)
            if lp is not None:
                lp = LogprobsTensors(*(_to_host(t) for t in lp))
            event = torch.cuda.Event()
            event.record()
        elif num_sampled:
            sampled_host = sampled  # on the CPU already
        else:
            sampled_host = torch.empty(0, dtype=torch.int64)
        handle = AsyncModelRunnerOutput(
            req_ids=step.req_ids,
            sample_indices=sample_idx,
            sampled_states=sampled_states,
            sampled_token_ids=sampled_host,
            logprobs=lp,
            prompt_logprobs=prompt_lp,
            event=event,
            on_ready=self._read_back,
        )
        self._unread.append(handle)
        return handle

    def _prepare_inputs(self, so: SchedulerOutput) -> _StepInputs:
        """Fill the pinned host buffers for this step with numpy over the batch rows,
        copy them to the device (non-blocking), and drop last step's sampled tokens
        into place on the device. The batch runs in row order."""
        ib = self.input_batch
        nst = so.num_scheduled_tokens
        n = len(nst)
        reqs = self.requests
        rows = np.fromiter((reqs[r].row for r in nst), dtype=np.int64, count=n)
        num_sched = np.fromiter(nst.values(), dtype=np.int64, count=n)
        dense = n == ib.num_reqs  # every row runs: rows are a permutation of 0..n-1
        if dense:
            ordered = np.empty_like(num_sched)
            ordered[rows] = num_sched
            num_sched, rows = ordered, np.arange(n)
        else:
            order = np.argsort(rows)
            rows, num_sched = rows[order], num_sched[order]
        states, req_ids = self._batch_ids(rows, dense)

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

        cg = self.cuda_graph
        graph_size = None
        if (
            cg is not None
            and max_query_len == 1
            and n <= cg.max_batch_size
            and not (ib.num_prompt_logprobs and any(s.needs_prompt_logprobs for s in states))
        ):
            graph_size = cg.padded_size(n)
        # Graph steps are decode-only: one token per request, padded rows included.
        padded = graph_size or n
        padded_tokens = graph_size or total

        bs = self.block_size
        ids_np = self.input_ids_cpu.numpy()
        pos_np = self.positions_cpu.numpy()
        slots_np = self.slot_mapping_cpu.numpy()
        qsl_np = self.query_start_loc_cpu.numpy()
        sl_np = self.seq_lens_cpu.numpy()
        # Known tokens; a token still on the device is put in place below.
        ids_np[:total] = ib.token_ids[tok_rows, positions]
        pos_np[:total] = positions
        block_ids = ib.block_table[tok_rows, positions // bs]
        slots_np[:total] = block_ids * bs + positions % bs
        qsl_np[: n + 1] = cu
        sl_np[:n] = seq_lens
        if dense:
            bt_src = ib.block_table_cpu
            bt_np = ib.block_table  # rows >= n are free
        else:
            bt_src = self.block_table_staging_cpu
            bt_np = bt_src.numpy()
            bt_np[:n] = ib.block_table[rows]
        if padded > n:
            # CUDA-graph padding rows: one token at position 0 of the sink block.
            ids_np[n:padded] = 0
            pos_np[n:padded] = 0
            slots_np[n:padded] = self.sink_block_id * bs
            qsl_np[n + 1 : padded + 1] = np.arange(n + 1, padded + 1)
            sl_np[n:padded] = 1
            bt_np[n:padded, 0] = self.sink_block_id

        nb = self.device.type == "cuda"
        t = padded_tokens
        self.input_ids[:t].copy_(self.input_ids_cpu[:t], non_blocking=nb)
        self.positions[:t].copy_(self.positions_cpu[:t], non_blocking=nb)
        self.slot_mapping[:t].copy_(self.slot_mapping_cpu[:t], non_blocking=nb)
        self.query_start_loc[: padded + 1].copy_(
            self.query_start_loc_cpu[: padded + 1], non_blocking=nb
        )
        self.seq_lens[:padded].copy_(self.seq_lens_cpu[:padded], non_blocking=nb)
        self.block_table[:padded].copy_(bt_src[:padded], non_blocking=nb)
        self._scatter_pending(rows, cu, num_computed, max_query_len)
        if self._copy_event is not None:
            self._copy_event.record()

        meta = AttentionMetadata(
            num_reqs=n,
            num_actual_tokens=total,
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
            query_start_loc=self.query_start_loc[: n + 1],
            seq_lens=self.seq_lens[:n],
            block_table=self.block_table[:n],
            slot_mapping=self.slot_mapping[:total],
            query_start_loc_cpu=self.query_start_loc_cpu[: n + 1],
            seq_lens_cpu=self.seq_lens_cpu[:n],
        )
        return _StepInputs(
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
            attn_metadata=meta,
        )

    def _batch_ids(
        self, rows: np.ndarray, dense: bool
    ) -> tuple[list[CachedRequestState], list[str]]:
        """States and request ids of ``rows``; cached while the batch is unchanged."""
        ib = self.input_batch
        cache = self._batch_ids_cache
        if dense and cache is not None and cache[0] == ib.version:
            return cache[1], cache[2]
        states = [ib.req_states[r] for r in rows.tolist()]
        req_ids = [s.req_id for s in states]  # type: ignore[union-attr]
        if dense:
            self._batch_ids_cache = (ib.version, states, req_ids)  # type: ignore[assignment]
        return states, req_ids  # type: ignore[return-value]

    def _scatter_pending(
        self, rows: np.ndarray, cu: np.ndarray, num_computed: np.ndarray, max_query_len: int
    ) -> None:
        """Rows whose next input token was sampled by the last step and never came to
        the host: copy it on the device from that step's sampled ids into input_ids."""
        ib = self.input_batch
        known = ib.num_known_tokens[rows]
        pending = np.nonzero(ib.num_tokens[rows] > known)[0]
        if not len(pending):
            return
        prev = self._prev_sampled
        assert prev is not None
        # A row that sampled last step computed all its known tokens, so its query
        # starts exactly at the pending token.
        assert (known[pending] == num_computed[pending]).all()
        src = ib.prev_sample_index[rows[pending]]
        m = len(pending)
        if max_query_len == 1 and m == len(rows) == len(prev) and (src == pending).all():
            self.input_ids[:m].copy_(prev)  # steady decode: same rows, same order
            return
        nb = self.device.type == "cuda"
        stage = self.scatter_cpu.numpy()
        stage[:m] = cu[pending]
        stage[m : 2 * m] = src
        self.scatter_index[: 2 * m].copy_(self.scatter_cpu[: 2 * m], non_blocking=nb)
        dst_t, src_t = self.scatter_index[:m], self.scatter_index[m : 2 * m]
        self.input_ids.index_copy_(0, dst_t, prev.index_select(0, src_t))

    def _prompt_logprobs(
        self, step: _StepInputs, hidden: torch.Tensor
    ) -> dict[str, list[TokenLogprobs]]:
        out: dict[str, list[TokenLogprobs]] = {}
        ib = self.input_batch
        for i, st in enumerate(step.states):
            k = st.sampling_params.prompt_logprobs
            if k is None:
                continue
            c, n = int(step.num_computed[i]), int(step.num_scheduled[i])
            # Position p predicts prompt token p + 1; only targets inside the prompt count.
            first, last = max(c, st.prompt_logprobs_done), min(c + n, st.num_prompt_tokens - 1)
            if last <= first:
                continue
            start = int(step.query_start_loc[i])
            rows = torch.arange(first - c, last - c, device=hidden.device) + start
            logits = self.model.compute_logits(hidden.index_select(0, rows))
            targets = torch.from_numpy(
                ib.token_ids[st.row, first + 1 : last + 1].astype(np.int64)
            ).to(hidden.device)
            lp = compute_token_logprobs(logits, targets, k)
            out[st.req_id] = logprobs_to_lists(lp)
            st.prompt_logprobs_done = last
        return out

    def _sampling_metadata(self, rows: np.ndarray, whole_batch: bool) -> SamplingMetadata:
        """Per-row sampling tensors for ``rows``; reused while the batch is unchanged and
        every row samples (greedy-only batches build no tensors at all)."""
        ib = self.input_batch
        cacheable = whole_batch and not ib.num_penalized
        key = (ib.version, len(rows))
        cache = self._sampling_cache
        if cacheable and cache is not None and cache[0] == key:
            md = cache[1]
        else:
            md = ib.make_sampling_metadata(rows, self.device, self._empty)
            if cacheable:
                self._sampling_cache = (key, md)
        if ib.num_min_tokens:
            md = replace(md, min_tokens_stop_ids=ib.min_tokens_stop_ids(rows))
        return md


class _StepInputs(NamedTuple):
    """One step's batch, in batch (row) order, as the runner prepared it."""

    rows: np.ndarray  # [n] batch row of each request
    states: list[CachedRequestState]  # [n]
    req_ids: list[str]  # [n]
    dense: bool  # every row of the batch runs, in row order
    num_tokens: int  # tokens in the flat batch (unpadded)
    num_scheduled: np.ndarray  # [n]
    num_computed: np.ndarray  # [n] before this step
    seq_lens: np.ndarray  # [n] after this step
    query_start_loc: np.ndarray  # [n + 1]
    graph_size: int | None  # padded CUDA-graph batch size; None: eager
    attn_metadata: AttentionMetadata


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
