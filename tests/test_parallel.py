"""Tensor and pipeline parallelism on the CPU (gloo, one worker process per rank)
against the single-process engine with the same HF checkpoint.

For tiny random Llama (llama3 rope, GQA), Qwen2 (qkv bias, tied), Qwen3 (q/k norm, MQA:
its one KV head is replicated under TP = 2) and Mistral checkpoints: TP = 2, PP = 2 and
TP 2 x PP 2 (4 processes) must give identical greedy tokens, and prompt and sample
logprobs (the float32 logits, normalised) equal within 1e-5 relative, over one batch
that has chunked prefills, decodes, prefix-cache hits and preemptions.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import torch
from model_utils import DEFAULT_MODEL_PROMPTS, randomize_

from kvasir import LLM, SamplingParams
from kvasir.executor.base import WorkerDiedError

transformers = pytest.importorskip("transformers")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
VARIANTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (
        transformers.LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
             tie_word_embeddings=False),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
             tie_word_embeddings=True),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=1e6,
             tie_word_embeddings=True, attention_bias=True),
    ),
    "mistral": (
        transformers.MistralConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e6,
             sliding_window=None, tie_word_embeddings=False),
    ),
}  # fmt: skip
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (tensor_parallel_size, pipeline_parallel_size)


def _save(name: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    config_cls, kwargs = VARIANTS[name]
    config = config_cls(**_COMMON, **kwargs)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize_(hf, seed=len(name))
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _save(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One architecture is enough for start-up checks and fault handling."""
    return _save("qwen3", tmp_path_factory)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 12, 3, 25, 33, 18)]
    shared = ids[0][:32]  # four full blocks of 8: a prefix-cache hit for the later ones
    return ids + [shared + [7, 8, 9], shared + [10, 11]]


def _engine(path: str, tp: int = 1, pp: int = 1, **kw: Any) -> LLM:
    kw.setdefault("distributed_timeout", 30.0)
    return LLM(
        model=path,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        block_size=8,
        num_gpu_blocks_override=26,  # the batch needs more: preemptions
        max_num_batched_tokens=16,  # 40-token prompts prefill in chunks
        max_num_seqs=8,
        max_model_len=128,
        **kw,
    )


def _run(llm: LLM) -> list[Any]:
    prompts = _prompts()
    params = [
        SamplingParams(
            max_tokens=14,
            temperature=0.0,
            logprobs=3,
            prompt_logprobs=3 if i < 2 else None,  # prompt logprobs skip the prefix cache
            ignore_eos=True,
        )
        for i in range(len(prompts))
    ]
    return llm.generate(prompts, params, use_tqdm=False)


def _close(a: float, b: float, scale: float) -> bool:
    # A logprob is a logit minus the row's logsumexp, so 1e-5 relative on the logits
    # is 1e-5 times the logits' scale, at least the largest |logprob| at the position.
    return abs(a - b) <= 1e-5 * max(1.0, scale)


def _assert_same(ours: list[Any], ref: list[Any]) -> None:
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids, f"request {i}: tokens differ"
        positions = list(zip(o.outputs[0].logprobs, r.outputs[0].logprobs, strict=True))
        if r.prompt_logprobs is not None:
            positions += [
                (a, b) for a, b in zip(o.prompt_logprobs, r.prompt_logprobs, strict=True) if b
            ]
        for j, (lo, lr) in enumerate(positions):
            assert lo.keys() == lr.keys(), f"request {i} position {j}: top tokens differ"
            scale = max(abs(v.logprob) for v in lr.values())
            for t in lr:
                assert _close(lo[t].logprob, lr[t].logprob, scale), (
                    f"request {i} position {j} token {t}: {lo[t].logprob} vs {lr[t].logprob}"
                )


