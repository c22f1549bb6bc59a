"""State-space models against HF transformers on tiny random checkpoints: Mamba-1,
Mamba-2 and the Jamba hybrid (Mamba-1 layers + attention on the paged KV cache + MoE).
Through the engine: greedy tokens and the logprobs of prompt and output (float32) over
a batch mixing prompt lengths, chunked prefill (chunk edges inside the scan), decode,
preemption (Jamba, whose attention needs KV blocks) and n > 1; the state cache's
accounting; and the refusals (speculative decoding, tensor parallelism)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from kvasir import LLM, SamplingParams
from kvasir.config import ModelConfig
from kvasir.models.loader import load_arch_config

VOCAB = 256
CONFIGS: dict[str, Any] = {
    "mamba": lambda: transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
        conv_kernel=4, eos_token_id=0,
    ),
    "mamba2": lambda: transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
        conv_kernel=4, num_heads=4, head_dim=16, n_groups=2, chunk_size=16,
    ),
    "jamba": lambda: transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
    ),
}  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale activations, decays in a useful range (A = -exp(A_log) in [-2.5, -0.5],
    softplus(dt) around 0.3): states carry information across many tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" in name:
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 2 + 0.5))
            elif "dt_bias" in name or "dt_proj.bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 - 1)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()
    _randomize(hf, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, str(path)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (37, 5, 1, 20, 16, 29)]


def _params() -> list[SamplingParams]:
    """n = 2 (the children fork their parent's state) and, where no fork can happen,
    prompt logprobs (every prompt position computed)."""
    fork = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1, n=2)
    plp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1,
                         prompt_logprobs=1)  # fmt: skip
    return [fork, fork, plp, fork, fork, plp]


def _check(outs: list[Any], hf: torch.nn.Module) -> None:
    """Teacher-forced: one HF forward over prompt + our tokens; each of our greedy tokens
    must be HF's argmax after the same prefix, with the same logprob (and the prompt's)."""
    for prompt, o in zip(_prompts(), outs, strict=True):
        for c in o.outputs:
            ids = prompt + list(c.token_ids)
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
            n = len(prompt)
            assert c.token_ids == lp[n - 1 : -1].argmax(-1).tolist()
            for j, t in enumerate(c.token_ids):
                assert abs(c.logprobs[j][t].logprob - lp[n - 1 + j, t].item()) < 1e-4
            assert c.token_ids == o.outputs[0].token_ids  # greedy n = 2: the same twice
        assert len(o.outputs) == (1 if o.prompt_logprobs is not None else 2)
        if o.prompt_logprobs is not None:
            for j, pos in enumerate(o.prompt_logprobs[1:]):
                t = prompt[j + 1]
                assert abs(pos[t].logprob - lp[j, t].item()) < 1e-4


def test_engine_matches_hf(checkpoint) -> None:
    """Chunks of 16 tokens (the 37- and 20-token prompts span several, edges inside the
    scan), decodes beside prefills, n = 2; Jamba with few KV blocks also preempts."""
    name, hf, path = checkpoint
    kw: dict[str, Any] = {}
    if name == "jamba":
        kw["num_gpu_blocks_override"] = 20  # 19 usable blocks of 4: preemptions
    llm = LLM(model=path, block_size=4, max_model_len=64, max_num_batched_tokens=16,
              max_num_seqs=8, **kw)  # fmt: skip
    try:
        outs = llm.generate(_prompts(), _params(), use_tqdm=False)
        _check(outs, hf)
        scheduler = llm.llm_engine.engine_core.scheduler
        kv = scheduler.kv_cache_manager
        assert kv.state_slots is not None
        assert kv.state_slots.num_free == kv.state_slots.num_slots  # every slot back
        assert not kv.enable_caching
        # n = 2: children started from a copy of their parent's state at the fork point
        assert scheduler.num_state_forks > 0
        if name == "jamba":
            assert scheduler.num_preemptions > 0
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_state_memory_is_constant(tmp_path) -> None:
    """A request's state is one slot however long it grows: the state tensors are
    allocated once, a pure SSM model holds no KV memory, and the slot returns at the end."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS["mamba2"]()).eval()
    _randomize(hf, seed=2)
    hf.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), max_model_len=512, max_num_seqs=3)
    try:
        core = llm.llm_engine.engine_core
        runner = core.runner
        before = runner.num_state_bytes
        spec = next(s for s in core.kv_cache_config.layer_specs if s.kind == "mamba_state")
        assert before == 4 * 2 * spec.state_bytes  # 3 slots + scratch, 2 layers
        assert core.kv_cache_config.bytes_per_block == 0
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=120, ignore_eos=True),
                           use_tqdm=False)  # fmt: skip
        assert len(out[0].outputs[0].token_ids) == 120
        assert runner.num_state_bytes == before
        mixers = [m for m in runner.model.modules() if hasattr(m, "ssm_state")]
        assert all(m.ssm_state.shape[0] == 4 for m in mixers)
        slots = core.scheduler.kv_cache_manager.state_slots
        assert slots.num_free == 3 and not slots.slot_of
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_refusals(tmp_path) -> None:
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS["mamba"]())
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="speculative_config"):
        LLM(
            model=str(tmp_path), speculative_config={"method": "ngram", "num_speculative_tokens": 2}
        )
    with pytest.raises(ValueError, match="tensor parallelism"):
        LLM(model=str(tmp_path), tensor_parallel_size=2, distributed_timeout=20.0)


