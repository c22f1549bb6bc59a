"""The executor: between the engine core and the workers that run the model.

``EngineCore`` only ever talks to an ``Executor``: it asks every rank how many KV blocks
fit (the executor answers with the minimum, so all ranks agree), allocates them, then
hands it one ``SchedulerOutput`` per step. The executor delivers the step to every
rank and returns the sampled tokens of the output rank (the last pipeline stage's
TP rank 0). Backends: ``uni`` (one rank, in this process), ``mp`` (one process per rank
on this host) and ``ray`` (Ray actors in a placement group, across hosts).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

from kvasir.config import EngineConfig, ModelArchConfig
from kvasir.core.kv_cache_spec import KVCacheConfig
from kvasir.core.outputs import ModelRunnerOutput, SchedulerOutput
from kvasir.executor.worker import WorkerInfo


class PendingOutput(Protocol):
    """A launched step; ``get_output`` waits for it. Steps are read in launch order."""

    def get_output(self) -> ModelRunnerOutput: ...


class PendingStep:
    """A step launched on worker processes: ``get_output`` has the executor read the
    output rank's replies, in launch order, up to this one (``_wait_for``)."""

    def __init__(self, wait_for: Callable[[PendingStep], None]) -> None:
        self._wait_for = wait_for
        self.output: ModelRunnerOutput | None = None

    def get_output(self) -> ModelRunnerOutput:
        if self.output is None:
            self._wait_for(self)
        assert self.output is not None
        return self.output


class WorkerDiedError(RuntimeError):
    """A worker exited, failed or stopped answering: the engine cannot go on (its
    requests' state lives in every rank). The engine core reports itself dead."""


class Executor(ABC):
    """Runs the model on ``parallel_config.world_size`` ranks.

    Contract: ``determine_num_blocks`` then ``initialize_kv_cache`` once, before any
    step; ``execute_model_async`` may be called again before earlier steps are read
    (up to ``max_concurrent_batches`` in flight); outputs come back in launch order.
    Any worker failure raises ``WorkerDiedError`` from the next call that waits.
    """

    def __init__(self, config: EngineConfig, arch: ModelArchConfig) -> None:
        self.config = config
        self.arch = arch
        pc = config.parallel_config
        self.world_size = pc.world_size
        self.timeout = pc.distributed_timeout  # seconds a collective or a reply may take
        # Steps that may be in flight at once: one per pipeline stage.
        self.max_concurrent_batches = pc.pipeline_parallel_size
        # The rank whose sampled tokens come back: the last stage's TP rank 0.
        self.output_rank = (pc.pipeline_parallel_size - 1) * pc.tensor_parallel_size

    @property
    @abstractmethod
    def info(self) -> WorkerInfo: ...

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks that fit on every rank (the minimum over ranks)."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> KVCacheConfig | None:
        """Allocate ``num_blocks`` on every rank; the in-process rank's
        ``KVCacheConfig`` (its layers' specs) where the executor has one."""

    @abstractmethod
    def execute_model_async(self, so: SchedulerOutput) -> PendingOutput | None:
        """Launch one step; None when the runner has nothing to run (no tokens)."""

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        pending = self.execute_model_async(so)
        if pending is None:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        return pending.get_output()

    def shutdown(self) -> None:  # noqa: B027
        """Stop the workers and free the KV cache (idempotent)."""


def get_executor_cls(backend: str) -> type[Executor]:
    if backend == "uni":
        from kvasir.executor.uniproc import UniProcExecutor

        return UniProcExecutor
    if backend == "mp":
        from kvasir.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor
    if backend == "ray":
        from kvasir.executor.ray_executor import RayExecutor

        return RayExecutor
    raise ValueError(f"distributed_executor_backend must be 'uni', 'mp' or 'ray', got {backend!r}")
