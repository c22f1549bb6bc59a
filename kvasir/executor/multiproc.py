"""One worker process per rank on this host, driven over ZeroMQ with typed messages.

The executor binds one PUSH socket per worker (the step goes to every rank) and one
PULL socket all workers answer on. Messages are msgpack of typed structs
(``WorkerRequest`` / ``WorkerReply``), never pickle. Workers are plain subprocesses
(``python -m kvasir.executor.worker``), so an engine core that is itself a daemon
process can start them; each exits on its own if this process dies.

While it waits for a reply the executor watches every worker: one that exits, or
reports an error (a collective that timed out after ``--distributed-timeout`` because a
peer died, say), raises ``WorkerDiedError`` at once; so does silence for longer than
the timeout allows a step.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque

import msgspec

from kvasir.config import EngineConfig, ModelArchConfig
from kvasir.core.kv_cache_spec import KVCacheConfig
from kvasir.core.outputs import SchedulerOutput
from kvasir.distributed.parallel_state import loopback_ifname
from kvasir.executor.base import Executor, PendingOutput, PendingStep, WorkerDiedError
from kvasir.executor.worker import (
    WorkerInfo,
    WorkerReply,
    WorkerRequest,
    model_kv_cache_config,
)

logger = logging.getLogger(__name__)

_POLL_MS = 50
# Start-up (model load, KV sizing, CUDA-graph capture) may take much longer than a step.
_STARTUP_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, arch: ModelArchConfig) -> None:
        import zmq

        super().__init__(config, arch)
        self._dir = tempfile.mkdtemp(prefix="kvasir-mp-")
        self._ctx = zmq.Context()
        self._replies = self._ctx.socket(zmq.PULL)
        self._replies.bind(f"ipc://{self._dir}/replies")
        self._inputs = []
        for rank in range(self.world_size):
            s = self._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(f"ipc://{self._dir}/in{rank}")
            self._inputs.append(s)
        for name in os.listdir(self._dir):  # owner-only sockets in an owner-only dir
            os.chmod(os.path.join(self._dir, name), 0o600)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(WorkerReply)
        self._pending: deque[PendingStep] = deque()
        self._dead: str | None = None
        self._closed = False
        self.procs: list[subprocess.Popen] = []
        try:
            self._start_workers(config, arch)
            ready = self._collect("ready", _STARTUP_TIMEOUT_S)
            info = ready[0].info
            assert info is not None
            self._info = info
        except BaseException:
            self.shutdown()
            raise

    def _start_workers(self, config: EngineConfig, arch: ModelArchConfig) -> None:
        with open(f"{self._dir}/config", "wb") as f:
            f.write(msgspec.msgpack.encode(config))
        with open(f"{self._dir}/arch", "wb") as f:
            f.write(msgspec.msgpack.encode(arch))
        init_method = f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ)
        env.setdefault("GLOO_SOCKET_IFNAME", loopback_ifname())  # every rank is local
        # Each rank gets its share of the cores (torch would otherwise give every
        # process all of them and oversubscribe the CPU).
        if "OMP_NUM_THREADS" not in os.environ:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            env["OMP_NUM_THREADS"] = str(max(1, cpus // self.world_size))
        level = logging.getLevelName(logging.getLogger("kvasir").getEffectiveLevel())
        for rank in range(self.world_size):
            cmd = [
                sys.executable, "-m", "kvasir.executor.worker",
                "--rank", str(rank), "--init-method", init_method,
                "--input", f"ipc://{self._dir}/in{rank}",
                "--output", f"ipc://{self._dir}/replies",
                "--config", f"{self._dir}/config", "--arch", f"{self._dir}/arch",
                "--parent-pid", str(os.getpid()), "--log-level", str(level),
            ]  # fmt: skip
            self.procs.append(subprocess.Popen(cmd, env=env))

    @property
    def info(self) -> WorkerInfo:
        return self._info

    # ------------------------------------------------------------------ messaging
    def _send_all(self, req: WorkerRequest) -> None:
        self._check_alive()
        data = self._enc.encode(req)
        for s in self._inputs:
            s.send(data)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        for rank, p in enumerate(self.procs):
            code = p.poll()
            if code is not None:
                self._fail(f"worker process of rank {rank} exited with status {code}")

    def _fail(self, why: str) -> None:
        self._dead = why
        logger.error("executor: %s; the engine stops", why)
        self.shutdown()
        raise WorkerDiedError(why)

    def _recv(self, deadline: float) -> WorkerReply:
        while True:
            if self._replies.poll(_POLL_MS):
                reply = self._dec.decode(self._replies.recv())
                if reply.error is not None:
                    self._fail(f"worker of rank {reply.rank} failed: {reply.error}")
                return reply
            self._check_alive()
            if time.monotonic() > deadline:
                self._fail(f"no reply from the workers within {deadline - self._t0:.0f}s")

    def _collect(self, method: str, timeout: float) -> list[WorkerReply]:
        """One reply of ``method`` from every rank, in rank order."""
        self._t0 = time.monotonic()
        deadline = self._t0 + timeout
        got: dict[int, WorkerReply] = {}
        while len(got) < self.world_size:
            reply = self._recv(deadline)
            assert reply.method == method, (reply.method, method)
            got[reply.rank] = reply
        return [got[r] for r in range(self.world_size)]

    # ------------------------------------------------------------------ executor
    def determine_num_blocks(self) -> int:
        self._send_all(WorkerRequest("determine_num_blocks"))
        counts = [r.value for r in self._collect("determine_num_blocks", _STARTUP_TIMEOUT_S)]
        return min(counts)

    def initialize_kv_cache(self, num_blocks: int) -> KVCacheConfig:
        self._send_all(WorkerRequest("initialize_kv_cache", num_blocks=num_blocks))
        replies = self._collect("initialize_kv_cache", _STARTUP_TIMEOUT_S)
        tp = self.config.parallel_config.tensor_parallel_size
        # Each pipeline stage's layers once (its TP rank 0), in stage order.
        return model_kv_cache_config(num_blocks, [r.layer_specs for r in replies[::tp]])

    def execute_model_async(self, so: SchedulerOutput) -> PendingOutput | None:
        self._send_all(WorkerRequest("execute_model", scheduler_output=so))
        if not so.num_scheduled_tokens:
            return None  # the workers only drop finished requests' state; no reply
        pending = PendingStep(self._wait_for)
        self._pending.append(pending)
        return pending

    def _wait_for(self, target: PendingStep) -> None:
        # The output rank answers steps in launch order; a step's deadline runs from
        # when the one before it was answered.
        while target.output is None:
            self._t0 = time.monotonic()
            # A step may queue behind up to max_concurrent_batches others.
            reply = self._recv(self._t0 + self.timeout * (1 + len(self._pending)))
            assert reply.method == "execute_model" and reply.output is not None
            self._pending.popleft().output = reply.output

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._dead is None and all(p.poll() is None for p in self.procs):
            try:
                data = self._enc.encode(WorkerRequest("shutdown"))
                for s in self._inputs:
                    s.send(data)
            except Exception:
                pass
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
        for s in self._inputs:
            s.close(linger=0)
        self._replies.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
