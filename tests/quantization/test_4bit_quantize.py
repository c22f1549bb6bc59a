"""``kvasir quantize --method gptq|awq|rtn``: the algorithms against round-to-nearest on
inputs they are meant for, and the written checkpoints of a tiny random Llama read back
with an unpacker written here from the formats' definitions (byte layout), loaded by
kvasir, and run against HF transformers on the dequantised weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from kvasir.quantization import int4_algorithms as alg  # noqa: E402

PROMPT = [3, 17, 92, 5, 200, 41, 77, 8, 150, 23, 64, 99]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _inputs(t: int, k: int, seed: int, outliers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5  # correlated channels, as real activations
    x = torch.randn(t, k, generator=g) @ (torch.eye(k) + mix)
    if outliers:
        x[:, : k // 16] *= 20.0  # a few large channels (what AWQ protects)
    return x


def _out_err(w: torch.Tensor, iw: alg.IntWeights, x: torch.Tensor) -> float:
    return float((x @ (iw.dequantize() - w).T).pow(2).mean())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest(act_order) -> None:
    k, n = 256, 96
    x = _inputs(2048, k, seed=0)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) / k**0.5
    h = 2 * x.double().T @ x.double() / x.shape[0]
    r = alg.rtn(w, 4, 32, sym=True)
    q = alg.gptq(w, h, 4, 32, sym=True, act_order=act_order)
    assert q.q.min() >= 0 and q.q.max() <= 15 and q.g_idx.shape == (k,)
    # every group has exactly group_size columns, in act order too
    assert torch.equal(torch.bincount(q.g_idx.long()), torch.full((k // 32,), 32))
    assert _out_err(w, q, x) < 0.8 * _out_err(w, r, x)


def test_awq_beats_round_to_nearest_on_outlier_channels() -> None:
    k, n = 256, 128
    x = _inputs(1024, k, seed=2, outliers=True)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) / k**0.5
    s = alg.awq_scales([w], x, 4, 64)
    ws, xs = w * s[None, :], x / s[None, :]
    clip = alg.awq_clip(ws, xs, 4, 64)
    iw = alg.awq_quantize(ws, 4, 64, clip)
    awq_err = float((xs @ iw.dequantize().T - x @ w.T).pow(2).mean())
    rtn_err = _out_err(w, alg.rtn(w, 4, 64), x)
    assert awq_err < 0.9 * rtn_err


# ---- the written checkpoints ------------------------------------------------------------
def _unpack_words(words: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    """int32 ``[R, W]`` -> ``[R, W * P]``: column ``j * P + order[i]`` is field ``i``."""
    per = 32 // bits
    order = order or list(range(per))
    u = words.view(np.uint32)
    out = np.zeros((u.shape[0], u.shape[1] * per), dtype=np.int64)
    for j in range(u.shape[1]):
        for i in range(per):
            out[:, j * per + order[i]] = (u[:, j] >> np.uint32(bits * i)) & np.uint32(2**bits - 1)
    return out


def _dequantise_checkpoint(path: str, method: str, bits: int) -> dict[str, torch.Tensor]:
    t = {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    state = {}
    for name in list(t):
        if not name.endswith(".qweight"):
            if not name.endswith((".qzeros", ".scales", ".g_idx")):
                state[name] = t[name].float()
            continue
        m = name[: -len(".qweight")]
        scales = t[f"{m}.scales"].float().numpy()  # [G, N]
        if method == "awq":
            q = _unpack_words(t[f"{m}.qweight"].numpy(), 4, AWQ_ORDER)  # [K, N]
            z = _unpack_words(t[f"{m}.qzeros"].numpy(), 4, AWQ_ORDER)
            g_idx = np.arange(q.shape[0]) // (q.shape[0] // scales.shape[0])
        else:
            q = _unpack_words(t[f"{m}.qweight"].numpy().T.copy(), bits).T  # [K, N]
            z = _unpack_words(t[f"{m}.qzeros"].numpy(), bits) + 1  # v1: stored zero - 1
            g_idx = t[f"{m}.g_idx"].numpy()
        w = (q - z[g_idx]) * scales[g_idx]  # [K, N]
        state[f"{m}.weight"] = torch.from_numpy(w.T.copy()).float()
    return state


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from kvasir.models.default import default_model_path
    from kvasir.models.loader.gguf_loader import gguf_tokenizer

    tok = gguf_tokenizer(default_model_path())
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    calib = path / "calib.txt"
    calib.write_text("First Citizen: Before we proceed any further, hear me speak. " * 40)
    return str(path), str(calib)


def _kvasir_logprobs(path: str) -> torch.Tensor:
    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    llm = LLM(model=path, max_model_len=64, kv_cache_gb=0.01, log=False)
    try:
        out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)  # fmt: skip
    finally:
        llm.llm_engine.engine_core.shutdown()
    lps = out[0].prompt_logprobs
    return torch.tensor([lps[p][PROMPT[p]].logprob for p in range(1, len(PROMPT))])


@pytest.mark.parametrize(
    "method,bits,group,act_order",
    [("gptq", 4, 32, True), ("gptq", 8, -1, False), ("awq", 4, 32, False), ("rtn", 4, 64, False)],
)
def test_quantize_writes_the_standard_layout(tmp_path, tiny_dir, method, bits, group, act_order):
    from kvasir.quantization.int4_writer import quantize_int4

    src, calib = tiny_dir
    out = str(tmp_path / method)
    qc = quantize_int4(src, out, method, calib, bits=bits, group_size=group,
                       act_order=act_order, num_samples=4, seq_len=32)  # fmt: skip
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"] == qc
    assert qc["quant_method"] == ("awq" if method == "awq" else "gptq")
    tensors = load_file(os.path.join(out, "model.safetensors"))
    k_down = 128
    prefix = "model.layers.0.mlp.down_proj"
    assert f"{prefix}.weight" not in tensors
    assert tensors[f"{prefix}.scales"].dtype == torch.float16
    if method == "awq":
        assert tensors[f"{prefix}.qweight"].shape == (k_down, 64 // 8)
    else:
        assert tensors[f"{prefix}.qweight"].shape == (k_down * bits // 32, 64)
        g = tensors[f"{prefix}.g_idx"]
        assert g.shape == (k_down,) and (
            act_order
            or torch.equal(
                g, torch.arange(k_down, dtype=torch.int32) // (k_down if group == -1 else group)
            )
        )
    ref = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    ref.load_state_dict(_dequantise_checkpoint(out, method, bits), strict=False)
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([PROMPT])).logits[0].double(), -1)
    want = torch.tensor([lp[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))])
    got = _kvasir_logprobs(out)
    assert torch.allclose(got, want.float(), atol=2e-4), (got - want).abs().max()


def test_quantize_refuses_bad_options(tmp_path, tiny_dir) -> None:
    from kvasir.quantization.int4_writer import quantize_int4

    src, calib = tiny_dir
    with pytest.raises(ValueError, match=r"group_size must be one of \[-1, 32, 64, 128\], got 48"):
        quantize_int4(src, str(tmp_path / "x"), "gptq", calib, group_size=48)
    with pytest.raises(ValueError, match="AWQ GEMM packing is 4-bit"):
        quantize_int4(src, str(tmp_path / "x"), "awq", calib, bits=8)
    with pytest.raises(ValueError, match="needs --calib"):
        quantize_int4(src, str(tmp_path / "x"), "gptq", None)
