"""The engine core in its own process, talking typed msgpack over ZeroMQ.

The API server (``core_client.EngineCoreClient``) binds two sockets and spawns this
process, which connects to them:

    server  --PUSH-->  input socket   --PULL-->  core   (add / abort / shutdown)
    server  <--PULL--  output socket  <--PUSH--  core   (handshake, then output batches)

The loop never waits on the server: when requests are running it drains its input
without blocking, steps, and pushes the step's outputs; only when idle does it block
on the input socket (with a timeout, to notice a dead parent). Nothing here is pickled.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING

import msgspec

from kvasir.core.outputs import EngineCoreOutput, SchedulerStats
from kvasir.core.policies import RequestRejected
from kvasir.engine.messages import EngineCoreAbort, EngineCoreRequest
from kvasir.engine.step_stats import StepStats

if TYPE_CHECKING:
    from kvasir.engine.core import EngineCore

logger = logging.getLogger(__name__)

# Idle poll timeout: how soon an idle core notices a dead parent or a new request
# arrives (the poll returns at once on input, so this does not add latency).
_IDLE_POLL_MS = 200
_PARENT_CHECK_S = 1.0

# Input message types (first frame of a multipart message).
MSG_ADD = b"A"
MSG_ABORT = b"X"
MSG_SHUTDOWN = b"S"


class RejectedRequest(msgspec.Struct, array_like=True):
    """A request the core refused in ``add_request``; ``queue_full`` maps to HTTP 429,
    anything else to 400."""

    request_id: str
    message: str
    queue_full: bool = False
    retry_after_s: float = 0.0  # admission control's estimate (0: the server's default)


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """One message from the core: the outputs of one step and the stats after it."""

    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    rejected: list[RejectedRequest] = []
    timestamp: float = 0.0
    step_stats: StepStats | None = None  # the step's timings (None: nothing ran)


class EngineCoreHandshake(msgspec.Struct, omit_defaults=True):
    """First message from the core: the model info once loaded, or why start-up failed.
    ``model_info`` is the msgpack encoding of ``kvasir.engine.core.ModelInfo``."""

    model_info: bytes | None = None
    error: str | None = None


def _parent_alive(parent_pid: int) -> bool:
    # Re-parented (to init or a subreaper) means the parent died.
    return os.getppid() == parent_pid


class EngineCoreProc:
    """Owns an ``EngineCore`` and runs the busy loop described in the module docstring."""

    def __init__(self, input_addr: str, output_addr: str, parent_pid: int) -> None:
        import zmq

        self.core: EngineCore | None = None
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.input_socket = self.ctx.socket(zmq.PULL)
        self.input_socket.connect(input_addr)
        self.output_socket = self.ctx.socket(zmq.PUSH)
        self.output_socket.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs
        self.output_socket.setsockopt(zmq.LINGER, 2000)
        self.output_socket.connect(output_addr)
        self.poller = zmq.Poller()
        self.poller.register(self.input_socket, zmq.POLLIN)
        self._req_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        self._abort_decoder = msgspec.msgpack.Decoder(EngineCoreAbort)
        self._encoder = msgspec.msgpack.Encoder()
        self._rejected: list[RejectedRequest] = []
        self._shutdown = False

    def start(self, config_bytes: bytes, kv_cache_metrics_sample: float = 0.0) -> bool:
        """Load the model and send the handshake (or the start-up error)."""
        from kvasir.config import EngineConfig
        from kvasir.engine.core import EngineCore

        try:
            config = msgspec.msgpack.decode(config_bytes, type=EngineConfig)
            self.core = EngineCore(config, kv_cache_metrics_sample=kv_cache_metrics_sample)
            hs = EngineCoreHandshake(model_info=msgspec.msgpack.encode(self.core.model_info))
        except Exception as e:  # reported to the server, which exits with the message
            logger.error("engine core failed to start:\n%s", traceback.format_exc())
            hs = EngineCoreHandshake(error=f"{type(e).__name__}: {e}")
        self.output_socket.send(self._encoder.encode(hs))
        return hs.error is None

    def _handle_input(self, frames: list[bytes]) -> None:
        """One input message. Anything malformed (wrong frame count, bytes that are not
        the typed struct) is dropped and logged: it is never executed and never stops
        the loop."""
        assert self.core is not None
        kind = frames[0] if frames else b""
        if kind in (MSG_ADD, MSG_ABORT) and len(frames) != 2:
            logger.error("engine core: dropped a %r message with %d frames", kind, len(frames))
            return
        try:
            self._dispatch(kind, frames)
        except msgspec.DecodeError as e:  # ValidationError included
            logger.error("engine core: dropped a malformed %r message: %s", kind, e)

    def _dispatch(self, kind: bytes, frames: list[bytes]) -> None:
        assert self.core is not None
        if kind == MSG_ADD:
            req = self._req_decoder.decode(frames[1])
            try:
                self.core.add_request(req)
            except RequestRejected as e:  # admission control: 429 with its Retry-After
                self._rejected.append(
                    RejectedRequest(req.request_id, str(e), True, e.retry_after_s)
                )
            except ValueError as e:
                msg = str(e)
                self._rejected.append(
                    RejectedRequest(req.request_id, msg, queue_full="queue is full" in msg)
                )
        elif kind == MSG_ABORT:
            self.core.abort_requests(self._abort_decoder.decode(frames[1]).request_ids)
        elif kind == MSG_SHUTDOWN:
            self._shutdown = True
        else:
            logger.error("engine core: dropped a message of unknown type %r", kind[:32])

    def _drain_input(self, timeout_ms: int) -> bool:
        """Handle every queued input message; wait up to ``timeout_ms`` for the first.
        Returns whether anything arrived."""
        import zmq

        got = False
        while not self._shutdown and self.poller.poll(timeout_ms):
            self._handle_input(self.input_socket.recv_multipart(flags=zmq.NOBLOCK))
            got = True
            timeout_ms = 0
        return got

    def run_busy_loop(self) -> None:
        core = self.core
        assert core is not None
        last_parent_check = time.monotonic()
        while True:
            busy = core.has_unfinished_requests()
            got = self._drain_input(0 if busy else _IDLE_POLL_MS)
            if self._shutdown:
                return
            now = time.monotonic()
            if now - last_parent_check > _PARENT_CHECK_S:
                last_parent_check = now
                if not _parent_alive(self.parent_pid):
                    logger.error("engine core: parent process died; exiting")
                    return
            if not (busy or got):
                continue
            # After an input with nothing to run (aborts, rejections) step() returns at
            # once with fresh stats, so the server's gauges still move.
            outputs, stats = core.step()
            rejected, self._rejected = self._rejected, []
            msg = EngineCoreOutputs(outputs, stats, rejected, time.time(), core.last_step_stats)
            self.output_socket.send(self._encoder.encode(msg), copy=False)

    def close(self) -> None:
        try:
            if self.core is not None:
                self.core.shutdown()
        finally:
            self.input_socket.close(linger=0)
            self.output_socket.close()
            self.ctx.term()


def run_engine_core(
    config_bytes: bytes,
    input_addr: str,
    output_addr: str,
    parent_pid: int,
    log_level: str,
    kv_cache_metrics_sample: float = 0.0,
) -> None:
    """Process entry point: load the model, handshake, serve until shutdown.

    Exits with status 0 on a shutdown message or a dead parent, 1 on a start-up failure
    or a crash in ``step()`` (the server sees the process die and fails fast)."""
    # SIGINT (Ctrl-C reaches the whole process group) and SIGTERM (systemd and friends
    # signal every process of the unit) must not kill in-flight work: the server drains
    # and then sends MSG_SHUTDOWN; if the server dies instead we notice and exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    proc = EngineCoreProc(input_addr, output_addr, parent_pid)
    if not proc.start(config_bytes, kv_cache_metrics_sample):
        proc.close()
        sys.exit(1)
    try:
        proc.run_busy_loop()
    except BaseException:
        logger.error("engine core crashed:\n%s", traceback.format_exc())
        os._exit(1)  # no clean-up: the server fails in-flight requests on our death
    proc.close()
