"""One rank of the engine: its parallel state and model runner, in-process or as a
worker process of the multiprocess executor.

As a process (``python -m kvasir.executor.worker``) it connects to the executor's
sockets, reports ready with the model's device and dtype, then serves typed
``WorkerRequest`` messages one at a time, in order, until told to stop. Only the
output rank (last pipeline stage, TP rank 0) answers ``execute_model``; any failure is
reported as an error reply and ends the process with status 1, so the executor fails
fast instead of waiting for a reply that never comes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any

import msgspec
import torch

from kvasir.config import EngineConfig, ModelArchConfig
from kvasir.core.kv_cache_spec import KVCacheConfig, spec_from_dict, spec_to_dict
from kvasir.core.outputs import ModelRunnerOutput, SchedulerOutput
from kvasir.distributed.parallel_state import (
    ParallelState,
    destroy_parallel_state,
    init_parallel_state,
    single_process_state,
)

logger = logging.getLogger(__name__)

_PARENT_CHECK_MS = 1000


class WorkerInfo(msgspec.Struct):
    device: str
    dtype: str
    attention_backend: str
    kv_bytes_per_block: int  # on this rank: its layers, its KV heads


class WorkerRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """``method``: "execute_model", "determine_num_blocks", "initialize_kv_cache" or
    "shutdown"."""

    method: str
    scheduler_output: SchedulerOutput | None = None
    num_blocks: int = 0


class WorkerReply(msgspec.Struct, array_like=True, omit_defaults=True):
    rank: int
    method: str
    output: ModelRunnerOutput | None = None
    value: int = 0
    info: WorkerInfo | None = None
    # initialize_kv_cache: this rank's layer specs (``kv_cache_spec.spec_to_dict``).
    layer_specs: list[dict[str, Any]] = []
    error: str | None = None


def rank_device(config: EngineConfig, world_rank: int, world_size: int) -> torch.device:
    """This rank's device: ``cuda:<rank on this host>`` on CUDA, else the CPU."""
    from kvasir.worker.model_runner import resolve_device

    device = resolve_device(config.device_config.device)
    if device.type == "cuda" and world_size > 1:
        return torch.device("cuda", world_rank % max(torch.cuda.device_count(), 1))
    return device


def model_kv_cache_config(
    num_blocks: int, stage_specs: list[list[dict[str, Any]]]
) -> KVCacheConfig:
    """The whole model's cache from each pipeline stage's layer specs (one TP rank per
    stage, in stage order): what the engine's block pool is built from."""
    specs = [spec_from_dict(d) for stage in stage_specs for d in stage]
    return KVCacheConfig(num_blocks, tuple(specs))


class Worker:
    """A rank's ``ModelRunner`` behind the executor's calls."""

    def __init__(
        self,
        config: EngineConfig,
        arch: ModelArchConfig,
        world_rank: int = 0,
        init_method: str | None = None,
    ) -> None:
        from kvasir.worker.model_runner import ModelRunner

        pc = config.parallel_config
        device = rank_device(config, world_rank, pc.world_size)
        if pc.world_size == 1:
            parallel: ParallelState = single_process_state(device)
        else:
            assert init_method is not None
            parallel = init_parallel_state(pc, world_rank, init_method, device)
        self.parallel = parallel
        self.runner = ModelRunner(config, arch, parallel)

    @property
    def info(self) -> WorkerInfo:
        r = self.runner
        return WorkerInfo(
            str(r.device),
            str(r.dtype).removeprefix("torch."),
            r.attn_backend_name,
            r.kv_bytes_per_block(),
        )

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> KVCacheConfig:
        return self.runner.initialize_kv_cache(num_blocks)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run one step; the sampled tokens on the output rank, None elsewhere and for
        a step with no tokens (which only drops finished requests' state)."""
        out = self.runner.execute_model(so)
        if not (so.num_scheduled_tokens and self.parallel.is_output_rank):
            return None
        return out

    def shutdown(self) -> None:
        self.runner.kv_caches = []
        destroy_parallel_state()


def _serve(args: argparse.Namespace) -> int:
    import zmq

    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(args.input)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 5000)
    out.connect(args.output)
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(WorkerRequest)
    rank = args.rank

    def reply(**kw: object) -> None:
        out.send(enc.encode(WorkerReply(rank=rank, **kw)))  # type: ignore[arg-type]

    worker: Worker | None = None
    try:
        with open(args.config, "rb") as f:
            config = msgspec.msgpack.decode(f.read(), type=EngineConfig)
        with open(args.arch, "rb") as f:
            arch = msgspec.msgpack.decode(f.read(), type=ModelArchConfig)
        worker = Worker(config, arch, rank, args.init_method)
        reply(method="ready", info=worker.info)
        while True:
            if not inp.poll(_PARENT_CHECK_MS):
                if os.getppid() != args.parent_pid:
                    logger.error("worker %d: the engine process died; exiting", rank)
                    return 1
                continue
            req = dec.decode(inp.recv())
            if req.method == "execute_model":
                assert req.scheduler_output is not None
                result = worker.execute_model(req.scheduler_output)
                if result is not None:
                    reply(method=req.method, output=result)
            elif req.method == "determine_num_blocks":
                reply(method=req.method, value=worker.determine_num_blocks())
            elif req.method == "initialize_kv_cache":
                kv_cache_config = worker.initialize_kv_cache(req.num_blocks)
                specs = [spec_to_dict(s) for s in kv_cache_config.layer_specs]
                reply(method=req.method, layer_specs=specs)
            elif req.method == "shutdown":
                worker.shutdown()
                reply(method=req.method)
                return 0
            else:
                raise ValueError(f"unknown worker method {req.method!r}")
    except BaseException as e:  # reported, then the process ends: the executor fails fast
        logger.error("worker %d failed:\n%s", rank, traceback.format_exc())
        try:
            reply(method="error", error=f"{type(e).__name__}: {e}")
        except Exception:
            pass
        return 1
    finally:
        out.close(linger=2000)
        inp.close(linger=0)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="kvasir worker process (started by the executor)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)s worker{args.rank} %(name)s: %(message)s",
    )
    code = _serve(args)
    # Skip interpreter clean-up: torch.distributed and CUDA teardown at exit can hang
    # once a peer is gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
