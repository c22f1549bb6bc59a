"""EAGLE and Medusa heads: checkpoints in the published formats load (both file kinds,
both Medusa layouts), are refused when they do not fit the target, and speculate
losslessly (greedy outputs token-identical with and without them) in a crowded batch
with chunked prefill; random requests with sampled drafts run and are reproducible."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from kvasir import LLM, SamplingParams
from kvasir.config import ModelConfig, SpeculativeConfig
from kvasir.models.loader import load_arch_config, load_model
from kvasir.models.loader.dummy_loader import dummy_config_path
from kvasir.spec_decode.heads import load_medusa_heads

_TINY = json.loads(Path(dummy_config_path("tiny-llama") or "").read_text())


def _target_lm_head() -> torch.Tensor:
    """tiny-llama's (dummy, seed 0) LM head, so test heads can predict something."""
    from kvasir.attention.torch_backend import TorchAttentionBackend

    mc = ModelConfig(model="tiny-llama", load_format="dummy")
    model = load_model(mc, load_arch_config(mc), TorchAttentionBackend, torch.float32, "cpu")
    return model.lm_head.weight.detach().clone()


def write_eagle(
    path: Path,
    seed: int = 0,
    hidden: int = 64,
    vocab: int = 1024,
    fmt: str = "safetensors",
    embed: bool = False,
) -> str:
    """A random EAGLE-1 checkpoint for tiny-llama's shape: fc starts near [0, I] (the
    feature passes through), so the head drafts the target's own next token often."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(_TINY, num_hidden_layers=1, hidden_size=hidden, vocab_size=vocab)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    h, inter = hidden, cfg["intermediate_size"]
    q, kv = (
        cfg["num_attention_heads"] * cfg["head_dim"],
        cfg["num_key_value_heads"] * cfg["head_dim"],
    )
    w = {
        "fc.weight": torch.cat([torch.randn(h, h, generator=g) * 0.02, torch.eye(h)], dim=1),
        "fc.bias": torch.randn(h, generator=g) * 0.01,
        "layers.0.post_attention_layernorm.weight": torch.ones(h),
    }
    shapes = {
        "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }  # fmt: skip
    for name, shape in shapes.items():
        w[f"layers.0.{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
    if embed:
        w["embed_tokens.weight"] = torch.randn(vocab, h, generator=g)
    if fmt == "safetensors":
        save_file(w, str(path / "model.safetensors"))
    else:
        torch.save(w, path / "pytorch_model.bin")
    return str(path)


def write_medusa(
    path: Path,
    lm_head: torch.Tensor,
    num_heads: int = 4,
    num_layers: int = 1,
    layout: str = "faster",
    seed: int = 0,
    with_sizes: bool = True,
) -> str:
    """Random Medusa heads (residual blocks near zero, LM heads the target's plus noise)
    in FasterDecoding's or vLLM's tensor names."""
    path.mkdir(parents=True, exist_ok=True)
    vocab, hidden = lm_head.shape
    cfg = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers}
    if with_sizes:
        cfg.update(hidden_size=hidden, vocab_size=vocab)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    w = {}
    for i in range(num_heads):
        for j in range(num_layers):
            weight = torch.randn(hidden, hidden, generator=g) * 0.05
            bias = torch.randn(hidden, generator=g) * 0.05
            if layout == "faster":
                w[f"medusa_head.{i}.{j}.linear.weight"] = weight
                w[f"medusa_head.{i}.{j}.linear.bias"] = bias
            else:
                w[f"blocks.{i}.layers.{j}.weight"] = weight
                w[f"blocks.{i}.layers.{j}.bias"] = bias
        head = lm_head + torch.randn(lm_head.shape, generator=g) * 0.01
        w[
            f"medusa_head.{i}.{num_layers}.weight" if layout == "faster" else f"lm_heads.{i}.weight"
        ] = head
    save_file(w, str(path / "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def lm_head() -> torch.Tensor:
    return _target_lm_head()


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory: pytest.TempPathFactory, lm_head: torch.Tensor) -> dict[str, str]:
    root = tmp_path_factory.mktemp("heads")
    return {
        "eagle": write_eagle(root / "eagle"),
        "eagle_bin": write_eagle(root / "eagle_bin", fmt="bin"),
        "eagle_embed": write_eagle(root / "eagle_embed", embed=True),
        "medusa": write_medusa(root / "medusa", lm_head),
        "medusa_vllm": write_medusa(root / "medusa_vllm", lm_head, layout="vllm"),
        "medusa_nosize": write_medusa(root / "medusa_nosize", lm_head, with_sizes=False),
        "eagle_h32": write_eagle(root / "eagle_h32", hidden=32),
        "eagle_v512": write_eagle(root / "eagle_v512", vocab=512, embed=True),
        "medusa_h32": write_medusa(root / "medusa_h32", torch.zeros(1024, 32)),
        "medusa_v512": write_medusa(root / "medusa_v512", torch.zeros(512, 64)),
    }


def _tiny(spec: dict | None, **kw) -> LLM:
    args = dict(model="tiny-llama", load_format="dummy", max_model_len=256, log=False)
    args.update(kw)
    return LLM(speculative_config=spec, **args)


def _workload(seed: int, num: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(1, 70))] for _ in range(num)]
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=rng.randint(6, 40),
            repetition_penalty=rng.choice([1.0, 1.0, 1.2]),
            logprobs=rng.choice([None, None, 2]),
            n=rng.choice([1, 1, 1, 2]),
        )
        for _ in range(num)
    ]
    return prompts, params


def _summary(outs: list) -> list[tuple]:
    return [(c.token_ids, c.finish_reason) for o in outs for c in o.outputs]


@pytest.fixture(scope="module")
def reference() -> list:
    prompts, params = _workload(0, 20)
    return _tiny(None, max_num_batched_tokens=64).generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize(
    ("name", "method", "k"),
    [("eagle", "eagle", 3), ("eagle_embed", "eagle", 4), ("medusa", "medusa", 4),
     ("medusa_vllm", "medusa", 2)],
)  # fmt: skip
def test_heads_greedy_crowded_batch_is_lossless(
    name: str, method: str, k: int, heads_dir: dict[str, str], reference: list
) -> None:
    prompts, params = _workload(0, 20)
    spec = {"method": method, "model": heads_dir[name], "num_speculative_tokens": k}
    llm = _tiny(spec, max_num_batched_tokens=64)  # chunked prefill, many requests per step
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert _summary(outs) == _summary(reference)
    sched = llm.llm_engine.engine_core.scheduler
    assert sched.kv_cache_manager.usage == 0.0
    stats = sched.make_stats()
    assert stats.spec_num_draft_tokens > 0
    # Near-pass-through heads draft the target's own next token often enough that
    # accepted drafts (and the KV rollback after them) are exercised.
    assert stats.spec_num_accepted_tokens > 0


@pytest.mark.parametrize("name", ["eagle", "medusa"])
def test_heads_sampled_requests_are_reproducible(name: str, heads_dir: dict[str, str]) -> None:
    prompts, _ = _workload(2, 6)
    params = [
        SamplingParams(temperature=0.8, top_k=50, seed=s, max_tokens=16, ignore_eos=True)
        for s in range(6)
    ]
    spec = {"method": name, "model": heads_dir[name], "num_speculative_tokens": 3}
    a = _tiny(spec).generate(prompts, params, use_tqdm=False)
    b = _tiny(spec).generate(prompts[:3], params[:3], use_tqdm=False)
    assert _summary(a)[:3] == _summary(b)
    assert all(len(c.token_ids) == 16 for o in a for c in o.outputs)


def _fake_runner() -> SimpleNamespace:
    mc = ModelConfig(model="tiny-llama", load_format="dummy")
    return SimpleNamespace(arch_config=load_arch_config(mc), device="cpu", dtype=torch.float32)


def test_medusa_layouts_and_sizes_load_the_same_heads(heads_dir: dict[str, str]) -> None:
    runner = _fake_runner()
    got = {}
    for name in ("medusa", "medusa_vllm", "medusa_nosize"):
        cfg = SpeculativeConfig(method="medusa", model=heads_dir[name], num_speculative_tokens=4)
        got[name] = load_medusa_heads(cfg, runner)  # type: ignore[arg-type]
    ref = got["medusa"].state_dict()
    assert set(ref) == {f"blocks.{i}.0.{k}" for i in range(4) for k in ("weight", "bias")} | {
        f"lm_heads.{i}.weight" for i in range(4)
    }
    for name in ("medusa_vllm", "medusa_nosize"):
        other = got[name].state_dict()
        assert all(torch.equal(ref[n], other[n]) for n in ref)
    # Head i: x + SiLU(W x + b) then its LM head, as FasterDecoding's ResBlock computes.
    path = Path(heads_dir["medusa"]) / "model.safetensors"
    from safetensors.torch import load_file

    w = load_file(str(path))
    x = torch.randn(3, 64, dtype=torch.float64)
    lin = x @ w["medusa_head.2.0.linear.weight"].double().T + w["medusa_head.2.0.linear.bias"]
    expect = (x + torch.nn.functional.silu(lin)) @ w["medusa_head.2.1.weight"].double().T
    got_logits = got["medusa"](x.float(), 2)
    torch.testing.assert_close(got_logits.double(), expect, rtol=1e-4, atol=1e-4)


def test_eagle_bin_and_safetensors_checkpoints_draft_the_same(heads_dir: dict[str, str]) -> None:
    prompts, _ = _workload(3, 4)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    stats = []
    for name in ("eagle", "eagle_bin"):
        spec = {"method": "eagle", "model": heads_dir[name], "num_speculative_tokens": 3}
        llm = _tiny(spec)
        llm.generate(prompts, params, use_tqdm=False)
        s = llm.llm_engine.engine_core.scheduler.make_stats()
        stats.append((s.spec_num_draft_tokens, s.spec_num_accepted_tokens, s.spec_accepted_per_pos))
    assert stats[0] == stats[1]


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"method": "eagle", "model": "eagle_h32"}, "speculative_config.model", "hidden size 32"),
        ({"method": "eagle", "model": "eagle_v512"}, "speculative_config.model", "512 tokens"),
        ({"method": "medusa", "model": "medusa_h32"}, "speculative_config.model", "hidden size 32"),
        ({"method": "medusa", "model": "medusa_v512"}, "speculative_config.model", "512 tokens"),
        ({"method": "eagle", "model": "/nonexistent/eagle"}, "speculative_config.model", "not a directory"),
        ({"method": "medusa", "model": "EMPTY"}, "speculative_config.model", "config.json"),
        ({"method": "eagle", "model": "NOWEIGHTS"}, "speculative_config.model", "no \\*.safetensors"),
        ({"method": "medusa", "model": "medusa", "num_speculative_tokens": 5},
         "speculative_config.num_speculative_tokens", "4 heads"),
        ({"method": "medusa", "model": "medusa", "num_speculative_tokens": "auto",
          "max_speculative_tokens": 6}, "speculative_config.max_speculative_tokens", "4 heads"),
    ],
)  # fmt: skip
def test_bad_heads_are_refused_at_start_up(
    spec: dict, field: str, words: str, heads_dir: dict[str, str], tmp_path: Path
) -> None:
    spec = dict(spec)
    if spec["model"] == "EMPTY":
        spec["model"] = str(tmp_path)
    elif spec["model"] == "NOWEIGHTS":
        (tmp_path / "config.json").write_text(json.dumps(dict(_TINY, num_hidden_layers=1)))
        spec["model"] = str(tmp_path)
    elif not os.path.isabs(spec["model"]):
        spec["model"] = heads_dir[spec["model"]]
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
        _tiny(spec)
    assert __import__("re").search(words, str(e.value)), str(e.value)
