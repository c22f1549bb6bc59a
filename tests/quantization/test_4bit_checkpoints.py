"""GPTQ and AWQ checkpoints of a tiny random Llama, packed in the test from the formats'
published definitions (AutoGPTQ's ``qweight``/``qzeros``/``scales``/``g_idx`` with the
v1 zero-minus-one convention or ``gptq_v2``; AutoAWQ's GEMM packing with its
``0 2 4 6 1 3 5 7`` nibble order), independently of kvasir's packers: kvasir's logits
against HF transformers running the dequantised weights. Plus the refusals."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

PROMPT = [3, 17, 92, 5, 200, 41, 77, 8, 150, 23, 64, 99]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_hf(seed: int = 0):
    # hidden 96 and intermediate 192: group 32 gives 3 and 6 groups, group 128 a partial
    # last group, per channel one.
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def _pack_words(values: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    """Pack ``values [R, C]`` (unsigned) along C: field i of word j holds column
    ``j * P + order[i]``. Returns int32 ``[R, C / P]``."""
    per = 32 // bits
    order = order or list(range(per))
    out = np.zeros((values.shape[0], values.shape[1] // per), dtype=np.uint32)
    for j in range(out.shape[1]):
        for i in range(per):
            out[:, j] |= values[:, j * per + order[i]].astype(np.uint32) << np.uint32(bits * i)
    return out.view(np.int32)


def _min_max_params(w: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's / AWQ's min-max quantiser over the last axis: (scale, integer zero)."""
    maxq = 2**bits - 1
    lo, hi = np.minimum(w.min(-1), 0), np.maximum(w.max(-1), 0)
    if sym:
        hi = np.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / maxq
    scale = np.where(scale == 0, 1.0, scale).astype(np.float16).astype(np.float64)
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-lo / scale)
    return scale, np.clip(zero, 0, maxq)


