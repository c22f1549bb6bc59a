"""Asyncio client of the engine-core process (see ``core_proc``).

Spawns the core, waits for its handshake, then sends requests/aborts without ever
blocking and hands output batches to one consumer coroutine. The core process's
sentinel is watched by the event loop, so its death is noticed at once.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvasir.config import EngineConfig
from kvasir.engine.core import ModelInfo
from kvasir.engine.core_proc import (
    MSG_ABORT,
    MSG_ADD,
    MSG_SHUTDOWN,
    EngineCoreHandshake,
    EngineCoreOutputs,
    run_engine_core,
)
from kvasir.engine.messages import EngineCoreAbort, EngineCoreRequest

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine-core process exited; in-flight and new requests fail with this."""


class EngineCoreClient:
    """Owns the engine-core process and the two ZeroMQ sockets to it.

    Use ``await EngineCoreClient.start(config)``; then ``add_request`` / ``abort_requests``
    (synchronous, never block) and ``await get_output()`` from a single consumer.
    ``on_dead`` is called once, from the event loop, if the process exits unexpectedly.
    """

    def __init__(self, config: EngineConfig, on_dead: Callable[[int | None], None]) -> None:
        self.config = config
        self._on_dead = on_dead
        self._ipc_dir = tempfile.mkdtemp(prefix="kvasir-")
        self.input_addr = f"ipc://{self._ipc_dir}/input"
        self.output_addr = f"ipc://{self._ipc_dir}/output"
        self._sync_ctx = zmq.Context()
        self._input = self._sync_ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)  # queue rather than block or drop
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(self.input_addr)
        self._ctx = zmq.asyncio.Context()
        self._output = self._ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(self.output_addr)
        # Owner-only (the directory already is, from mkdtemp): no other local user can
        # connect and inject requests, or read outputs.
        for name in ("input", "output"):
            os.chmod(os.path.join(self._ipc_dir, name), 0o600)
        self._decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._encoder = msgspec.msgpack.Encoder()
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.model_info: ModelInfo | None = None
        self.dead = False
        self._closing = False

    @classmethod
    async def start(
        cls,
        config: EngineConfig,
        on_dead: Callable[[int | None], None],
        log_level: str = "INFO",
        kv_cache_metrics_sample: float = 0.0,
    ) -> EngineCoreClient:
        """Spawn the core and wait until the model is loaded. Raises RuntimeError with
        the core's message if start-up fails. ``kv_cache_metrics_sample`` > 0 samples
        that fraction of KV blocks for residency metrics (``kvasir.metrics.kv_residency``)."""
        self = cls(config, on_dead)
        try:
            await self._spawn(log_level, kv_cache_metrics_sample)
        except BaseException:
            self.shutdown(timeout=0.5)  # still loading: nothing to finish
            raise
        return self

    async def _spawn(self, log_level: str, kv_cache_metrics_sample: float = 0.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(
            target=run_engine_core,
            name="kvasir-engine-core",
            args=(
                msgspec.msgpack.encode(self.config),
                self.input_addr,
                self.output_addr,
                os.getpid(),
                log_level,
                kv_cache_metrics_sample,
            ),
            daemon=True,
        )
        self.proc.start()
        loop = asyncio.get_running_loop()
        died: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not died.done():
                died.set_result(None)

        loop.add_reader(self.proc.sentinel, on_exit)
        recv: asyncio.Future[Any] = asyncio.ensure_future(self._output.recv())
        await asyncio.wait([recv, died], return_when=asyncio.FIRST_COMPLETED)
        loop.remove_reader(self.proc.sentinel)
        if not recv.done():
            recv.cancel()
            self.proc.join(1)
            raise RuntimeError(
                f"engine core process exited during start-up (exit code {self.proc.exitcode})"
            )
        hs = msgspec.msgpack.decode(recv.result(), type=EngineCoreHandshake)
        if hs.error is not None or hs.model_info is None:
            self.proc.join(10)
            raise RuntimeError(f"engine core failed to start: {hs.error}")
        self.model_info = msgspec.msgpack.decode(hs.model_info, type=ModelInfo)
        loop.add_reader(self.proc.sentinel, self._proc_exited)

    def _proc_exited(self) -> None:
        assert self.proc is not None
        asyncio.get_running_loop().remove_reader(self.proc.sentinel)
        # The sentinel can fire a moment before the child is reaped; a short join makes
        # the exit code available (the process is already gone, so this returns at once).
        self.proc.join(1)
        self.dead = True
        if not self._closing:
            logger.error("engine core process died (exit code %s)", self.proc.exitcode)
            self._on_dead(self.proc.exitcode)

    def add_request(self, request: EngineCoreRequest) -> None:
        if self.dead:
            raise EngineDeadError("the engine core is dead")
        self._input.send_multipart((MSG_ADD, self._encoder.encode(request)), copy=False)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and not self.dead:
            msg = self._encoder.encode(EngineCoreAbort(list(request_ids)))
            self._input.send_multipart((MSG_ABORT, msg), copy=False)

    async def get_output(self) -> EngineCoreOutputs:
        """The next batch from the core (single consumer)."""
        return self._decoder.decode(await self._output.recv())

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the core (message, then terminate/kill) and remove the sockets."""
        self._closing = True
        proc = self.proc
        if proc is not None and proc.is_alive():
            try:
                self._input.send_multipart((MSG_SHUTDOWN, b""), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            proc.join(timeout)
            # The core ignores SIGTERM (see run_engine_core), so escalate straight away.
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        if proc is not None:
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except (RuntimeError, ValueError, OSError):
                pass
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        self._sync_ctx.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
