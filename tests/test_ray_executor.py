"""The Ray executor (``--distributed-executor-backend ray``) on a local Ray cluster.

Tensor parallelism of 2 over two Ray actors must give the single-process engine's
greedy tokens and logprobs (the reference computes the same random model unsplit, in
one process), and so must TP = 2 x PP = 2. A rank whose process is killed
mid-generation, or whose call raises, must make the engine raise ``WorkerDiedError``
naming that rank well within ``--distributed-timeout``, and a cluster too small for the
placement group must be refused with an error that names the flags. Start-up of a
Ray cluster and its actors takes a few seconds per engine.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from kvasir import LLM, SamplingParams
from kvasir.executor.base import WorkerDiedError

# tiny-llama: 4 attention heads, 2 KV heads, 2 layers: TP = 2 splits both head counts.
_MODEL = dict(model="tiny-llama", load_format="dummy", kv_cache_gb=0.01, max_model_len=128)
_PROMPTS = [
    [1, 17, 305, 92, 4, 611, 23],
    [1, 900, 12, 12, 77],
    [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
]


def _llm(**kw: object) -> LLM:
    return LLM(**_MODEL, log=False, **kw)  # type: ignore[arg-type]


def _shutdown(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture
def ray_cluster():
    """A local cluster started by the test (2 CPUs: room for TP = 2, not for 4 ranks);
    the executor must join it and leave it running."""
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _cpus_free_again(num_cpus: float, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) == num_cpus:
            return True
        time.sleep(0.1)
    return False


_PARAMS = SamplingParams(max_tokens=8, temperature=0, logprobs=3)


@pytest.fixture(scope="module")
def reference():
    """The single-process engine's outputs (the uni executor, no Ray)."""
    llm = _llm()
    try:
        return llm.generate(_PROMPTS, _PARAMS, use_tqdm=False)
    finally:
        _shutdown(llm)


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2", "tp2-pp2"])
def test_ray_matches_single_process(reference, tp: int, pp: int) -> None:
    """TP = 2 is the issue's required case; TP = 2 x PP = 2 adds the pipeline (two
    steps in flight, the output rank being world rank 2)."""
    ref = reference
    assert not ray.is_initialized()
    llm = _llm(
        tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="ray"
    )
    try:
        executor = llm.llm_engine.engine_core.executor
        assert type(executor).__name__ == "RayExecutor"
        assert executor.max_concurrent_batches == pp
        assert len({info.pid for info in executor.node_infos}) == tp * pp  # one process each
        assert os.getpid() not in {info.pid for info in executor.node_infos}
        out = llm.generate(_PROMPTS, _PARAMS, use_tqdm=False)
    finally:
        _shutdown(llm)
    # The executor started this cluster, so it stopped it too.
    assert not ray.is_initialized()

    for r, o in zip(ref, out, strict=True):
        a, b = r.outputs[0], o.outputs[0]
        assert len(a.token_ids) == 8
        assert b.token_ids == a.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        assert len(b.logprobs) == len(a.logprobs) == 8
        for pa, pb in zip(a.logprobs, b.logprobs, strict=True):
            assert pa.keys() == pb.keys()
            for tok in pa:
                assert abs(pa[tok].logprob - pb[tok].logprob) < 1e-5, (tok, pa[tok], pb[tok])
                assert pa[tok].rank == pb[tok].rank


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rank", [0, 1], ids=["output-rank", "other-rank"])
def test_killed_actor_raises_worker_died(ray_cluster, rank: int) -> None:
    timeout = 10.0
    llm = _llm(
        tensor_parallel_size=2, distributed_executor_backend="ray", distributed_timeout=timeout
    )
    engine = llm.llm_engine
    executor = engine.engine_core.executor
    try:
        engine.add_request("0", {"prompt_token_ids": _PROMPTS[0]}, SamplingParams(max_tokens=100))
        for _ in range(3):  # prefill and two decode steps
            engine.step()
        assert engine.has_unfinished_requests()
        os.kill(executor.node_infos[rank].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match=f"rank {rank}"):
            while engine.has_unfinished_requests():
                engine.step()
        elapsed = time.monotonic() - t0
    finally:
        _shutdown(llm)
    # Noticed through the dead actor itself, not by waiting out the timeout.
    assert elapsed < timeout / 2, elapsed
    with pytest.raises(WorkerDiedError):
        engine.step()
    # The executor joined the test's cluster: it leaves it running, with its actors and
    # placement group gone.
    assert ray.is_initialized()
    assert _cpus_free_again(2.0)


@pytest.mark.timeout(120)
def test_failing_call_of_another_rank_raises_at_once(ray_cluster) -> None:
    """Rank 1 raises before the step's all-reduce, so the output rank waits in it:
    the executor must report rank 1's error without waiting for the output rank."""
    timeout = 20.0
    llm = _llm(
        tensor_parallel_size=2, distributed_executor_backend="ray", distributed_timeout=timeout
    )
    engine = llm.llm_engine
    executor = engine.engine_core.executor
    try:
        engine.add_request("0", {"prompt_token_ids": _PROMPTS[0]}, SamplingParams(max_tokens=100))
        engine.step()

        def fail_next_step(actor) -> None:  # runs in rank 1's actor (pickled by value)
            def boom(so):
                raise RuntimeError("injected failure")

            actor.worker.execute_model = boom

        ray.get(executor.actors[1].__ray_call__.remote(fail_next_step))
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1 failed: RuntimeError: injected failure"):
            while engine.has_unfinished_requests():
                engine.step()
        elapsed = time.monotonic() - t0
    finally:
        _shutdown(llm)
    assert elapsed < timeout / 2, elapsed
    assert _cpus_free_again(2.0)


def test_cluster_too_small_names_the_flags(ray_cluster) -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="--tensor-parallel-size 2 x --pipeline-parallel-size 2"):
        _llm(
            tensor_parallel_size=2,
            pipeline_parallel_size=2,
            distributed_executor_backend="ray",
            distributed_timeout=2.0,
        )
    assert time.monotonic() - t0 < 30
    assert ray.is_initialized()
    assert _cpus_free_again(2.0)
