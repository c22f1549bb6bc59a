"""One Ray actor per rank, placed by a placement group: tensor x pipeline parallelism
across hosts.

Start-up: join the Ray cluster this process is already part of, the one ``RAY_ADDRESS``
names, or the one ``ray start`` left on this machine; without any, start a local one
(and stop it again at shutdown). Then reserve one bundle per rank (``{"GPU": 1,
"CPU": 1}`` on CUDA, ``{"CPU": 1}`` on the CPU) with the ``PACK`` strategy (as few hosts
as possible, but several when one cannot hold them all), start one actor in each bundle,
and have each build its rank's ``Worker``. Rank 0's actor picks the torch.distributed
port on its own host and the ranks rendezvous at that host's address.

Messages: the executor sends msgpack bytes of ``SchedulerOutput`` and the output rank
answers msgpack bytes of ``ModelRunnerOutput``; Ray only ever carries bytes, ints and
strings of ours, never pickled objects. An actor runs its calls one at a time in
submission order, so every rank sees the steps in launch order.

While it waits for a step the executor watches every rank's call of that step (and of
the empty steps before it): a rank whose actor died or whose call raised (a collective
that timed out because a peer died, say) raises ``WorkerDiedError`` at once; so does no
answer within the timeout a step allows.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import replace
from typing import Any

import msgspec

try:
    import ray
except ImportError as e:  # an optional dependency: only this backend needs it
    raise ImportError("--distributed-executor-backend ray needs Ray: pip install ray") from e
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kvasir.config import DeviceConfig, EngineConfig, ModelArchConfig
from kvasir.core.kv_cache_spec import KVCacheConfig
from kvasir.core.outputs import ModelRunnerOutput, SchedulerOutput
from kvasir.executor.base import Executor, PendingOutput, PendingStep, WorkerDiedError
from kvasir.executor.ray_worker import NodeInfo, RayWorkerActor
from kvasir.executor.worker import WorkerInfo, model_kv_cache_config

logger = logging.getLogger(__name__)

# Start-up (model load, KV sizing, CUDA-graph capture) may take much longer than a step.
_STARTUP_TIMEOUT_S = 600.0
# How long shutdown waits for the actors to leave their process groups before killing them.
_SHUTDOWN_TIMEOUT_S = 5.0


class _Pending(PendingStep):
    def __init__(self, executor: RayExecutor, refs: list[ray.ObjectRef]) -> None:
        super().__init__(executor._wait_for)
        self.refs = refs  # every rank's call of this step, in rank order


def _ray_start_address() -> str | None:
    """The address ``ray start`` recorded on this machine, if any (what
    ``ray.init()`` itself would connect to)."""
    try:
        from ray._private.utils import read_ray_address
    except ImportError:
        return None
    try:
        return read_ray_address()
    except Exception:
        return None


class RayExecutor(Executor):
    """``parallel_config.world_size`` ranks as Ray actors, one per placement-group
    bundle; world rank ``r`` lives in bundle ``r``.

    Contract (beyond ``Executor``'s): every rank receives every step, empty ones too,
    in launch order; ``get_output`` of a step waits for the output rank (world rank
    ``(pp_size - 1) * tp_size``) at most ``distributed_timeout * (1 + steps in
    flight)`` seconds and raises ``WorkerDiedError`` (naming the rank) as soon as any
    rank's actor dies or a call of it fails. ``shutdown`` is idempotent and stops Ray
    only if this executor started it.
    """

    def __init__(self, config: EngineConfig, arch: ModelArchConfig) -> None:
        super().__init__(config, arch)
        self._enc = msgspec.msgpack.Encoder()
        self._pending: deque[_Pending] = deque()
        # Calls not waited for yet (the ranks' parts of empty steps and of read steps):
        # each wait looks at them too, so a failure there is not missed.
        self._unchecked: list[ray.ObjectRef] = []
        self._rank_of: dict[ray.ObjectRef, int] = {}
        self._dead: str | None = None
        self._closed = False
        self.actors: list[Any] = []
        self.node_infos: list[NodeInfo] = []
        self._pg: PlacementGroup | None = None
        self._owns_ray = False
        try:
            self._connect()
            self._start_actors(config, arch)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ start-up
    def _connect(self) -> None:
        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS") or _ray_start_address():
            ray.init(address="auto", logging_level="warning")
            logger.info(
                "ray executor: joined the Ray cluster at %s", ray.get_runtime_context().gcs_address
            )
            return
        # A local cluster of this host: enough logical CPUs for one bundle per rank
        # (they are scheduling slots; each actor's threads are set below).
        num_cpus = max(os.cpu_count() or 1, self.world_size)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level="warning",
            log_to_driver=False,
        )
        self._owns_ray = True
        logger.info("ray executor: started a local Ray cluster (%d CPUs)", num_cpus)

    def _use_gpu(self, config: EngineConfig) -> bool:
        device = config.device_config.device
        if device == "auto":
            return ray.cluster_resources().get("GPU", 0) > 0
        return device == "cuda"

    def _start_actors(self, config: EngineConfig, arch: ModelArchConfig) -> None:
        pc = config.parallel_config
        use_gpu = self._use_gpu(config)
        # Every actor resolves the same device, whatever its host has.
        config = replace(config, device_config=DeviceConfig("cuda" if use_gpu else "cpu"))
        bundle = {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": 1.0}
        self._pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        if not self._pg.wait(timeout_seconds=self.timeout):
            have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            raise RuntimeError(
                f"the Ray cluster cannot place --tensor-parallel-size "
                f"{pc.tensor_parallel_size} x --pipeline-parallel-size "
                f"{pc.pipeline_parallel_size} = {self.world_size} ranks of {bundle} each "
                f"within --distributed-timeout {self.timeout:g}s (available: {have}); "
                f"add hosts with `ray start --address <head-ip>:6379` or use fewer ranks"
            )
        actor_cls = ray.remote(RayWorkerActor)
        level = logging.getLogger("kvasir").getEffectiveLevel()
        env = {k: v for k, v in os.environ.items() if k.startswith("KVASIR_")}
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=rank
            )
            options: dict[str, Any] = {
                "num_cpus": 1,
                "num_gpus": 1 if use_gpu else 0,
                "scheduling_strategy": strategy,
                "max_concurrency": 1,  # calls run one at a time, in submission order
            }
            if env:
                options["runtime_env"] = {"env_vars": env}
            self.actors.append(actor_cls.options(**options).remote(rank, level))

        dec = msgspec.msgpack.Decoder(NodeInfo)
        infos = self._gather([a.node_info.remote() for a in self.actors], self.timeout, "start")
        self.node_infos = [dec.decode(b) for b in infos]
        (port,) = self._gather([self.actors[0].free_port.remote()], self.timeout, "start")
        nodes = [n.node_id for n in self.node_infos]
        one_host = len(set(nodes)) == 1
        tp = pc.tensor_parallel_size
        for stage in range(pc.pipeline_parallel_size):
            ips = sorted({n.ip for n in self.node_infos[stage * tp : (stage + 1) * tp]})
            if len(ips) > 1:
                logger.warning(
                    "ray executor: the tensor-parallel group of pipeline stage %d spans "
                    "hosts %s: every layer's all-reduce crosses the network (keep "
                    "--tensor-parallel-size within one host's GPUs and spread over hosts "
                    "with --pipeline-parallel-size)",
                    stage,
                    ", ".join(ips),
                )
        host = "127.0.0.1" if one_host else self.node_infos[0].ip
        init_method = f"tcp://{host}:{port}"
        cfg = msgspec.msgpack.encode(config)
        arch_bytes = msgspec.msgpack.encode(arch)
        refs = []
        for actor, node in zip(self.actors, self.node_infos):
            # Each rank gets its share of its host's cores (unless the user set it).
            threads = os.environ.get("OMP_NUM_THREADS")
            share = max(1, node.num_cpus // nodes.count(node.node_id))
            num_threads = int(threads) if threads else share
            refs.append(
                actor.init_worker.remote(cfg, arch_bytes, init_method, num_threads, one_host)
            )
        infos = self._gather(refs, _STARTUP_TIMEOUT_S, "start")
        self._info = msgspec.msgpack.decode(infos[0], type=WorkerInfo)
        where = sorted({n.ip for n in self.node_infos})
        logger.info(
            "ray executor: %d ranks on %d host(s) %s, %s",
            self.world_size,
            len(where),
            ", ".join(where),
            self._info.device,
        )

    @property
    def info(self) -> WorkerInfo:
        return self._info

    # ------------------------------------------------------------------ waiting
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        if self._closed:
            raise WorkerDiedError("the executor was shut down")

    def _fail(self, why: str) -> None:
        self._dead = why
        logger.error("ray executor: %s; the engine stops", why)
        self.shutdown()
        raise WorkerDiedError(why)

    @staticmethod
    def _describe(e: RayError, rank: int) -> str:
        if isinstance(e, RayTaskError):
            cause = getattr(e, "cause", None)
            msg = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
            return f"worker of rank {rank} failed: {msg}"
        if isinstance(e, RayActorError):
            text = str(e).strip()
            first = text.splitlines()[0] if text else ""
            return f"the actor of rank {rank} died ({type(e).__name__}: {first})"
        return f"rank {rank}: {type(e).__name__}: {e}"

    def _root_cause(self, e: RayError, rank: int, others: list[ray.ObjectRef]) -> str:
        """What to report for a failed call: a call that raised (a collective whose
        peer went away, say) is most often the echo of another rank's death, so a
        death among the other calls, within a second, is reported first."""
        why = self._describe(e, rank)
        if not isinstance(e, RayTaskError) or not others:
            return why
        done, _ = ray.wait(others, num_returns=len(others), timeout=1.0)
        for ref in done:
            try:
                ray.get(ref, timeout=0)
            except RayActorError as death:
                return f"{self._describe(death, self._rank_of.get(ref, -1))}; then {why}"
            except RayError:
                pass
        return why

    def _wait_refs(
        self, refs: list[ray.ObjectRef], until: ray.ObjectRef | None, timeout: float, what: str
    ) -> dict[ray.ObjectRef, Any]:
        """Wait until ``until`` (None: every ref) is done, within ``timeout`` seconds,
        looking at every ref (and the unchecked ones) as each finishes: the first
        failure raises ``WorkerDiedError``. Returns the results of the refs that
        finished; the others are left unchecked, for the next wait."""
        deadline = time.monotonic() + timeout
        todo = list(refs) + self._unchecked
        self._unchecked = []
        results: dict[ray.ObjectRef, Any] = {}
        while todo and not (until is not None and until in results):
            left = deadline - time.monotonic()
            ready, todo = ray.wait(todo, num_returns=1, timeout=max(left, 0.0))
            if not ready:
                waiting = sorted({self._rank_of.get(r, -1) for r in todo})
                self._fail(f"no answer to {what} from rank(s) {waiting} within {timeout:g}s")
            for ref in ready:
                rank = self._rank_of.pop(ref, -1)
                try:
                    results[ref] = ray.get(ref, timeout=0)
                except RayError as e:
                    self._fail(self._root_cause(e, rank, todo))
        self._unchecked = todo
        return results

    def _gather(self, refs: list[ray.ObjectRef], timeout: float, what: str) -> list[Any]:
        """Every rank's result of one call, in rank order (the call went to ranks
        ``0..len(refs) - 1``)."""
        for rank, ref in enumerate(refs):
            self._rank_of[ref] = rank
        results = self._wait_refs(refs, None, timeout, what)
        return [results[r] for r in refs]

    def _call_all(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        self._check_alive()
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        for rank, ref in enumerate(refs):
            self._rank_of[ref] = rank
        return refs

    # ------------------------------------------------------------------ executor
    def determine_num_blocks(self) -> int:
        refs = self._call_all("determine_num_blocks")
        return min(self._gather(refs, _STARTUP_TIMEOUT_S, "determine_num_blocks"))

    def initialize_kv_cache(self, num_blocks: int) -> KVCacheConfig:
        refs = self._call_all("initialize_kv_cache", num_blocks)
        specs = self._gather(refs, _STARTUP_TIMEOUT_S, "initialize_kv_cache")
        tp = self.config.parallel_config.tensor_parallel_size
        # Each pipeline stage's layers once (its TP rank 0), in stage order.
        return model_kv_cache_config(num_blocks, specs[::tp])

    def execute_model_async(self, so: SchedulerOutput) -> PendingOutput | None:
        refs = self._call_all("execute_model", self._enc.encode(so))
        if not so.num_scheduled_tokens:
            self._unchecked.extend(refs)  # only drops finished requests' state
            return None
        pending = _Pending(self, refs)
        self._pending.append(pending)
        return pending

    def _wait_for(self, target: PendingStep) -> None:
        # Outputs are read in launch order; a step's deadline runs from when the one
        # before it was read, and it may queue behind the others in flight.
        while target.output is None:
            self._check_alive()
            step = self._pending[0]
            out_ref = step.refs[self.output_rank]
            timeout = self.timeout * (1 + len(self._pending))
            results = self._wait_refs(step.refs, out_ref, timeout, "a step")
            data = results[out_ref]
            assert data is not None, "the output rank answered no tokens"
            self._pending.popleft()
            step.output = msgspec.msgpack.decode(data, type=ModelRunnerOutput)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._unchecked = []
        self._rank_of.clear()
        try:
            if self.actors and self._dead is None:
                # Leave the process groups cleanly; a rank stuck in a collective (its
                # peer died) is killed below anyway.
                refs = [a.shutdown.remote() for a in self.actors]
                ray.wait(refs, num_returns=len(refs), timeout=_SHUTDOWN_TIMEOUT_S)
            for a in self.actors:
                ray.kill(a)
            if self._pg is not None:
                remove_placement_group(self._pg)
        except Exception as e:  # Ray itself may be gone already (interpreter exit)
            logger.debug("ray executor: shutdown: %s", e)
        finally:
            self.actors = []
            self._pg = None
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
            self._owns_ray = False

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