def _gptq_layer(w: torch.Tensor, bits, group, sym, desc_act, v2, rng):
    """AutoGPTQ's QuantLinear.pack on a min-max quantisation of ``w [N, K]``; ``rng``
    gives the act-order permutation (the same for projections of the same input, as
    GPTQ's Hessian-diagonal order is)."""
    wn = w.double().numpy()
    n, k = wn.shape
    gs = k if group == -1 else group
    num_groups = -(-k // gs)
    if desc_act:  # act order: column perm[j] is the j-th quantised, its group j // gs
        perm = rng.permutation(k)
        g_idx = np.empty(k, dtype=np.int32)
        g_idx[perm] = np.arange(k) // gs
    else:
        g_idx = (np.arange(k) // gs).astype(np.int32)
    scales = np.zeros((num_groups, n))
    zeros = np.zeros((num_groups, n))
    for g in range(num_groups):
        scales[g], zeros[g] = _min_max_params(wn[:, g_idx == g], bits, sym)
    s, z = scales[g_idx].T, zeros[g_idx].T  # [N, K]
    q = np.clip(np.round(wn / s) + z, 0, 2**bits - 1)
    deq = (q - z) * s
    stored_zeros = zeros - (0 if v2 else 1)  # v1 stores zero - 1
    tensors = {
        "qweight": _pack_words(q.T.astype(np.uint32).T, bits).T.copy(),  # pack along K
        "qzeros": _pack_words(stored_zeros.astype(np.int64).astype(np.uint32), bits),
        "scales": scales.astype(np.float16),
        "g_idx": g_idx,
    }
    return tensors, deq


def _awq_layer(w: torch.Tensor, group, rng):
    """AutoAWQ's WQLinear_GEMM.from_linear on a min-max (zero-point) quantisation."""
    del rng
    wn = w.double().numpy()
    n, k = wn.shape
    gs = k if group == -1 else group
    num_groups = -(-k // gs)
    scales = np.zeros((num_groups, n))
    zeros = np.zeros((num_groups, n))
    for g in range(num_groups):
        scales[g], zeros[g] = _min_max_params(wn[:, g * gs : (g + 1) * gs], 4, sym=False)
    gid = np.arange(k) // gs
    s, z = scales[gid].T, zeros[gid].T
    q = np.clip(np.round(wn / s) + z, 0, 15)
    deq = (q - z) * s
    tensors = {
        "qweight": _pack_words(q.T.astype(np.uint32), 4, AWQ_ORDER),  # [K, N / 8]
        "qzeros": _pack_words(zeros.astype(np.uint32), 4, AWQ_ORDER),
        "scales": scales.astype(np.float16),
    }
    return tensors, deq


def _write(model, path: str, method: str, qcfg: dict, **kw):  # noqa: ANN001
    """Quantise every decoder linear of ``model``; save the checkpoint; return the HF
    model running the dequantised weights."""
    state, ref_state = {}, {}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in _LINEARS:
            proj = module.rpartition(".")[2]
            shared_input = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
            key = f"{module.rpartition('.')[0]}.{shared_input.get(proj, proj)}"
            rng = np.random.default_rng(zlib.crc32(key.encode()))
            if method == "gptq":
                parts, deq = _gptq_layer(t, rng=rng, **kw)
            else:
                parts, deq = _awq_layer(t, rng=rng, **kw)
            for leaf_name, arr in parts.items():
                state[f"{module}.{leaf_name}"] = torch.from_numpy(np.ascontiguousarray(arr))
            ref_state[name] = torch.from_numpy(deq).float()
        else:
            state[name] = t.contiguous()
            ref_state[name] = t
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": method, **qcfg}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    ref = transformers.LlamaForCausalLM(model.config).eval()
    ref.load_state_dict(ref_state)
    return ref


def _kvasir_logprobs(path: str) -> torch.Tensor:
    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    llm = LLM(model=path, max_model_len=64, kv_cache_gb=0.01, log=False)
    try:
        out = llm.generate(
            [PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    lps = out[0].prompt_logprobs
    return torch.tensor([lps[p][PROMPT[p]].logprob for p in range(1, len(PROMPT))])


def _hf_logprobs(model) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return torch.tensor([lp[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))])


GPTQ_CASES = [
    # bits, group, sym, desc_act, checkpoint_format
    (4, 32, True, False, "gptq"),
    (4, -1, False, False, "gptq"),
    (8, 64, False, True, "gptq"),
    (4, 128, True, True, "gptq_v2"),
]


@pytest.mark.parametrize("bits,group,sym,desc_act,fmt", GPTQ_CASES)
def test_gptq_checkpoint_matches_dequantised_reference(tmp_path, bits, group, sym, desc_act, fmt):
    model = _tiny_hf()
    qcfg = {"bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act,
            "checkpoint_format": fmt}  # fmt: skip
    path = str(tmp_path / "gptq")
    ref = _write(model, path, "gptq", qcfg, bits=bits, group=group, sym=sym,
                 desc_act=desc_act, v2=fmt == "gptq_v2")  # fmt: skip
    got, want = _kvasir_logprobs(path), _hf_logprobs(ref)
    assert torch.allclose(got, want.float(), atol=2e-4), (got - want).abs().max()
    # The quantisation is real: the float model's logprobs differ.
    assert (want - _hf_logprobs(model)).abs().max() > 1e-3


@pytest.mark.parametrize("group", [32, -1])
def test_awq_checkpoint_matches_dequantised_reference(tmp_path, group):
    model = _tiny_hf(seed=1)
    qcfg = {"bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    path = str(tmp_path / "awq")
    ref = _write(model, path, "awq", qcfg, group=group)
    got, want = _kvasir_logprobs(path), _hf_logprobs(ref)
    assert torch.allclose(got, want.float(), atol=2e-4), (got - want).abs().max()


def _load(path: str):
    from kvasir.attention.backend import get_backend_cls
    from kvasir.config import ModelConfig
    from kvasir.models.loader import load_arch_config, load_model

    mc = ModelConfig(model=path)
    return load_model(mc, load_arch_config(mc), get_backend_cls("torch"), torch.float32,
                      torch.device("cpu"))  # fmt: skip


@pytest.mark.parametrize(
    "qcfg,message",
    [
        ({"bits": 3, "group_size": 32}, r"quantization_config.bits must be one of \[4, 8\], got 3"),
        ({"bits": 4, "group_size": 100}, r"group_size must be one of \[-1, 32, 64, 128\], got 100"),
        ({"bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ],
)
def test_bad_gptq_config_refused(tmp_path, qcfg, message) -> None:
    path = str(tmp_path / "bad")
    _write(_tiny_hf(), path, "gptq", {"bits": 4, "group_size": 32}, bits=4, group=32,
           sym=True, desc_act=False, v2=False)  # fmt: skip
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"] = {"quant_method": "gptq", **qcfg}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=message):
        _load(path)


def test_packed_shape_mismatch_refused_naming_tensor(tmp_path) -> None:
    path = str(tmp_path / "mismatch")
    # Packed with group 32 but the config says 64: scales have 3 groups, 2 expected.
    _write(_tiny_hf(), path, "gptq", {"bits": 4, "group_size": 64}, bits=4, group=32,
           sym=True, desc_act=False, v2=False)  # fmt: skip
    message = r"model\.layers\.0\.mlp\.down_proj\.qzeros has shape \(6, 12\), expected \(3, 12\)"
    with pytest.raises(ValueError, match=message):
        _load(path)


def test_awq_8bit_refused(tmp_path) -> None:
    path = str(tmp_path / "awq8")
    _write(_tiny_hf(), path, "awq", {"bits": 4, "group_size": 32}, group=32)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"]["bits"] = 8
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"quantization_config.bits must be one of \[4\], got 8"):
        _load(path)


def test_act_order_dequantized_weight_in_checkpoint_order(tmp_path) -> None:
    """``dequantized_weight`` (what a LoRA wrapper reads) undoes the load-time sort."""
    model = _tiny_hf()
    path = str(tmp_path / "ao")
    ref = _write(model, path, "gptq", {"bits": 4, "group_size": 32, "desc_act": True},
                 bits=4, group=32, sym=False, desc_act=True, v2=False)  # fmt: skip
    loaded = _load(path)
    layer = loaded.model.layers[1].mlp.down_proj
    assert layer.wna16_perm is not None  # the rows really were sorted
    want = ref.model.layers[1].mlp.down_proj.weight
    assert torch.allclose(layer.method.dequantized_weight(layer), want, atol=1e-6)
