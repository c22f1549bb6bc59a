"""Mixture-of-experts models (Mixtral, Qwen2-MoE with a shared expert and a dense layer,
Qwen3-MoE) against HF transformers on tiny random checkpoints: float32 logits over the
paged KV cache (batched prefill, decode, chunked prefill, mixed steps), greedy tokens
through the engine with preemption, chunked prefill and n > 1, tensor- and
expert-parallel engines on gloo equal to one rank, and the refusals."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from model_utils import PagedRunner, randomize_

from kvasir import LLM, SamplingParams
from kvasir.attention.backend import get_backend_cls
from kvasir.config import ModelArchConfig, ModelConfig
from kvasir.models.loader import load_arch_config, load_model
from kvasir.models.moe import MoeForCausalLM

ATOL = 1e-4
VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    num_attention_heads=4,
    num_key_value_heads=2,
)
VARIANTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "mixtral": (
        transformers.MixtralConfig,
        dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, sliding_window=None,
             tie_word_embeddings=False),
    ),
    # A shared expert, unnormalised top-k weights, and layer 1 dense.
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
             tie_word_embeddings=True),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=16,
             norm_topk_prob=True, tie_word_embeddings=False),
    ),
}  # fmt: skip


@dataclass
class Pair:
    hf: torch.nn.Module
    model: MoeForCausalLM
    arch: ModelArchConfig
    path: str

    def hf_logits(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].float()


def _save(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    config_cls, kwargs = VARIANTS[name]
    config = config_cls(**_COMMON, **kwargs, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize_(hf, seed=len(name))
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return hf, str(path)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    hf, path = _save(request.param, tmp_path_factory)
    mc = ModelConfig(model=path)
    arch = load_arch_config(mc)
    model = load_model(mc, arch, get_backend_cls("torch"), torch.float32, torch.device("cpu"))
    assert isinstance(model, MoeForCausalLM)
    return Pair(hf, model, arch, path)


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def check(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)


def test_arch_config(pair: Pair) -> None:
    c, a = pair.hf.config, pair.arch
    assert a.num_experts == (getattr(c, "num_local_experts", None) or c.num_experts)
    assert a.num_experts_per_tok == c.num_experts_per_tok
    assert a.norm_topk_prob == (c.model_type == "mixtral" or c.norm_topk_prob)
    assert a.shared_expert_intermediate_size == getattr(c, "shared_expert_intermediate_size", 0)
    dense = [i for i in range(a.num_hidden_layers) if not a.is_moe_layer(i)]
    assert dense == ([1] if c.model_type == "qwen2_moe" else [])


def test_prefill_decode_and_chunks(pair: Pair) -> None:
    seqs = prompts([5, 11, 17])
    extra = prompts([4, 4, 4], seed=1)
    runner = PagedRunner(pair.model, pair.arch, num_blocks=64, block_size=4)
    for i in range(3):
        runner.add_request(str(i))
    outs = runner.step([(str(i), s) for i, s in enumerate(seqs)])
    for out, s in zip(outs, seqs, strict=True):
        check(out, pair.hf_logits(s))
    for step in range(4):  # decode steps
        outs = runner.step([(str(i), [extra[i][step]]) for i in range(3)])
        for i in range(3):
            check(outs[i], pair.hf_logits(seqs[i] + extra[i][: step + 1])[-1:])
    # Chunked prefill beside a decode: chunk edges mid-block.
    (long,) = prompts([22], seed=2)
    ref = pair.hf_logits(long)
    runner.add_request("c")
    start = 0
    for chunk in (5, 6, 11):
        out, dec = runner.step([("c", long[start : start + chunk]), ("0", [3])])
        check(out, ref[start : start + chunk])
        start += chunk


def test_stacked_expert_tensors_load(pair: Pair) -> None:
    """transformers 5's in-memory layout (``experts.gate_up_proj`` [E, 2I, H]) loads to
    the same weights as the per-expert checkpoint tensors."""
    arch = pair.arch
    model = MoeForCausalLM(arch, _ctx())
    state = {k: v.detach().clone() for k, v in pair.hf.state_dict().items()}
    model.load_weights(state.items())
    for (n1, p1), (n2, p2) in zip(
        model.named_parameters(), pair.model.named_parameters(), strict=True
    ):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=0, rtol=0)


def _ctx() -> Any:
    from kvasir.layers.context import LayerContext

    return LayerContext(attn_backend_cls=get_backend_cls("torch"))


def _greedy_hf(hf: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from HF's full forward (generate() would treat a generated pad id
    as padding)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    """The variant with everything (shared expert, a dense layer) for the engine tests."""
    return _save("qwen2_moe", tmp_path_factory)


_ENGINE = dict(block_size=4, max_model_len=96, max_num_batched_tokens=16)
_PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2, n=2)


def _engine_prompts() -> list[list[int]]:
    seqs = prompts([30, 9, 21, 14], seed=3)
    return seqs + [seqs[0][:16] + [5, 6]]  # a prefix-cache hit


def _crowded(path: str) -> list[Any]:
    """One rank, few KV blocks (preemptions), chunked prefill, a prefix hit, n = 2."""
    llm = LLM(model=path, num_gpu_blocks_override=14, max_num_seqs=4, **_ENGINE)
    try:
        outs = llm.generate(_engine_prompts(), _PARAMS, use_tqdm=False)
        assert llm.llm_engine.engine_core.scheduler.num_preemptions > 0
    finally:
        llm.llm_engine.engine_core.shutdown()
    return outs


def test_engine_greedy_crowded(pair: Pair) -> None:
    """Every variant through the crowded engine: HF's greedy tokens, for both samples."""
    for s, o in zip(_engine_prompts(), _crowded(pair.path), strict=True):
        ref = _greedy_hf(pair.hf, s, _PARAMS.max_tokens)
        assert [c.token_ids for c in o.outputs] == [ref, ref]