def test_arch_configs() -> None:
    m1 = load_arch_config(ModelConfig(model="mamba-2.8b", load_format="dummy"))
    assert m1.ssm_version == 1 and m1.ssm_intermediate_size == 5120 and m1.ssm_dt_rank == 160
    m2 = load_arch_config(ModelConfig(model="mamba2-2.7b", load_format="dummy"))
    assert m2.ssm_version == 2 and m2.ssm_num_heads * m2.ssm_head_dim == m2.ssm_intermediate_size


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_heads": 6}, "num_heads x head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"state_size": 0}, "ssm_state_size"),
    ],
)
def test_unsupported_ssm_variants_refused(tmp_path, changes: dict[str, Any], message: str) -> None:
    import json

    cfg = CONFIGS["mamba2"]().to_dict()
    cfg.update(architectures=["Mamba2ForCausalLM"], **changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_arch_config(ModelConfig(model=str(tmp_path), load_format="dummy"))


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_gguf_checkpoint_matches_hf(name: str, tmp_path) -> None:
    """A GGUF file laid out as llama.cpp's converter writes Mamba / Mamba-2 (the gguf
    package's SSM tensor names and ``{arch}.ssm.*`` metadata; A stored as -exp(A_log),
    the conv kernel squeezed, Mamba-2's A/D as [heads, 1] and its norm per group)
    gives HF's logprobs."""
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _randomize(hf, seed=4)
    arch = gguf.MODEL_ARCH.MAMBA if name == "mamba" else gguf.MODEL_ARCH.MAMBA2
    names = gguf.TensorNameMap(arch, cfg.num_hidden_layers)
    path = tmp_path / f"{name}.gguf"
    w = gguf.GGUFWriter(str(path), name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(2048)
    w.add_embedding_length(cfg.hidden_size)
    w.add_ssm_conv_kernel(cfg.conv_kernel)
    w.add_ssm_inner_size(cfg.expand * cfg.hidden_size)
    w.add_ssm_state_size(cfg.state_size)
    w.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    if name == "mamba":
        w.add_ssm_time_step_rank(cfg.time_step_rank)
    else:
        w.add_ssm_time_step_rank(cfg.num_heads)
        w.add_ssm_group_count(cfg.n_groups)
    for hf_name, t in hf.state_dict().items():
        a = t.float().numpy().copy()
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, _, kind = hf_name.rpartition(".")
        if kind == "dt_bias":  # the converter names Mamba-2's dt_bias dt_proj.bias
            gname = names.get_name(base + ".dt_proj") + ".bias"
        elif kind in ("A_log", "D"):
            gname = names.get_name(hf_name)
        else:
            gname = names.get_name(base) + f".{kind}"
        assert gname is not None, hf_name
        if kind == "A_log":
            a = -np.exp(a)
        if hf_name.endswith("conv1d.weight"):
            a = a.squeeze(1)
        if name == "mamba2":
            if kind in ("A_log", "D"):
                a = a.reshape(-1, 1)
            if hf_name.endswith("mixer.norm.weight"):
                a = a.reshape(cfg.n_groups, -1)
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # One full-prompt forward (no state carried, no tokenizer needed in the file).
    from model_utils import PagedRunner

    from kvasir.attention.backend import get_backend_cls
    from kvasir.models.loader import load_model

    mc = ModelConfig(model=str(path))
    arch_config = load_arch_config(mc)
    assert arch_config.model_type == name and arch_config.ssm_version == (
        1 if name == "mamba" else 2
    )
    model = load_model(
        mc, arch_config, get_backend_cls("torch"), torch.float32, torch.device("cpu")
    )
    prompt = torch.randint(3, VOCAB, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    runner = PagedRunner(model, arch_config, num_blocks=8, block_size=4)
    runner.add_request("a")
    ours = runner.step([("a", prompt)])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