@pytest.fixture(scope="module")
def reference(checkpoint: str) -> tuple[list[Any], int]:
    llm = _engine(checkpoint)
    outs = _run(llm)
    preemptions = llm.llm_engine.engine_core.scheduler.num_preemptions
    llm.llm_engine.engine_core.shutdown()
    return outs, preemptions


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_parallel_matches_single_process(
    checkpoint: str, reference: tuple[list[Any], int], tp: int, pp: int
) -> None:
    ref, ref_preemptions = reference
    # The workload exercises what it claims to.
    assert ref_preemptions > 0
    assert any(r.num_cached_tokens >= 32 for r in ref[-2:])
    llm = _engine(checkpoint, tp, pp)
    try:
        # The block pool was built from every layer's spec, each a TP rank's share.
        cfg = llm.llm_engine.engine_core.kv_cache_config
        assert cfg is not None and len(cfg.layer_specs) == _COMMON["num_hidden_layers"]
        kv_heads = VARIANTS[os.path.basename(checkpoint)[:-1]][1]["num_key_value_heads"]
        assert all(s.num_kv_heads == max(kv_heads // tp, 1) for s in cfg.layer_specs)
        outs = _run(llm)
        assert llm.llm_engine.engine_core.scheduler.num_preemptions > 0
        assert any(r.num_cached_tokens >= 32 for r in outs[-2:])
    finally:
        llm.llm_engine.engine_core.shutdown()
    _assert_same(outs, ref)


def test_pipeline_keeps_one_step_per_stage_in_flight(checkpoint: str) -> None:
    """PP = 2 with the partition given explicitly (1 + 3 layers): two steps in flight
    at once, never one request in both, and the same tokens as one process."""
    llm = _engine(checkpoint, 1, 2, pipeline_layer_partition="1,3")
    core = llm.llm_engine.engine_core
    seen: list[int] = []
    sched = core.scheduler
    real_schedule = sched.schedule

    def schedule():  # noqa: ANN202
        so = real_schedule()
        in_flight = {rid for s, _ in core._in_flight for rid in s.num_scheduled_tokens}
        assert not in_flight & set(so.num_scheduled_tokens), "a request in two batches"
        if so.num_scheduled_tokens:
            seen.append(len(core._in_flight) + 1)
        return so

    sched.schedule = schedule  # type: ignore[method-assign]
    try:
        outs = _run(llm)
    finally:
        core.shutdown()
    assert max(seen) == 2
    single = _engine(checkpoint)
    ref = _run(single)
    single.llm_engine.engine_core.shutdown()
    for o, r in zip(outs, ref, strict=True):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tensor_parallel_size=3), r"--tensor-parallel-size 3 does not divide .*allowed"),
        (dict(tensor_parallel_size=8), r"--tensor-parallel-size 8 .*allowed"),
        (dict(pipeline_parallel_size=5), r"--pipeline-parallel-size 5 .*4 layers; allowed: 1..4"),
        (
            dict(pipeline_parallel_size=2, pipeline_layer_partition="1,2"),
            r"--pipeline-layer-partition 1,2 sums to 3, but the model has 4 layers",
        ),
        (
            dict(tensor_parallel_size=2, distributed_executor_backend="uni"),
            r"distributed_executor_backend 'uni' runs one rank",
        ),
        (dict(distributed_timeout=0), r"distributed_timeout must be > 0"),
        (dict(tensor_parallel_size=0), r"tensor_parallel_size must be >= 1"),
    ],
)
def test_bad_parallel_config_is_refused(
    qwen3_checkpoint: str, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        LLM(model=qwen3_checkpoint, max_model_len=64, kv_cache_gb=0.01, **kwargs)


def test_more_ranks_than_gpus_is_refused() -> None:
    from kvasir.config import ModelArchConfig, ParallelConfig
    from kvasir.distributed import validate_parallel_config

    arch = ModelArchConfig(("LlamaForCausalLM",), 256, 64, 96, 4, 4, 2, 16)
    with pytest.raises(ValueError, match=r"4 ranks, but this host has 2 CUDA device\(s\)"):
        validate_parallel_config(ParallelConfig(tensor_parallel_size=4), arch, num_devices=2)


def test_killed_worker_makes_the_engine_dead(qwen3_checkpoint: str) -> None:
    """SIGKILL one worker mid-generation: the engine raises within the timeout, the
    other workers are gone afterwards, and nothing hangs."""
    llm = _engine(qwen3_checkpoint, 2, 1, distributed_timeout=10.0)
    core = llm.llm_engine.engine_core
    procs = core.executor.procs
    engine = llm.llm_engine
    for i, p in enumerate(_prompts()):
        engine.add_request(str(i), p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match="rank"):
        for _ in range(1000):
            engine.step()
    assert time.monotonic() - t0 < 10.0 + 5.0
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    assert all(p.poll() is not None for p in procs), "a worker outlived the engine"


def test_default_model_tp3_matches_tp1() -> None:
    """The real default model (9 attention heads, 3 KV heads) split over 3 ranks: 8
    prompts, batched with 20 others, give the same greedy tokens as one process."""
    from kvasir.models.default import default_model_path

    path = default_model_path()
    g = torch.Generator().manual_seed(3)
    texts = DEFAULT_MODEL_PROMPTS
    others = [torch.randint(100, 40000, (int(n),), generator=g).tolist() for n in
              torch.randint(4, 40, (20,), generator=g)]  # fmt: skip
    params = SamplingParams(max_tokens=12, temperature=0.0)
    kw: dict[str, Any] = dict(max_model_len=256, kv_cache_gb=0.05, max_num_seqs=32)
    outs = {}
    for tp in (1, 3):
        llm = LLM(model=path, tensor_parallel_size=tp, **kw)
        try:
            res = llm.generate(texts + others, params, use_tqdm=False)
        finally:
            llm.llm_engine.engine_core.shutdown()
        outs[tp] = [r.outputs[0].token_ids for r in res]
    assert outs[3][:8] == outs[1][:8]
    assert outs[3] == outs[1]


def test_bench_latency_with_pipeline_parallelism_smoke() -> None:
    """Smoke test: ``kvasir bench latency --pipeline-parallel-size 2`` runs (the
    multi-GPU measurements use the same command) and reports one device on the CPU."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "kvasir.entrypoints.cli", "bench", "latency",
        "--pipeline-parallel-size", "2", "--input-len", "16", "--output-len", "4",
        "--num-iters", "1", "--max-model-len", "128", "--kv-cache-gb", "0.02",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["bench"] == "latency" and result["num_devices"] == 1
    assert result["decode_tok_s"] > 0


def test_tp_random_sampling_and_async_scheduling_match_one_process(qwen3_checkpoint: str) -> None:
    """Every TP rank samples the same tokens (the same gathered logits, the same seeds
    and RNG): random sampling, seeded or not, with penalties, gives the single-process
    tokens; so does TP with async scheduling (one step in flight). A second batch, one
    seeded n = 3 request (its children share the prompt's blocks), does too."""
    prompts = _prompts()[:4]
    params = [
        SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, top_k=20, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
    ]
    fork = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=3, ignore_eos=True)
    results = []
    for tp, extra in ((1, {}), (2, {}), (2, {"async_scheduling": True})):
        llm = _engine(qwen3_checkpoint, tp, 1, **extra)
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
            forked = llm.generate(_prompts()[4], fork, use_tqdm=False)[0]
        finally:
            llm.llm_engine.engine_core.shutdown()
        results.append(
            ([o.outputs[0].token_ids for o in outs], [c.token_ids for c in forked.outputs])
        )
    assert len(results[0][1]) == 3 and len(set(map(tuple, results[0][1]))) > 1
    assert results[1] == results[0]
    assert results[2] == results[0]
