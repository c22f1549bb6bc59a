"""The engine core: scheduler + model runner, one step at a time.

``step()`` is the hot loop body: schedule -> execute -> update. It never tokenizes,
detokenizes or touches the network; the offline ``LLMEngine`` calls it in-process and
the API server runs it in its own process (``core_proc``).

With async scheduling (``EngineConfig.async_scheduling``; on by default on CUDA) a step
is: schedule N + 1, launch it on the device (``execute_model_async``, no waiting), then
read back step N and update the scheduler with it. The device runs N + 1 while the host
does N's bookkeeping, the caller's output processing and N + 2's scheduling; outputs
come one ``step()`` later than without it, and are otherwise identical.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

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
from kvasir.engine.messages import EngineCoreRequest
from kvasir.worker.async_output import AsyncModelRunnerOutput

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
    def __init__(self, config: EngineConfig, log: bool = True) -> None:
        from kvasir.models.loader import load_arch_config
        from kvasir.worker.model_runner import ModelRunner

        t0 = time.perf_counter()
        arch = load_arch_config(config.model_config)
        max_len = resolve_max_model_len(config.model_config.max_model_len, arch)
        config = replace(
            config,
            scheduler_config=replace(config.scheduler_config, max_model_len=max_len),
        )
        self.config = config
        self.arch_config = arch
        self.runner = ModelRunner(config, arch)
        num_blocks = self.runner.determine_num_blocks()
        self.runner.initialize_kv_cache(num_blocks)
        bs = config.cache_config.block_size
        async_scheduling = config.async_scheduling
        if async_scheduling is None:
            async_scheduling = self.runner.device.type == "cuda"
        self.async_scheduling = async_scheduling
        self.scheduler = Scheduler(
            config.scheduler_config, config.cache_config, num_blocks, async_scheduling
        )
        # Async scheduling: the launched step whose output has not been read back.
        self._in_flight: tuple[SchedulerOutput, AsyncModelRunnerOutput] | None = None
        self.startup_time = time.perf_counter() - t0
        self.model_info = ModelInfo(
            model_name=config.model_config.served_model_name or config.model_config.model,
            vocab_size=arch.vocab_size,
            max_model_len=max_len,
            eos_token_ids=list(arch.eos_token_id),
            block_size=bs,
            num_gpu_blocks=num_blocks,
            device=str(self.runner.device),
            dtype=str(self.runner.dtype).removeprefix("torch."),
            attention_backend=self.runner.attn_backend_name,
        )
        if log:
            # Block 0 is the scheduler's reserved null block: report what requests can use.
            usable = self.scheduler.kv_cache_manager.num_usable_blocks
            tokens = usable * bs
            msg = (
                f"kvasir: KV cache {usable} blocks x {bs} tokens = {tokens} tokens "
                f"({num_blocks * self.runner.kv_bytes_per_block() / 2**30:.2f} GiB, "
                f"{self.runner.dtype}); max concurrency at max_model_len={max_len}: "
                f"{tokens / max_len:.2f}x; device {self.runner.device}, attention "
                f"{self.runner.attn_backend_name}; start-up {self.startup_time:.1f}s"
            )
            logger.info(msg)

    def add_request(self, req: EngineCoreRequest) -> None:
        """Raises ValueError for a request that can never run (too long for
        max_model_len or the KV cache) or when the waiting queue is full."""
        request = Request(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling_params=req.sampling_params,
            eos_token_ids=tuple(req.eos_token_ids),
            arrival_time=req.arrival_time or None,
            priority=req.priority,
            cache_salt=req.cache_salt,
            fork_of=req.fork_of,
        )
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def step(self) -> tuple[list[EngineCoreOutput], SchedulerStats]:
        if self.async_scheduling:
            return self._step_async()
        if not self.scheduler.has_unfinished_requests():
            return self._take_aborted(), self.scheduler.make_stats()
        so = self.scheduler.schedule()
        # Even an empty step goes to the runner: it drops finished requests' state.
        mro = self.runner.execute_model(so)
        outputs = self._take_aborted() + self.scheduler.update_from_output(so, mro)
        return outputs, self.scheduler.make_stats()

    def _step_async(self) -> tuple[list[EngineCoreOutput], SchedulerStats]:
        """Launch step N + 1, then read back step N (see the module docstring)."""
        sched = self.scheduler
        so, launched = None, None
        if sched.has_unfinished_requests():
            so = sched.schedule()
            # Even an empty step goes to the runner: it drops finished requests' state.
            launched = self.runner.execute_model_async(so)
        outputs = self._take_aborted()
        if self._in_flight is not None:
            prev_so, prev = self._in_flight
            self._in_flight = None
            outputs += sched.update_from_output(prev_so, prev.get_output())
        if so is not None:
            if launched is None:
                empty = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
                outputs += sched.update_from_output(so, empty)
            else:
                self._in_flight = (so, launched)
        return outputs, sched.make_stats()

    def _take_aborted(self) -> list[EngineCoreOutput]:
        take = getattr(self.scheduler, "take_aborted_outputs", None)
        return take() if take is not None else []

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def reset_prefix_cache(self) -> None:
        self.scheduler.kv_cache_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        self._in_flight = None
        self.runner.kv_caches = []
