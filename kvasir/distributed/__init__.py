"""Tensor and pipeline parallelism: the parallel state passed to the model and runner,
its collectives, and the start-up checks of a split against the model."""

from kvasir.distributed.parallel_state import (
    GroupCoordinator,
    IntermediateTensors,
    ParallelState,
    init_parallel_state,
    single_process_state,
)
from kvasir.distributed.utils import stage_layers, validate_parallel_config

__all__ = [
    "IntermediateTensors",
    "GroupCoordinator",
    "ParallelState",
    "init_parallel_state",
    "single_process_state",
    "stage_layers",
    "validate_parallel_config",
]
