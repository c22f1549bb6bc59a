"""The model runner: turns a SchedulerOutput into one forward pass and one sample.

It keeps each request's state (``CachedRequestState``) and receives only diffs from the
scheduler. Every step it builds a flat varlen batch plus explicit AttentionMetadata
(no module-level state), runs the model, gathers the logits of the tokens that sample,
and samples. Device tensors needed every step live in persistent buffers.
"""

from __future__ import annotations

import logging
import time

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
from kvasir.worker.cuda_graph import CUDAGraphRunner
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
        # against them).
        d = self.device
        self.input_ids = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=d)
        self.positions = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=d)
        self.slot_mapping = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=d)
        self.query_start_loc = torch.zeros(self.max_num_reqs + 1, dtype=torch.int32, device=d)
        self.seq_lens = torch.zeros(self.max_num_reqs, dtype=torch.int32, device=d)
        self.block_table = torch.zeros(
            (self.max_num_reqs, self.max_num_blocks_per_req), dtype=torch.int32, device=d
        )
        pin = d.type == "cuda"
        self.block_table_cpu = torch.zeros(
            (self.max_num_reqs, self.max_num_blocks_per_req), dtype=torch.int32, pin_memory=pin
        )
        self.block_table_np = self.block_table_cpu.numpy()

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
            self.block_size, a.num_key_value_heads, a.head_dim,
        )
        caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                  for _ in range(a.num_hidden_layers)]
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

    def _build_metadata_simple(
        self, lens: list[int], blocks: list[list[int]]
    ) -> AttentionMetadata:
        d = self.device
        qsl = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
        sl = torch.tensor(lens, dtype=torch.int32)
        width = max(len(b) for b in blocks)
        bt = torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.int32)
        slots = torch.cat([
            torch.tensor(b, dtype=torch.int64).repeat_interleave(self.block_size)[:length]
            * self.block_size + torch.arange(length) % self.block_size
            for b, length in zip(blocks, lens)
        ])
        return AttentionMetadata(
            num_reqs=len(lens), num_actual_tokens=int(sum(lens)), max_query_len=max(lens),
            max_seq_len=max(lens), query_start_loc=qsl.to(d), seq_lens=sl.to(d),
            block_table=bt.to(d), slot_mapping=slots.to(d), query_start_loc_cpu=qsl,
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
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
        for new in so.scheduled_new_reqs:
            old = self.requests.get(new.req_id)
            gen = old.generator if old is not None else None
            sp = new.sampling_params
            if gen is None and sp.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(sp.seed)
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=list(new.output_token_ids),
                sampling_params=sp,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                generator=gen,
                prompt_logprobs_done=old.prompt_logprobs_done if old is not None else 0,
            )
        for cached in so.scheduled_cached_reqs:
            st = self.requests[cached.req_id]
            st.block_ids.extend(cached.new_block_ids)
            st.num_computed_tokens = cached.num_computed_tokens

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        req_ids = list(so.num_scheduled_tokens.keys())
        if not req_ids:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        num_reqs = len(req_ids)
        states = [self.requests[r] for r in req_ids]
        num_sched = np.fromiter(
            (so.num_scheduled_tokens[r] for r in req_ids), dtype=np.int64, count=num_reqs
        )
        num_computed = np.fromiter(
            (s.num_computed_tokens for s in states), dtype=np.int64, count=num_reqs
        )
        total = int(num_sched.sum())
        seq_lens = num_computed + num_sched
        cu = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(num_sched, out=cu[1:])

        # Flat token ids and positions. Decode rows take one token; prefill rows a slice.
        ids_np = np.empty(total, dtype=np.int64)
        for i, st in enumerate(states):
            c, n = int(num_computed[i]), int(num_sched[i])
            if n == 1:
                ids_np[cu[i]] = st.all_token_ids[c]
            else:
                ids_np[cu[i] : cu[i] + n] = st.all_token_ids[c : c + n]
        req_idx = np.repeat(np.arange(num_reqs), num_sched)
        pos_np = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], num_sched) + np.repeat(
            num_computed, num_sched
        )

        # Block table rows and slot mapping.
        width = 0
        bt = self.block_table_np
        for i, st in enumerate(states):
            nb = len(st.block_ids)
            bt[i, :nb] = st.block_ids
            width = max(width, nb)
        block_idx = bt[req_idx, pos_np // self.block_size].astype(np.int64)
        slots_np = block_idx * self.block_size + pos_np % self.block_size

        d = self.device
        non_blocking = d.type == "cuda"
        self.input_ids[:total].copy_(torch.from_numpy(ids_np), non_blocking=non_blocking)
        self.positions[:total].copy_(torch.from_numpy(pos_np), non_blocking=non_blocking)
        self.slot_mapping[:total].copy_(torch.from_numpy(slots_np), non_blocking=non_blocking)
        qsl_cpu = torch.from_numpy(cu.astype(np.int32))
        sl_cpu = torch.from_numpy(seq_lens.astype(np.int32))
        self.query_start_loc[: num_reqs + 1].copy_(qsl_cpu, non_blocking=non_blocking)
        self.seq_lens[:num_reqs].copy_(sl_cpu, non_blocking=non_blocking)
        width = max(width, 1)
        self.block_table[:num_reqs, :width].copy_(
            self.block_table_cpu[:num_reqs, :width], non_blocking=non_blocking
        )
        meta = AttentionMetadata(
            num_reqs=num_reqs,
            num_actual_tokens=total,
            max_query_len=int(num_sched.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc=self.query_start_loc[: num_reqs + 1],
            seq_lens=self.seq_lens[:num_reqs],
            block_table=self.block_table[:num_reqs, :width],
            slot_mapping=self.slot_mapping[:total],
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=sl_cpu,
        )
        # Rows that reach the end of their known tokens sample one new token.
        num_tokens = np.fromiter((s.num_tokens for s in states), dtype=np.int64, count=num_reqs)
        sample_rows = np.nonzero(seq_lens >= num_tokens)[0]
        cg = self.cuda_graph
        use_graph = (
            cg is not None
            and meta.max_query_len == 1
            and num_reqs <= cg.max_batch_size
            and not any(_needs_prompt_logprobs(st) for st in states)
        )
        prompt_lp: dict[str, list[TokenLogprobs]] = {}
        all_logits = None
        if use_graph:
            assert cg is not None
            all_logits = cg.run(num_reqs)  # [num_reqs, vocab]
        else:
            hidden = self.model(
                self.input_ids[:total], self.positions[:total], self.kv_caches, meta
            )  # [total, hidden]
            prompt_lp = self._prompt_logprobs(states, hidden, cu, num_computed, num_sched)

        sampled_lists: list[list[int]] = [[] for _ in range(num_reqs)]
        logprobs_out: dict[str, list[TokenLogprobs]] = {}
        if len(sample_rows) > 0:
            if all_logits is not None:
                logits = all_logits if len(sample_rows) == num_reqs else all_logits[
                    torch.from_numpy(sample_rows).to(d)]
            else:
                idx = torch.from_numpy(cu[1:][sample_rows] - 1).to(d)
                logits = self.model.compute_logits(hidden.index_select(0, idx))  # [S, vocab]
            sample_states = [states[i] for i in sample_rows]
            meta_s = self._sampling_metadata(sample_states, logits.shape[-1])
            out = self.sampler(logits, meta_s)
            tokens = out.sampled_token_ids.tolist()
            lp = out.logprobs_tensors
            lp_lists = _logprobs_to_lists(lp) if lp is not None else None
            for j, i in enumerate(sample_rows):
                st = states[i]
                tok = int(tokens[j])
                st.append_output_token(tok)
                sampled_lists[i] = [tok]
                if lp_lists is not None and st.sampling_params.logprobs is not None:
                    k = st.sampling_params.logprobs
                    logprobs_out[st.req_id] = [lp_lists[j][: k + 1]]
        for i, st in enumerate(states):
            st.num_computed_tokens = int(seq_lens[i])
        return ModelRunnerOutput(
            req_ids=req_ids,
            sampled_token_ids=sampled_lists,
            logprobs=logprobs_out,
            prompt_logprobs=prompt_lp,
        )

    def _prompt_logprobs(
        self,
        states: list[CachedRequestState],
        hidden: torch.Tensor,
        cu: np.ndarray,
        num_computed: np.ndarray,
        num_sched: np.ndarray,
    ) -> dict[str, list[TokenLogprobs]]:
        out: dict[str, list[TokenLogprobs]] = {}
        for i, st in enumerate(states):
            k = st.sampling_params.prompt_logprobs
            if k is None:
                continue
            c, n = int(num_computed[i]), int(num_sched[i])
            # Position p predicts prompt token p + 1; only targets inside the prompt count.
            first, last = max(c, st.prompt_logprobs_done), min(c + n, st.num_prompt_tokens - 1)
            if last <= first:
                continue
            rows = torch.arange(first - c, last - c, device=hidden.device) + int(cu[i])
            logits = self.model.compute_logits(hidden.index_select(0, rows))
            targets = torch.tensor(
                st.prompt_token_ids[first + 1 : last + 1], dtype=torch.int64, device=hidden.device
            )
            lp = compute_token_logprobs(logits, targets, k)
            out[st.req_id] = _logprobs_to_lists(lp)
            st.prompt_logprobs_done = last
        return out

    def _sampling_metadata(
        self, states: list[CachedRequestState], vocab_size: int
    ) -> SamplingMetadata:
        d = self.device
        sps = [s.sampling_params for s in states]
        temps = [0.0 if sp.is_greedy else sp.temperature for sp in sps]
        all_greedy = all(t == 0.0 for t in temps)
        all_random = all(t != 0.0 for t in temps)
        use_top_k = any(sp.top_k not in (-1, None) and sp.top_k < vocab_size for sp in sps)
        use_top_p = any(sp.top_p < 1.0 for sp in sps)
        use_min_p = any(sp.min_p > 0.0 for sp in sps)
        no_pen = all(
            sp.presence_penalty == 0.0
            and sp.frequency_penalty == 0.0
            and sp.repetition_penalty == 1.0
            for sp in sps
        )
        generators = {i: s.generator for i, s in enumerate(states) if s.generator is not None}
        min_tok: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            sp = s.sampling_params
            if sp.min_tokens and len(s.output_token_ids) < sp.min_tokens:
                stop_ids = list(sp.stop_token_ids or [])
                if not sp.ignore_eos:
                    stop_ids += list(self.arch_config.eos_token_id)
                if stop_ids:
                    min_tok[i] = stop_ids
        prompt_ids = None
        if not no_pen:
            width = max(s.num_prompt_tokens for s in states)
            prompt_ids = torch.full((len(states), width), vocab_size, dtype=torch.int64)
            for i, s in enumerate(states):
                prompt_ids[i, : s.num_prompt_tokens] = torch.tensor(s.prompt_token_ids)
            prompt_ids = prompt_ids.to(d)
        wants = [sp.logprobs for sp in sps if sp.logprobs is not None]

        def t(vals: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(vals, dtype=dtype).to(d, non_blocking=True)

        return SamplingMetadata(
            temperature=t(temps, torch.float32),
            all_greedy=all_greedy,
            all_random=all_random,
            top_k=t([sp.top_k if sp.top_k > 0 else vocab_size for sp in sps], torch.int64)
            if use_top_k
            else None,
            top_p=t([sp.top_p for sp in sps], torch.float32) if use_top_p else None,
            min_p=t([sp.min_p for sp in sps], torch.float32) if use_min_p else None,
            generators=generators,
            no_penalties=no_pen,
            presence_penalties=t([sp.presence_penalty for sp in sps], torch.float32),
            frequency_penalties=t([sp.frequency_penalty for sp in sps], torch.float32),
            repetition_penalties=t([sp.repetition_penalty for sp in sps], torch.float32),
            prompt_token_ids=prompt_ids,
            output_token_ids=[s.output_token_ids for s in states],
            min_tokens_stop_ids=min_tok,
            max_num_logprobs=max(wants) if wants else None,
        )


def _needs_prompt_logprobs(st: CachedRequestState) -> bool:
    return (
        st.sampling_params.prompt_logprobs is not None
        and st.prompt_logprobs_done < st.num_prompt_tokens - 1
    )


def _logprobs_to_lists(lp: LogprobsTensors) -> list[TokenLogprobs]:
    ids = lp.logprob_token_ids.tolist()
    vals = lp.logprobs.tolist()
    ranks = lp.selected_token_ranks.tolist()
    out: list[TokenLogprobs] = []
    for row_ids, row_vals, rank in zip(ids, vals, ranks):
        entry = [(row_ids[0], row_vals[0], int(rank))]
        entry += [(t, v, r + 1) for r, (t, v) in enumerate(zip(row_ids[1:], row_vals[1:]))]
        out.append(entry)
    return out
