"""``--quantization gguf``: the default model (SmolLM2-135M Q4_1) with its linear
weights kept in their GGUF blocks, against the same file dequantised at load
(``--quantization none``): equal logits up to rounding, the same greedy tokens, no float
copy of a packed weight, and the refusal of a type it cannot keep packed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from model_utils import PagedRunner

from kvasir.attention.backend import get_backend_cls
from kvasir.config import ModelConfig
from kvasir.kernels.gguf import row_bytes
from kvasir.models.default import default_model_path
from kvasir.models.loader import load_arch_config, load_model
from kvasir.models.loader.gguf_reader import GGUFTensor, read_gguf
from kvasir.quantization.gguf_packed import GGUFLinearMethod

Q = GGMLQuantizationType
PROMPTS = [
    "The capital of France is", "Once upon a time", "def fibonacci(n):",
    "The meaning of life is", "In 1492, Columbus", "Water boils at",
    "My favourite food is", "The quick brown fox",
]  # fmt: skip


def _load(quantization: str):
    mc = ModelConfig(model=default_model_path(), quantization=quantization)
    arch = load_arch_config(mc)
    return load_model(mc, arch, get_backend_cls("torch"), torch.float32, torch.device("cpu")), arch


@pytest.fixture(scope="module")
def models():
    return _load("gguf"), _load("none")


def test_packed_linears_hold_the_file_bytes_and_no_float_copy(models) -> None:
    (packed, arch), _ = models
    gguf = read_gguf(default_model_path())
    layers = [
        m for m in packed.modules() if isinstance(getattr(m, "method", None), GGUFLinearMethod)
    ]
    assert len(layers) == 4 * arch.num_hidden_layers  # qkv, o, gate_up, down
    file_bytes = sum(t.nbytes for t in gguf.tensors if t.tensor_type == Q.Q4_1)
    held = sum(m.method.resident_bytes(m) for m in layers)
    assert held == file_bytes
    for m in layers:
        assert "weight" not in m._parameters
        ((kind, w),) = m.gguf_shards
        assert kind == Q.Q4_1 and w.dtype == torch.uint8
        assert w.shape == (m.output_size_per_partition, row_bytes(kind, m.input_size_per_partition))


def test_packed_logits_equal_dequantised(models) -> None:
    (packed, arch), (dense, _) = models
    tokens = [1, 504, 3575, 282, 4649, 314, 253, 1345, 30, 216, 339, 4471, 970, 29]
    outs = []
    for model in (packed, dense):
        runner = PagedRunner(model, arch, num_blocks=8)
        runner.add_request("a")
        outs.append(runner.step([("a", tokens)])[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-3, rtol=1e-4), (outs[0] - outs[1]).abs().max()
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


def _greedy(quantization: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    llm = LLM(model=default_model_path(), quantization=quantization, max_model_len=128,
              kv_cache_gb=0.05, log=False)  # fmt: skip
    try:
        out = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                           use_tqdm=False)  # fmt: skip
    finally:
        llm.llm_engine.engine_core.shutdown()
    return [list(o.outputs[0].token_ids) for o in out]


def test_packed_greedy_matches_dequantised_short() -> None:
    assert _greedy("gguf", PROMPTS[:2], 8) == _greedy("none", PROMPTS[:2], 8)


@pytest.mark.slow
def test_packed_greedy_matches_dequantised_8_prompts_32_tokens() -> None:
    assert _greedy("gguf", PROMPTS, 32) == _greedy("none", PROMPTS, 32)


def test_unsupported_type_refused_naming_tensor_and_type() -> None:
    from kvasir.models.loader.gguf_loader import _packed_linear

    t = GGUFTensor("blk.0.attn_q.weight", Q.IQ4_NL, (32, 32), 0, 18, np.zeros(18, np.uint8))
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight'.*IQ4_NL.*supported: \['Q4_0'"):
        list(_packed_linear(t, "model.layers.0.self_attn.q_proj.weight", "x.gguf"))


def test_gguf_quantization_needs_a_gguf_file(tmp_path) -> None:
    from kvasir.quantization import resolve_quantization

    with pytest.raises(ValueError, match="quantization 'gguf' needs a GGUF checkpoint"):
        resolve_quantization("gguf", None, torch.device("cpu"), load_format="safetensors")