@pytest.fixture(scope="module")
def single_rank(qwen2_moe: tuple[Any, str]) -> list[Any]:
    return _crowded(qwen2_moe[1])


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_tensor_and_expert_parallel_match_one_rank(
    expert_parallel: bool, qwen2_moe: tuple[Any, str], single_rank: list[Any]
) -> None:
    """TP = 2 (a slice of every expert per rank) and expert parallelism over 2 ranks
    (whole experts, all-to-all dispatch on gloo) give the single rank's greedy tokens and
    logprobs, on the model with a shared expert and a dense layer."""
    llm = LLM(
        model=qwen2_moe[1],
        tensor_parallel_size=2,
        enable_expert_parallel=expert_parallel,
        distributed_timeout=30.0,
        **_ENGINE,
    )
    try:
        outs = llm.generate(_engine_prompts(), _PARAMS, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    for o, r in zip(outs, single_rank, strict=True):
        for co, cr in zip(o.outputs, r.outputs, strict=True):
            assert co.token_ids == cr.token_ids
            for lo, lr in zip(co.logprobs, cr.logprobs, strict=True):
                for t in lr:
                    assert abs(lo[t].logprob - lr[t].logprob) <= 1e-4


def _write_config(tmp_path: Any, **changes: Any) -> str:
    _, path = VARIANTS["qwen3_moe"]
    cfg = transformers.Qwen3MoeConfig(**_COMMON, **path).to_dict()
    cfg.update(architectures=["Qwen3MoeForCausalLM"], **changes)
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(d)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scoring_func": "sigmoid"}, "scoring_func"),
        ({"topk_method": "group_limited_greedy"}, "topk_method"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ],
)
def test_unsupported_routing_refused(tmp_path: Any, changes: dict[str, Any], message: str) -> None:
    path = _write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        load_arch_config(ModelConfig(model=path, load_format="dummy"))


def test_parallel_split_refused(tmp_path: Any) -> None:
    from kvasir.config import ParallelConfig
    from kvasir.distributed import validate_parallel_config

    path = _write_config(tmp_path, num_experts=6, num_local_experts=6)
    arch = load_arch_config(ModelConfig(model=path, load_format="dummy"))
    with pytest.raises(ValueError, match="num_experts"):
        validate_parallel_config(
            ParallelConfig(tensor_parallel_size=4, enable_expert_parallel=True), arch, None
        )
    arch = load_arch_config(
        ModelConfig(model=_write_config(tmp_path, moe_intermediate_size=33), load_format="dummy")
    )
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        validate_parallel_config(ParallelConfig(tensor_parallel_size=2), arch, None)
    validate_parallel_config(  # whole experts per rank: the width need not divide
        ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True), arch, None
    )


def test_int8_experts_match_dequantised_reference(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``--quantization int8`` on a MoE model: every linear layer and every expert in 8
    bits with per-channel scales (quantised at load); logprobs equal HF's model whose
    weights were quantised and dequantised the same way."""
    import copy

    from kvasir.quantization.utils import quantize_weight

    hf, path = _save("mixtral", tmp_path_factory)
    ref = copy.deepcopy(hf)

    def qdq(w: torch.Tensor) -> torch.Tensor:
        q, s = quantize_weight(w, torch.int8, "channel")
        return q.float() * s[:, None]

    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "embed" in name or "lm_head" in name or "norm" in name:
                continue
            if p.dim() == 2:
                p.copy_(qdq(p))
            elif p.dim() == 3:  # stacked experts [E, N, K]: per expert, per output row
                for e in range(p.shape[0]):
                    p[e].copy_(qdq(p[e]))
    seqs = prompts([19, 6], seed=7)
    llm = LLM(model=path, quantization="int8", block_size=4, max_model_len=64)
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1, logprobs=1)
        outs = llm.generate(seqs, params, use_tqdm=False)
        mixers = [m for m in llm.llm_engine.engine_core.runner.model.modules()
                  if hasattr(m, "w13_scale")]  # fmt: skip
        assert mixers and all(m.w13_weight.dtype == torch.int8 for m in mixers)
    finally:
        llm.llm_engine.engine_core.shutdown()
    for s, o in zip(seqs, outs, strict=True):
        ids = s + list(o.outputs[0].token_ids)
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
        for j, pos in enumerate(o.prompt_logprobs[1:]):
            assert abs(pos[s[j + 1]].logprob - lp[j, s[j + 1]].item()) < 1e-4
        n = len(s)
        assert list(o.outputs[0].token_ids) == lp[n - 1 : -1].argmax(-1).tolist()
