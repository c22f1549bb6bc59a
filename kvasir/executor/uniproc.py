"""One rank in the engine's own process: the runner's async outputs pass straight through."""

from __future__ import annotations

from kvasir.config import EngineConfig, ModelArchConfig
from kvasir.core.kv_cache_spec import KVCacheConfig
from kvasir.core.outputs import ModelRunnerOutput, SchedulerOutput
from kvasir.executor.base import Executor, PendingOutput
from kvasir.executor.worker import Worker, WorkerInfo


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, arch: ModelArchConfig) -> None:
        super().__init__(config, arch)
        self.worker = Worker(config, arch)
        self.runner = self.worker.runner

    @property
    def info(self) -> WorkerInfo:
        return self.worker.info

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> KVCacheConfig:
        return self.worker.initialize_kv_cache(num_blocks)

    def execute_model_async(self, so: SchedulerOutput) -> PendingOutput | None:
        return self.runner.execute_model_async(so)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(so)

    def shutdown(self) -> None:
        self.runner.kv_caches = []
