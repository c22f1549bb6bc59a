"""The engine core: scheduler + executor, one step at a time.

``step()`` is the hot loop body: schedule -> execute -> update. It never tokenizes,
detokenizes or touches the network; the offline ``LLMEngine`` calls it in-process and
the API server runs it in its own process (``core_proc``). The executor
(``kvasir.executor``) runs the model on one rank in this process or on one worker per
rank (tensor x pipeline parallelism).

With async scheduling (``EngineConfig.async_scheduling``; on by default on CUDA) a step
is: schedule N + 1, launch it on the device (``execute_model_async``, no waiting), then
read back step N and update the scheduler with it. The device runs N + 1 while the host
does N's bookkeeping, the caller's output processing and N + 2's scheduling; outputs
come one ``step()`` later than without it, and are otherwise identical. With pipeline
parallelism up to one step per stage is in flight the same way (see
``_step_pipelined``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

import msgspec

from kvasir.config import EngineConfig, ModelArchConfig
from kvasir.core.outputs import (
    EngineCoreOutput,
    ModelRunnerOutput,
    SchedulerOutput,
    SchedulerStats,
)
from kvasir.core.request import Request
from kvasir.core.scheduler import Scheduler
from kvasir.core.step_time import StepTimeModel
from kvasir.engine.messages import EngineCoreRequest
from kvasir.engine.step_stats import StepStats, make_step_stats
from kvasir.executor.base import PendingOutput
from kvasir.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvasir.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


class ModelInfo(msgspec.Struct):
    """What clients of the core need to know about the loaded model."""

    model_name: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    block_size: int
    num_gpu_blocks: int
    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "torch"
    hidden_size: int = 0  # the length of a pooled (embedding) vector
    # Multi-LoRA (enabled): the modules an adapter may target, HF name -> [in, out],
    # so the server can check an adapter before registering it; the largest rank.
    lora_module_shapes: dict[str, list[int]] = {}
    max_lora_rank: int = 0


def _num_local_gpus(config: EngineConfig) -> int | None:
    """CUDA GPUs the "mp" executor can give one rank each (None: not a limit)."""
    if config.parallel_config.executor_backend != "mp" or config.device_config.device == "cpu":
        return None
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return None  # a CPU run ("auto" without a GPU)
    return n


def resolve_max_model_len(user_value: int | None, arch: ModelArchConfig) -> int:
    if user_value is None:
        return arch.max_position_embeddings
    if user_value > arch.max_position_embeddings:
        raise ValueError(
            f"max_model_len ({user_value}) must be <= the model's max_position_embeddings "
            f"({arch.max_position_embeddings})"
        )
    return user_value


class EngineCore:
    """Owns the scheduler and the executor; ``step()`` runs one schedule -> execute ->
    update round and returns the outputs of requests that got tokens or finished.

    Contract: single-threaded; ``add_request`` raises ValueError for a request that can
    never run and leaves everything else untouched; ``step()`` never blocks on anything
    but the device (or the workers). A worker failure raises ``WorkerDiedError`` from
    ``step()``: the engine is then dead (its requests' state lived on the workers) and
    its owner must fail every in-flight request (the server exits non-zero).
    """

    def __init__(
        self, config: EngineConfig, log: bool = True, kv_cache_metrics_sample: float = 0.0
    ) -> None:
        from kvasir.distributed import validate_parallel_config
        from kvasir.executor.base import get_executor_cls
        from kvasir.models.loader import load_arch_config

        t0 = time.perf_counter()
        arch = load_arch_config(config.model_config)
        max_len = resolve_max_model_len(config.model_config.max_model_len, arch)
        pc = config.parallel_config
        validate_parallel_config(pc, arch, _num_local_gpus(config))
        async_scheduling = config.async_scheduling
        if pc.pipeline_parallel_size > 1:
            if async_scheduling:
                raise ValueError(
                    "--async-scheduling cannot be combined with --pipeline-parallel-size > 1 "
                    "(the pipeline keeps one step per stage in flight instead)"
                )
            async_scheduling = False
        spec = config.speculative_config
        if spec is not None:
            if pc.pipeline_parallel_size > 1 and spec.method != "ngram":
                raise ValueError(
                    f"speculative_config.method {spec.method!r} needs the whole model on "
                    "one pipeline stage; with --pipeline-parallel-size > 1 use 'ngram'"
                )
            if async_scheduling:
                # The accepted count of step N decides step N + 1's positions.
                logger.info("speculative decoding: steps run without async scheduling")
            async_scheduling = False
        config = replace(
            config,
            scheduler_config=replace(config.scheduler_config, max_model_len=max_len),
        )
        self.config = config
        self.arch_config = arch
        self.executor = get_executor_cls(pc.executor_backend)(config, arch)
        try:
            num_blocks = self.executor.determine_num_blocks()
            kv_cache_config = self.executor.initialize_kv_cache(num_blocks)
            self.kv_cache_config = kv_cache_config  # every layer's spec (one TP rank's share)
        except BaseException:
            self.executor.shutdown()
            raise
        # The in-process runner (uni executor only: tests and benchmarks inspect it).
        self.runner = getattr(self.executor, "runner", None)
        info = self.executor.info
        bs = config.cache_config.block_size
        if async_scheduling is None:
            async_scheduling = info.device.startswith("cuda")
        self.async_scheduling = async_scheduling
        self.scheduler = Scheduler(
            config.scheduler_config,
            config.cache_config,
            num_blocks,
            async_scheduling,
            pc.pipeline_parallel_size,
            kv_cache_config,
        )
        if spec is not None:
            self.scheduler.num_lookahead_tokens = spec.num_lookahead_tokens
        self.lora_manager = None
        if config.lora_config is not None:
            self._init_lora(config)
        sc = config.scheduler_config
        if sc.policy == "slo" or sc.target_tpot_ms is not None:
            try:
                self.scheduler.set_step_time_model(self._measure_step_time())
            except BaseException:
                self.executor.shutdown()
                raise
        # Launched steps whose outputs have not been read back, oldest first: at most
        # one with async scheduling, one per pipeline stage with pipeline parallelism.
        self._in_flight: deque[tuple[SchedulerOutput, PendingOutput]] = deque()
        self._max_in_flight = 2 if async_scheduling else self.executor.max_concurrent_batches
        self._num_kept = self._max_in_flight - 1
        # The last step's timings (read by core_proc and shipped with its outputs).
        self.last_step_stats: StepStats | None = None
        self._kv_sampler = None
        if kv_cache_metrics_sample > 0:
            from kvasir.metrics.kv_residency import KVBlockResidencySampler

            pool = self.scheduler.kv_cache_manager.block_pool
            self._kv_sampler = KVBlockResidencySampler(pool, kv_cache_metrics_sample, time.time())
        # Structured outputs: built at the first constrained request (none: no cost).
        self.structured_output: StructuredOutputManager | None = None
        self.startup_time = time.perf_counter() - t0
        self.model_info = ModelInfo(
            model_name=config.model_config.served_model_name or config.model_config.model,
            vocab_size=arch.vocab_size,
            max_model_len=max_len,
            eos_token_ids=list(arch.eos_token_id),
            block_size=bs,
            num_gpu_blocks=num_blocks,
            device=info.device,
            dtype=info.dtype,
            attention_backend=info.attention_backend,
            hidden_size=arch.hidden_size,
        )
        if self.lora_manager is not None:
            assert config.lora_config is not None
            self.model_info.lora_module_shapes = {
                k: list(v) for k, v in self.lora_manager.module_shapes.items()
            }
            self.model_info.max_lora_rank = config.lora_config.max_lora_rank
        if log:
            # Block 0 is the scheduler's reserved null block: report what requests can use.
            usable = self.scheduler.kv_cache_manager.num_usable_blocks
            tokens = usable * bs
            parallel = ""
            if pc.world_size > 1:
                parallel = (
                    f"; tensor parallel {pc.tensor_parallel_size} x pipeline parallel "
                    f"{pc.pipeline_parallel_size} ({pc.executor_backend} executor)"
                )
            from kvasir.core.kv_cache_spec import state_bytes_per_request

            specs = kv_cache_config.layer_specs if kv_cache_config is not None else ()
            state = state_bytes_per_request(specs)
            if (
                state and kv_cache_config is not None
            ):  # state-space layers: a fixed slot per request beside the KV cache
                per_token = kv_cache_config.bytes_per_block / bs
                logger.info(
                    "kvasir: state-space layers: %.1f KiB of state per request (%d slots), "
                    "KV cache %.1f KiB per token; prefix caching off",
                    state / 1024,
                    config.scheduler_config.max_num_seqs,
                    per_token / 1024,
                )
            msg = (
                f"kvasir: KV cache {usable} blocks x {bs} tokens = {tokens} tokens "
                f"({num_blocks * info.kv_bytes_per_block / 2**30:.2f} GiB per rank, "
                f"{_kv_dtype_name(self.config.cache_config.kv_cache_dtype, info.dtype)}); "
                f"max concurrency at max_model_len={max_len}: "
                f"{tokens / max_len:.2f}x; device {info.device}, attention "
                f"{info.attention_backend}{parallel}; start-up {self.startup_time:.1f}s"
            )
            logger.info(msg)

    def _init_lora(self, config: EngineConfig) -> None:
        """Multi-LoRA: the scheduler's slot table over the runner's adapter manager
        (in this process: the uni executor), and the adapters named at start-up."""
        from kvasir.core.lora_slots import LoRASlots
        from kvasir.lora.request import LoRARequest

        lc = config.lora_config
        assert lc is not None
        manager = getattr(self.runner, "lora_manager", None)
        if manager is None:
            self.executor.shutdown()
            raise ValueError(
                "enable_lora needs the single-process executor (one GPU or the CPU); "
                "LoRA over tensor/pipeline parallel workers is not supported yet"
            )
        if config.speculative_config is not None:
            self.executor.shutdown()
            raise ValueError("enable_lora cannot be combined with speculative_config yet")
        self.lora_manager = manager
        self.scheduler.lora_slots = LoRASlots(
            lc.max_loras,
            lc.lora_max_wait_steps,
            config.scheduler_config.max_num_seqs,
            is_ready=manager.is_ready,
        )
        for i, (name, path) in enumerate(lc.lora_modules):
            manager.register(LoRARequest(name, i + 1, path))

    def _measure_step_time(self) -> StepTimeModel:
        """The step-time model of ``--scheduling-policy slo`` and ``--target-tpot-ms``:
        prefill steps of a few sizes up to ``max_num_batched_tokens`` and their decode
        steps, each size run twice (the first warms up), fitted to base + per token.
        The requests are the scheduler's own (salted apart from everyone's cache) and
        leave nothing behind."""
        sched = self.scheduler
        cfg = sched.scheduler_config
        limit = min(
            cfg.max_num_batched_tokens,
            sched.max_model_len - 2,
            sched.kv_cache_manager.num_usable_blocks * sched.block_size - 2,
        )
        sizes = sorted({max(min(n, limit), 1) for n in (8, 64, 256, cfg.max_num_batched_tokens)})
        samples: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        for rnd in range(2):
            for k, size in enumerate(sizes):
                rid = f"__kvasir_step_time_{rnd}_{k}"
                params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)
                prompt = [
                    (7 * i + k) % max(self.arch_config.vocab_size - 1, 1) + 1 for i in range(size)
                ]
                sched.add_request(Request(rid, prompt, params, cache_salt=rid))
                while rid in sched.requests:
                    so = sched.schedule()
                    t1 = time.perf_counter()
                    mro = self.executor.execute_model(so)
                    dt = time.perf_counter() - t1
                    sched.update_from_output(so, mro)
                    if rnd and so.total_num_scheduled_tokens:
                        samples.append((so.total_num_scheduled_tokens, dt))
        so = sched.schedule()  # tells the runner the last one finished
        self.executor.execute_model(so)
        sched.update_from_output(so, ModelRunnerOutput(req_ids=[], sampled_token_ids=[]))
        sched.kv_cache_manager.reset_prefix_cache()
        sched.reset_policy_state()
        if len({n for n, _ in samples}) < 2:  # one size only (a tiny max_num_batched_tokens)
            n, t = samples[-1]
            model = StepTimeModel(t / 2, t / (2 * n))
        else:
            model = StepTimeModel.fit(samples)
        logger.info(
            "kvasir: step time %.2f ms + %.3f ms per token (measured in %.1f s)",
            model.base_s * 1000,
            model.per_token_s * 1000,
            time.perf_counter() - t0,
        )
        return model

    def add_request(self, req: EngineCoreRequest) -> None:
        """Raises ValueError for a request that can never run (too long for
        max_model_len or the KV cache, a bad adapter) or when the waiting queue is
        full."""
        lora_id = 0
        if req.lora_request is not None:
            if self.lora_manager is None:
                raise ValueError(
                    "lora_request: LoRA is not enabled (start the engine with enable_lora / "
                    "--enable-lora)"
                )
            self.lora_manager.register(req.lora_request)
            lora_id = req.lora_request.lora_int_id
        request = Request(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling_params=req.sampling_params,
            eos_token_ids=tuple(req.eos_token_ids),
            arrival_time=req.arrival_time or None,
            priority=req.priority,
            cache_salt=req.cache_salt,
            fork_of=req.fork_of,
            pooling_params=req.pooling_params,
            lora_id=lora_id,
            tenant=req.tenant,
            service_tier=req.service_tier,
            ttft_slo_ms=req.ttft_slo_ms,
            tpot_slo_ms=req.tpot_slo_ms,
        )
        so_params = req.sampling_params.structured_outputs
        if so_params is not None:
            request.structured_output = self._structured_outputs().add_request(
                req.request_id, so_params
            )
        try:
            self.scheduler.add_request(request)
        except ValueError:
            if so_params is not None:
                self._structured_outputs().remove_finished({req.request_id})
            raise
        if lora_id:
            assert self.lora_manager is not None
            slots = self.scheduler.lora_slots
            if slots is None or lora_id not in slots.slot_of:
                self.lora_manager.prefetch(lora_id)  # on its thread, while others run

    def _fail_lora_loads(self) -> None:
        """Abort the waiting requests of adapters whose background load failed."""
        assert self.lora_manager is not None
        failed = self.lora_manager.take_failed()
        if not failed:
            return
        ids = {lora_id for lora_id, _ in failed}
        for lora_id, err in failed:
            logger.error(
                "LoRA adapter %d could not be loaded; failing its requests: %s", lora_id, err
            )
        self.scheduler.abort_requests(
            [r.request_id for r in self.scheduler.requests.values() if r.lora_id in ids]
        )

    def _structured_outputs(self) -> StructuredOutputManager:
        if self.structured_output is None:
            from kvasir.structured_output.manager import StructuredOutputManager

            config, arch = self.config, self.arch_config
            eos = list(self.model_info.eos_token_ids)

            def make_backend():  # on the compile thread: loads the tokenizer
                from kvasir.models.loader import load_tokenizer
                from kvasir.structured_output.backend import XgrammarBackend

                tokenizer = load_tokenizer(config.model_config)
                if tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer; this model has none")
                return XgrammarBackend(tokenizer, arch.vocab_size, eos)

            self.structured_output = StructuredOutputManager(make_backend, arch.vocab_size)
        return self.structured_output

    def _schedule(self) -> SchedulerOutput:
        """``schedule()``, plus the structured-output bitmask of the step's constrained
        requests (and aborts of those whose grammar failed to compile)."""
        if self.lora_manager is not None:
            self._fail_lora_loads()
        som = self.structured_output
        if som is None or not som.num_active:
            return self.scheduler.schedule()
        failed = som.take_failed()
        if failed:
            for rid, err in failed:
                logger.error("request %s: its grammar failed to compile (%s)", rid, err)
            self.scheduler.abort_requests([rid for rid, _ in failed])
        so = self.scheduler.schedule()
        som.remove_finished(so.finished_req_ids)
        som.fill_bitmask(so, self.scheduler.requests)
        return so

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def step(self) -> tuple[list[EngineCoreOutput], SchedulerStats]:
        if self._max_in_flight > 1:
            return self._step_pipelined()
        if not self.scheduler.has_unfinished_requests():
            self.last_step_stats = None
            return self._take_aborted(), self._stats()
        start, t0 = time.time(), time.perf_counter()
        so = self._schedule()
        t1 = time.perf_counter()
        # Even an empty step goes to the runner: it drops finished requests' state.
        mro = self.executor.execute_model(so)
        t2 = time.perf_counter()
        if so.total_num_scheduled_tokens:
            self.scheduler.observe_step_time(so.total_num_scheduled_tokens, t2 - t1)
        outputs = self._take_aborted() + self.scheduler.update_from_output(so, mro)
        self._record_step(so, start, t1 - t0, t2 - t1, time.perf_counter() - t2)
        return outputs, self._stats()

    def _record_step(
        self,
        so: SchedulerOutput | None,
        start: float,
        schedule_s: float,
        execute_s: float,
        update_s: float,
    ) -> None:
        st = make_step_stats(self.scheduler, so, start, schedule_s, execute_s, update_s)
        if self._kv_sampler is not None:
            self._kv_sampler.sample(start, st)
        self.last_step_stats = st

    def _step_pipelined(self) -> tuple[list[EngineCoreOutput], SchedulerStats]:
        """Launch step N + 1, then read back the oldest launched steps until
        ``_num_kept`` stay in flight: one with async scheduling (the device runs N + 1
        while the host does N's bookkeeping), one per pipeline stage but the newest
        with pipeline parallelism. A step with nothing to launch reads one back."""
        sched = self.scheduler
        so, launched = None, None
        som = self.structured_output
        if som is not None and som.num_active and self._in_flight:
            # A grammar's bitmask needs the tokens in flight: read them back first
            # (constrained steps run without overlap).
            return self._drain_in_flight()
        start, t0 = time.time(), time.perf_counter()
        schedule_s = 0.0
        if sched.has_unfinished_requests():
            so = self._schedule()
            schedule_s = time.perf_counter() - t0
            # Even an empty step goes to the runner: it drops finished requests' state.
            launched = self.executor.execute_model_async(so)
        execute_s = time.perf_counter() - t0 - schedule_s
        update_s = 0.0
        outputs = self._take_aborted()
        if launched is not None:
            assert so is not None
            self._in_flight.append((so, launched))
            num_kept = self._num_kept
        else:
            num_kept = max(len(self._in_flight) - 1, 0)
        while len(self._in_flight) > num_kept:
            prev_so, prev = self._in_flight.popleft()
            t1 = time.perf_counter()
            mro = prev.get_output()
            t2 = time.perf_counter()
            outputs += sched.update_from_output(prev_so, mro)
            execute_s += t2 - t1
            update_s += time.perf_counter() - t2
        if so is not None and launched is None:
            empty = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
            outputs += sched.update_from_output(so, empty)
        self._record_step(so, start, schedule_s, execute_s, update_s)
        return outputs, self._stats()

    def _drain_in_flight(self) -> tuple[list[EngineCoreOutput], SchedulerStats]:
        outputs = self._take_aborted()
        while self._in_flight:
            prev_so, prev = self._in_flight.popleft()
            outputs += self.scheduler.update_from_output(prev_so, prev.get_output())
        self.last_step_stats = None
        return outputs, self._stats()

    def _stats(self) -> SchedulerStats:
        stats = self.scheduler.make_stats()
        if self.lora_manager is not None:
            sched = self.scheduler
            stats.lora_running_ids = sorted({r.lora_id for r in sched.running if r.lora_id})
            stats.lora_waiting_ids = sorted({r.lora_id for r in sched.waiting if r.lora_id})
            stats.max_loras = self.lora_manager.max_loras
            lora_stats = self.lora_manager.stats()
            if sched.lora_slots is not None:
                lora_stats["device_hits"] = sched.lora_slots.num_hits
            stats.lora_stats = lora_stats
        return stats

    def _take_aborted(self) -> list[EngineCoreOutput]:
        take = getattr(self.scheduler, "take_aborted_outputs", None)
        return take() if take is not None else []

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def reset_prefix_cache(self) -> None:
        self.scheduler.kv_cache_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        self._in_flight.clear()
        if self.lora_manager is not None:
            self.lora_manager.shutdown()
        if self.structured_output is not None:
            self.structured_output.shutdown()
        self.executor.shutdown()


def _kv_dtype_name(kv_cache_dtype: str, model_dtype: str) -> str:
    """The KV cache's element type for the start-up line."""
    if kv_cache_dtype == "auto":
        return model_dtype
    return "fp8_e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype
