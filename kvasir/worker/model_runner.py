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
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvasir.attention.backend import get_backend_cls
from kvasir.config import EngineConfig, ModelArchConfig
from kvasir.core.kv_cache_spec import KVCacheConfig, KVCacheSpec, bytes_per_block
from kvasir.core.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from kvasir.distributed.parallel_state import (
    IntermediateTensors,
    ParallelState,
    single_process_state,
)
from kvasir.layers.linear import LinearBase, warm_up_linears
from kvasir.layers.sampler import (
    LogprobsTensors,
    Sampler,
    SamplingMetadata,
    compute_token_logprobs,
)
from kvasir.worker import kv_cache_sizing, pooling
from kvasir.worker.async_output import AsyncModelRunnerOutput, logprobs_to_lists
from kvasir.worker.cuda_graph import CUDAGraphRunner
from kvasir.worker.input_batch import InputBatch, to_device
from kvasir.worker.input_buffers import InputBuffers, StepInputs
from kvasir.worker.request_state import CachedRequestState

if TYPE_CHECKING:
    from kvasir.lora.manager import LoRAManager
    from kvasir.spec_decode.decoder import SpecDecoder

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    return torch.device(name)


def keep_freed_memory_on_heap() -> bool:
    """CPU runs: have glibc serve large allocations from its heap and keep freed memory
    there, instead of mapping fresh pages for every activation above 128 KiB and
    returning them on free. Each such page costs a fault on first touch, and a prefill
    step allocates hundreds of MiB of activations (the gain is in benchmarks/RESULTS.md,
    "Measurements that used to live in docstrings"). The price is that the process keeps its peak
    memory (as with the tcmalloc/jemalloc preload vLLM recommends for CPU serving).
    Process-wide, so anything else in the process (the HF baseline in ``kvasir bench``)
    gets it too. No-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 1 << 30) == 1
    return ok and mallopt(m_trim_threshold, (1 << 31) - 1) == 1


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ModelRunner:
    """One rank's model, KV cache, persistent batch and sampler.

    Contract with the engine (through the executor): ``determine_num_blocks`` and
    ``initialize_kv_cache`` once, then one ``execute_model``/``execute_model_async``
    per ``SchedulerOutput``, in the scheduler's order. The runner keeps each request's
    state from the diffs it is sent (see ``core/scheduler.py``) and runs a step's whole
    batch in one forward pass. With pipeline parallelism a stage other than the last
    receives the previous stage's ``IntermediateTensors``, sends its own on, and
    samples nothing (its runner learns sampled tokens from the scheduler's
    ``CachedRequestData.new_token_ids``); every TP rank of the last stage samples the
    same tokens from the same gathered logits, so all ranks' batches stay identical.
    """

    def __init__(
        self,
        config: EngineConfig,
        arch_config: ModelArchConfig,
        parallel: ParallelState | None = None,
    ) -> None:
        from kvasir.models.loader import load_model

        self.config = config
        self.arch_config = arch_config
        if parallel is None:
            parallel = single_process_state(resolve_device(config.device_config.device))
        self.parallel = parallel
        self.device = parallel.device
        if self.device.type == "cpu":
            keep_freed_memory_on_heap()
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
            config.model_config,
            arch_config,
            self.attn_backend_cls,
            self.dtype,
            self.device,
            config.kernel_config,
            parallel,
            config.parallel_config,
            kv_cache_dtype=config.cache_config.kv_cache_dtype,
            calculate_kv_scales=config.cache_config.calculate_kv_scales,
        )
        self.load_time = time.perf_counter() - t0
        if self.device.type == "cpu":
            # Decode batch sizes up to 64 (larger ones are rarer on a CPU and cost more
            # start-up time than they would save).
            linears = [m for m in self.model.modules() if isinstance(m, LinearBase)]
            warm_up_linears(linears, min(self.max_num_reqs, 64))
        self.lora_manager: LoRAManager | None = None
        if config.lora_config is not None:
            from kvasir.lora.manager import LoRAManager

            if parallel.tp_size > 1 or parallel.pp_size > 1:
                raise ValueError(
                    "enable_lora: LoRA with tensor or pipeline parallelism is not supported yet"
                )
            self.lora_manager = LoRAManager(
                self.model, config.lora_config, self.max_num_tokens, self.device, self.dtype
            )
        self.sampler = Sampler()
        self.watermark = None  # kvasir.security.watermark.Watermark when --watermark-key
        if config.watermark_key is not None:
            from kvasir.security.watermark import Watermark, WatermarkParams

            self.watermark = Watermark(
                WatermarkParams(
                    config.watermark_key,
                    config.watermark_gamma,
                    config.watermark_delta,
                    config.watermark_context,
                )
            )
        self.spec_decoder: SpecDecoder | None = None
        self.draft_kv_caches: list[torch.Tensor] = []
        pipelined = parallel.pp_size > 1
        self._forward = self._forward_pipelined if pipelined else self._forward_local
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.requests: dict[str, CachedRequestState] = {}
        self.cuda_graph: CUDAGraphRunner | None = None
        self.num_state_bytes = 0  # state-space layers' slots (initialize_kv_cache)

        # The model's input buffers (CUDA graphs capture against them); aliases below.
        d = self.device
        pin = d.type == "cuda"
        num_reqs = self.max_num_reqs
        self.buffers = InputBuffers(
            self.max_num_tokens, num_reqs, self.max_num_blocks_per_req, self.block_size, d
        )
        b = self.buffers
        b.metadata_builder = self.attn_backend_cls.get_builder_cls()(b)
        self.input_ids, self.positions, self.slot_mapping = b.input_ids, b.positions, b.slot_mapping
        self.query_start_loc, self.seq_lens = b.query_start_loc, b.seq_lens
        self.block_table = b.block_table
        self.input_batch = InputBatch(
            num_reqs, self.max_model_len, self.max_num_blocks_per_req, arch_config.vocab_size, pin
        )
        self._empty = torch.empty(0, dtype=torch.float32, device=d)
        self._prev_sampled: torch.Tensor | None = None  # [S] last step's sampled ids
        self._unread: list[AsyncModelRunnerOutput] = []  # launched, not yet read back
        self._sampling_cache: tuple[tuple[int, int], SamplingMetadata] | None = None
        self._batch_ids_cache: tuple[int, list[CachedRequestState], list[str]] | None = None
        if config.speculative_config is not None:
            from kvasir.spec_decode.decoder import SpecDecoder

            if kv_cache_sizing.has_state_layers(self.model):
                raise ValueError(
                    "speculative_config: this model has state-space (Mamba) layers, whose "
                    "recurrent state cannot roll back over rejected drafts; serve it "
                    "without speculative decoding"
                )

            self.spec_decoder = SpecDecoder(config.speculative_config, self)

    # ------------------------------------------------------------------ KV cache
    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """One spec per attention layer this process holds, in the model's layer order
        (``kv_caches[i]`` is the cache of ``kv_cache_specs()[i]``), then the draft
        proposer's (``draft_kv_caches``; same block table)."""
        specs = kv_cache_sizing.kv_cache_specs(self.model, self.block_size, self.dtype)
        if self.spec_decoder is not None:
            specs += self.spec_decoder.proposer.kv_cache_specs()
        return specs

    def kv_bytes_per_block(self) -> int:
        return bytes_per_block(self.kv_cache_specs())

    def determine_num_blocks(self) -> int:
        return kv_cache_sizing.determine_num_blocks(self)

    def profile_run(self) -> None:
        kv_cache_sizing.profile_run(self)

    def initialize_kv_cache(self, num_blocks: int) -> KVCacheConfig:
        """Allocate one cache per layer spec of num_blocks blocks for the scheduler plus
        one sink block (id num_blocks) that padded CUDA-graph rows write into; then
        capture CUDA graphs on a GPU. Returns the cache's ``KVCacheConfig`` (what the
        scheduler's block pool is built from: ``KVCacheManager.from_config``)."""
        kv_cache_config = KVCacheConfig(num_blocks, tuple(self.kv_cache_specs()))
        self.kv_caches = kv_cache_sizing.allocate_kv_caches(
            kv_cache_config.layer_specs, num_blocks + 1, self.attn_backend_cls, self.device
        )
        if self.spec_decoder is not None:
            num_draft = len(self.spec_decoder.proposer.kv_cache_specs())
            if num_draft:
                self.kv_caches, self.draft_kv_caches = (
                    self.kv_caches[:-num_draft],
                    self.kv_caches[-num_draft:],
                )
            self.spec_decoder.proposer.bind_kv_caches(self.draft_kv_caches)
            self.spec_decoder.calibrate(self)
        self.num_blocks = num_blocks
        self.buffers.sink_block_id = num_blocks
        # State-space layers: one state slot per schedulable request (+ scratch slot 0).
        self.num_state_bytes = kv_cache_sizing.allocate_state_caches(
            self.model, self.max_num_reqs + 1, self.device
        )
        # Their slots travel in persistent buffers too (the metadata's state_*_dev), so
        # steps of state-space models replay as CUDA graphs.
        self.buffers.has_state_slots = self.num_state_bytes > 0
        # A backend that reads host-side metadata (torch) cannot replay graphs.
        if (
            self.device.type == "cuda"
            and not self.config.enforce_eager
            and self.buffers.metadata_builder.supports_cuda_graphs
            # Pipeline stages send and receive between kernels: they run eagerly.
            and self.parallel.pp_size == 1
            # Layers that read host-side values every step (expert parallelism's
            # exchange sizes) run eagerly.
            and all(getattr(m, "cuda_graph_safe", True) for m in self.model.modules())
        ):
            self.cuda_graph = CUDAGraphRunner(self)
            self.cuda_graph.capture()
            cg = self.cuda_graph
            mixed = f"{cg.mixed_sizes[0]}..{cg.mixed_sizes[-1]}" if cg.mixed_sizes else "none"
            logger.info(
                "captured CUDA graphs for decode batch sizes %d..%d and mixed steps of %s "
                "tokens in %.1fs",
                cg.sizes[0],
                cg.max_batch_size,
                mixed,
                cg.capture_time,
            )
        return kv_cache_config

    @property
    def cuda_graphs_enabled(self) -> bool:
        return self.cuda_graph is not None

    # ------------------------------------------------------------------ state
    def _update_states(self, so: SchedulerOutput) -> None:
        ib = self.input_batch
        # Sorted, not set order: string hashes differ between processes, and every
        # tensor-parallel rank must lay its rows (so its flat batch) out identically.
        for rid in sorted(so.finished_req_ids):
            st = self.requests.pop(rid, None)
            if st is not None and st.row >= 0:
                ib.remove(st)
            if self.spec_decoder is not None:
                self.spec_decoder.remove(rid)
        for rid in sorted(so.preempted_req_ids):
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
                pooling_params=new.pooling_params,
                state_slot=new.state_slot,
                lora_id=new.lora_id,
            )
            self.requests[new.req_id] = st
            if new.state_copy_from >= 0:  # an n > 1 child: its parent's state so far
                kv_cache_sizing.copy_state(self.model, new.state_copy_from, new.state_slot)
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
            if cached.new_token_ids:  # pipeline parallelism: sampled by the last stage
                start = max(cached.num_computed_tokens, int(ib.num_prompt_tokens[row]))
                ib.set_known_tokens(row, start, cached.new_token_ids)
        # Drafts to verify: input tokens after the known ones (not known themselves).
        for rid, drafts in so.scheduled_spec_decode_tokens.items():
            row = reqs[rid].row
            nk = int(ib.num_known_tokens[row])
            ib.token_ids[row, nk : nk + len(drafts)] = drafts

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
        if len(self._unread) > 1 or (self._unread and self.spec_decoder is not None):
            self._read_back(self._unread[-1 if self.spec_decoder is not None else -2])
        self.buffers.wait_for_copies()  # before the pinned sources are rewritten
        self._update_states(so)
        if self.lora_manager is not None and so.lora_loads:
            self.lora_manager.apply_loads(so.lora_loads)
        if not so.num_scheduled_tokens:
            return None
        ib = self.input_batch
        if self._unread and (ib.num_penalized or ib.num_bad_word_prefixes):
            # Penalties and multi-token bad words need every token on the host.
            self._read_back(self._unread[-1])
        step = self._prepare_inputs(so)
        if self.lora_manager is not None:
            self.lora_manager.prepare_step(step)
        rows, n = step.rows, len(step.rows)
        prompt_lp: dict[str, list[TokenLogprobs]] = {}
        all_logits = hidden = None
        if step.graph_size:
            assert self.cuda_graph is not None
            all_logits = self.cuda_graph.replay(step.graph_size)[:n]  # [n, vocab]
        elif step.mixed_graph_tokens:
            assert self.cuda_graph is not None
            hidden = self.cuda_graph.replay_mixed(step.mixed_graph_tokens)[: step.num_tokens]
        else:
            hidden = self._forward(step)  # [num_tokens, hidden]
            if hidden is None:  # a pipeline stage before the last: nothing to sample
                ib.num_computed_tokens[rows] = step.seq_lens
                return None
            if ib.num_prompt_logprobs:
                prompt_lp = self._prompt_logprobs(step, hidden)

        sample_idx = np.nonzero(step.seq_lens >= ib.num_tokens[rows])[0]
        pooled: dict[str, list[float]] = {}
        if ib.num_pooling:  # embedding requests pool their hidden states, never sample
            assert hidden is not None
            sample_idx, pooled = pooling.pool_step(step, hidden, sample_idx)
        num_sampled = len(sample_idx)
        ib.num_computed_tokens[rows] = step.seq_lens
        if self.spec_decoder is not None:
            spec_out = self._spec_step(so, step, hidden, all_logits, sample_idx, prompt_lp)
            if pooled:
                spec_out.get_output().pooled_outputs.update(
                    (rid, v.tolist()) for rid, v in pooled.items()
                )
            return spec_out
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
            if so.structured_output_request_ids:
                md = self._with_grammar_bitmask(md, so, step, sample_idx)
            if self.watermark is not None:
                logits = self._watermarked(logits, rows_s, step.query_start_loc[1:][sample_idx] - 1)
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
        handle.pooled = pooled
        self._unread.append(handle)
        return handle

    def _spec_step(
        self,
        so: SchedulerOutput,
        step: StepInputs,
        hidden: torch.Tensor | None,
        all_logits: torch.Tensor | None,
        sample_idx: np.ndarray,
        prompt_lp: dict[str, list[TokenLogprobs]],
    ) -> AsyncModelRunnerOutput:
        """Speculative decoding: verify, sample and propose (``SpecDecoder.sample``),
        with the tokens on the host before returning (the next step's positions
        depend on how many drafts were accepted)."""
        assert self.spec_decoder is not None
        self._prev_sampled = None
        self.input_batch.prev_sample_index[: self.input_batch.num_reqs] = -1
        if len(sample_idx):
            out = self.spec_decoder.sample(
                self, so, step, hidden, all_logits, sample_idx, prompt_lp
            )
        else:
            out = ModelRunnerOutput(
                req_ids=step.req_ids,
                sampled_token_ids=[[] for _ in step.req_ids],
                prompt_logprobs=prompt_lp,
            )
        return AsyncModelRunnerOutput.completed(out)

    def _forward_local(self, step: StepInputs) -> torch.Tensor | None:
        n = step.num_tokens
        out = self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, step.attn_metadata)
        return out  # type: ignore[no-any-return]

    def _forward_pipelined(self, step: StepInputs) -> torch.Tensor | None:
        """This stage's layers: the previous stage's hidden states and residual in (one
        receive), this stage's out to the next (one send); the last stage returns the
        final hidden states."""
        n, par = step.num_tokens, self.parallel
        intermediate = None
        if not par.is_first_stage:
            buf = torch.empty(
                2, n, self.arch_config.hidden_size, dtype=self.dtype, device=self.device
            )
            par.pp.recv(buf, par.pp_rank - 1)  # [2, num_tokens, hidden]
            intermediate = IntermediateTensors(buf[0], buf[1])
        out = self.model(
            self.input_ids[:n], self.positions[:n], self.kv_caches, step.attn_metadata, intermediate
        )
        if par.is_last_stage:
            return out  # type: ignore[no-any-return]
        par.pp.send(torch.stack(tuple(out)), par.pp_rank + 1)
        return None

    def _prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        """The step's rows in row order (the batch order), then the flat batch and its
        copies to the device (``InputBuffers.prepare``)."""
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
        cg = self.cuda_graph
        graph_sizes = None
        if (
            cg is not None
            and not ib.num_pooling
            and not (ib.num_prompt_logprobs and any(s.needs_prompt_logprobs for s in states))
        ):
            graph_sizes = cg.graph_sizes
            sd = self.spec_decoder
            if sd is not None and sd.proposer.needs_hidden_states:
                graph_sizes = graph_sizes._replace(decode=[])  # they return logits only
        return self.buffers.prepare(
            ib, rows, num_sched, states, req_ids, dense, graph_sizes, self._prev_sampled
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

    def _prompt_logprobs(
        self, step: StepInputs, hidden: torch.Tensor
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

    def _watermarked(
        self, logits: torch.Tensor, rows: np.ndarray, last_input: np.ndarray
    ) -> torch.Tensor:
        assert self.watermark is not None
        return self.watermark.apply(logits, _watermark_context(self, rows, last_input))

    def _with_grammar_bitmask(
        self, md: SamplingMetadata, so: SchedulerOutput, step: StepInputs, sample_idx: np.ndarray
    ) -> SamplingMetadata:
        """Structured outputs: the sampled rows' grammar bitmask (see
        ``kvasir.structured_output``)."""
        from kvasir.structured_output.bitmask import rows_bitmask

        req_ids = [step.req_ids[i] for i in sample_idx.tolist()]
        mask = rows_bitmask(so, req_ids, self.arch_config.vocab_size, self.device)
        return md if mask is None else replace(md, token_bitmask=mask)

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
        if md.token_masks is not None and md.token_masks.max_bad_prefix:
            ends = ib.num_tokens[rows]
            recent = ib.recent_output_ids(rows, ends, md.token_masks.max_bad_prefix, self.device)
            md = replace(md, recent_output_ids=recent)
        return md


def _watermark_context(
    runner: ModelRunner, rows: np.ndarray, last_input: np.ndarray
) -> torch.Tensor:
    """[S, N] context of each sampled row: its step input token (on the device, so a
    pending async token needs no sync), then the host tokens before it."""
    assert runner.watermark is not None
    d = runner.device
    prev = runner.input_ids.index_select(0, to_device(last_input, d)).to(torch.int64)
    n = runner.watermark.params.context
    if n == 1:
        return prev[:, None]
    from kvasir.security.watermark import rows_context

    ib = runner.input_batch
    older = rows_context(ib.token_ids, rows, ib.num_tokens[rows] - 1, n - 1)
    return torch.cat([prev[:, None], to_device(older, d)], dim=1)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
