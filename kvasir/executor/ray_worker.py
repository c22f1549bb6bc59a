"""The rank inside a Ray actor of the Ray executor (``kvasir.executor.ray_executor``):
a ``Worker`` behind calls that take and return msgpack bytes or plain values."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import msgspec
import ray

from kvasir.config import EngineConfig, ModelArchConfig
from kvasir.core.kv_cache_spec import spec_to_dict
from kvasir.core.outputs import SchedulerOutput
from kvasir.distributed.parallel_state import loopback_ifname
from kvasir.executor.worker import Worker


class NodeInfo(msgspec.Struct):
    """Where an actor runs: its Ray node, that node's IP, the cores it may use, its pid."""

    node_id: str
    ip: str
    num_cpus: int
    pid: int


class RayWorkerActor:
    """One rank inside a Ray actor (``ray.remote`` wraps it at start-up).

    ``node_info`` and ``free_port`` come first (before the ranks know where rank 0
    is), then ``init_worker`` on every rank at once (they rendezvous), then the
    ``Worker`` calls. Arguments and results are msgpack bytes or plain values.
    """

    def __init__(self, rank: int, log_level: int) -> None:
        self.rank = rank
        self.worker: Worker | None = None
        logging.basicConfig(
            level=log_level,
            format=f"%(asctime)s %(levelname)s worker{rank} %(name)s: %(message)s",
        )
        self._so_dec = msgspec.msgpack.Decoder(SchedulerOutput)
        self._enc = msgspec.msgpack.Encoder()

    def node_info(self) -> bytes:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        ctx = ray.get_runtime_context()
        info = NodeInfo(ctx.get_node_id(), ray.util.get_node_ip_address(), cpus, os.getpid())
        return self._enc.encode(info)

    def free_port(self) -> int:
        """A free TCP port on this host, for rank 0's rendezvous (picked here, not by
        the engine: the engine may not be on rank 0's host)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def init_worker(
        self,
        config: bytes,
        arch: bytes,
        init_method: str,
        num_threads: int,
        one_host: bool,
    ) -> bytes:
        import torch

        # Ray gives an actor of one CPU OMP_NUM_THREADS=1; give it its share of the host.
        torch.set_num_threads(num_threads)
        # gloo otherwise picks the interface its hostname resolves to, which may not
        # exist in a container: loopback on one host, else the one holding this node's IP.
        ifname = loopback_ifname() if one_host else _ifname_of(ray.util.get_node_ip_address())
        if ifname is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
        engine_config = msgspec.msgpack.decode(config, type=EngineConfig)
        arch_config = msgspec.msgpack.decode(arch, type=ModelArchConfig)
        # Under Ray a GPU actor sees only its own GPU (CUDA_VISIBLE_DEVICES), so
        # ``rank_device`` resolves every rank to cuda:0 (rank % 1).
        self.worker = Worker(engine_config, arch_config, self.rank, init_method)
        return self._enc.encode(self.worker.info)

    def determine_num_blocks(self) -> int:
        assert self.worker is not None
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> list[dict[str, Any]]:
        assert self.worker is not None
        kv_cache_config = self.worker.initialize_kv_cache(num_blocks)
        return [spec_to_dict(s) for s in kv_cache_config.layer_specs]

    def execute_model(self, so: bytes) -> bytes | None:
        """One step; msgpack of the ``ModelRunnerOutput`` on the output rank, None
        elsewhere and for a step with no tokens."""
        assert self.worker is not None
        out = self.worker.execute_model(self._so_dec.decode(so))
        return None if out is None else self._enc.encode(out)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None


def _ifname_of(ip: str) -> str | None:
    """The network interface that holds ``ip`` on this host (for gloo across hosts)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return None
