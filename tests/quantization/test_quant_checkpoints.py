"""Quantised checkpoints of a tiny random Llama: compressed-tensors FP8 and INT8 ones
written in the test by the ``compressed-tensors`` library (scales from its own
``calculate_qparams``), an HF transformers FP8 block-scale one, and ``kvasir quantize``
output read back by compressed-tensors / HF transformers; kvasir's logits against the
dequantised-weight reference. Plus the refusals of bad quantisation input."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from kvasir.attention.backend import get_backend_cls  # noqa: E402
from kvasir.config import ModelConfig  # noqa: E402
from kvasir.models.loader import load_arch_config, load_model  # noqa: E402

PROMPT = [3, 17, 92, 5, 200, 41, 77, 8, 150, 23, 64, 99]


def _tiny_hf(seed: int = 0, hidden: int = 64, inter: int = 128, heads: int = 4, kv: int = 2):
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # unit-scale activations so quantisation error shows
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def _kvasir_logits(path: str, **kw) -> torch.Tensor:
    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    llm = LLM(model=path, max_model_len=64, kv_cache_gb=0.01, log=False, **kw)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=5), use_tqdm=False)
    # The engine's logprobs at every prompt position of the actual next token.
    lps = out[0].prompt_logprobs
    llm.llm_engine.engine_core.shutdown()
    return torch.tensor([lps[p][PROMPT[p]].logprob for p in range(1, len(PROMPT))])


def _hf_logprobs(model) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return torch.tensor([lp[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))])


def _write_with_library(model, path, kind: str, acts: bool) -> None:  # noqa: ANN001
    """What llm-compressor does: attach the scheme, fill the scales, compress, save."""
    wargs = QuantizationArgs(num_bits=8, type=kind, strategy="channel", symmetric=True)
    aargs = None
    if acts:
        aargs = QuantizationArgs(num_bits=8, type=kind, strategy="token", symmetric=True,
                                 dynamic=True)  # fmt: skip
    scheme = QuantizationScheme(targets=["Linear"], weights=wargs, input_activations=aargs)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                quantization_status=QuantizationStatus.INITIALIZED)  # fmt: skip
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        w = module.weight.data
        scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), wargs)
        module.weight_scale.data.copy_(scale)
        module.weight_zero_point.data.copy_(zp)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)


def _dequantised_reference(path: str, like) -> transformers.LlamaForCausalLM:  # noqa: ANN001
    """The float model with every quantised weight replaced by weight * weight_scale,
    read straight from the saved tensors."""
    tensors = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, f)))
    ref = transformers.LlamaForCausalLM(like.config).eval()
    state = {}
    for name, t in tensors.items():
        if name.endswith(("weight_scale", "weight_zero_point", "input_scale", "weight_shape")):
            continue
        module = name.rpartition(".")[0]
        if name.endswith(".weight_packed"):
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            shape = torch.Size(tensors[f"{module}.weight_shape"].tolist())
            t = unpack_from_int32(t, 8, shape)
            name = f"{module}.weight"
        if f"{module}.weight_scale" in tensors and name.endswith(".weight"):
            t = t.float() * tensors[f"{module}.weight_scale"].float().reshape(-1, 1)
        state[name] = t.float()
    ref.load_state_dict(state, strict=False)
    return ref


@pytest.mark.parametrize(
    "kind,acts,fmt,tol",
    [
        # FP8 runs weight-only on the CPU: the dequantised reference exactly.
        ("float", True, "float-quantized", 1e-3),
        # INT8 W8A8 quantises activations too: per-token INT8 error on top.
        ("int", True, "int-quantized", 0.1),
        ("int", False, "pack-quantized", 1e-3),
    ],
)
def test_compressed_tensors_checkpoint_matches_dequantised_reference(
    tmp_path, kind, acts, fmt, tol
) -> None:
    model = _tiny_hf()
    _write_with_library(model, str(tmp_path), kind, acts)
    qc = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    ref = _hf_logprobs(_dequantised_reference(str(tmp_path), model))
    float_ref = _hf_logprobs(_tiny_hf())
    ours = _kvasir_logits(str(tmp_path))
    assert (ours - ref).abs().max() < tol
    # ... and the reference is really quantised (not the float weights).
    assert (ref - float_ref).abs().max() > 1e-4


def test_hf_fp8_block_checkpoint(tmp_path) -> None:
    """HF transformers' FP8 format (DeepSeek / Qwen3 FP8): E4M3 weights with 128 x 128
    ``weight_scale_inv`` blocks, lm_head left in ``modules_to_not_convert``."""
    from kvasir.quantization.utils import FP8_E4M3, quantize_weight

    model = _tiny_hf(hidden=256, inter=384, heads=4, kv=2)  # head_dim 64: k/v 128 rows
    model.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    out = {}
    for name, t in state.items():
        if name.endswith("proj.weight"):
            q, s = quantize_weight(t, FP8_E4M3, "block")
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t
    save_file(out, str(tmp_path / "model.safetensors"))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128],
                                  "modules_to_not_convert": ["lm_head"]}  # fmt: skip
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    ref_model = _tiny_hf(hidden=256, inter=384, heads=4, kv=2)
    with torch.no_grad():
        from kvasir.kernels.quant_gemm import dequantize_weight

        for name, p in ref_model.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(dequantize_weight(out[name], out[name + "_scale_inv"]))
    ours, ref = _kvasir_logits(str(tmp_path)), _hf_logprobs(ref_model)
    assert (ours - ref).abs().max() < 1e-3


@pytest.mark.parametrize("method", ["fp8", "int8", "w8a8"])
def test_kvasir_quantize_round_trips(tmp_path, method) -> None:
    from kvasir.quantization.writer import quantize_checkpoint

    src, dst = tmp_path / "float", tmp_path / "q"
    model = _tiny_hf(seed=1)
    model.save_pretrained(str(src))
    qc = quantize_checkpoint(str(src), str(dst), method)
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    # compressed-tensors reads the config back; HF transformers loads (decompresses)
    # the checkpoint through the library.
    from compressed_tensors.quantization import QuantizationConfig as CTConfig

    parsed = CTConfig.model_validate(qc)
    assert parsed.config_groups["group_0"].weights.num_bits == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    hf_lp, float_lp = _hf_logprobs(hf), _hf_logprobs(model)
    assert (hf_lp - float_lp).abs().max() < 0.3  # 8-bit close to the float model
    ours = _kvasir_logits(str(dst))
    ref = _hf_logprobs(_dequantised_reference(str(dst), model))
    tol = 0.1 if method == "w8a8" else 1e-3  # weight-only on the CPU: exact
    assert (ours - ref).abs().max() < tol


def test_bad_quantisation_input_is_refused(tmp_path) -> None:
    from kvasir.engine.arg_utils import EngineArgs

    model = _tiny_hf()
    model.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "config.json"
    cfg = json.load(open(cfg_path))

    def with_qc(qc):  # noqa: ANN001, ANN202
        json.dump({**cfg, "quantization_config": qc}, open(cfg_path, "w"))
        return ModelConfig(model=str(tmp_path))

    backend = get_backend_cls("torch")
    arch = load_arch_config(ModelConfig(model=str(tmp_path)))

    def load(mc):  # noqa: ANN001, ANN202
        return load_model(mc, arch, backend, torch.float32, torch.device("cpu"))

    with pytest.raises(
        ValueError, match=r"quant_method 'hqq' is not supported.*compressed-tensors.*gptq"
    ):
        load(with_qc({"quant_method": "hqq"}))
    with pytest.raises(ValueError, match=r"weight_block_size must be \[128, 128\]"):
        load(with_qc({"quant_method": "fp8", "weight_block_size": [64, 64]}))
    bad_ct = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "config_groups": {"g": {"targets": ["Linear"], "weights": {
                  "num_bits": 4, "type": "float", "strategy": "channel"}}}}  # fmt: skip
    with pytest.raises(
        ValueError, match=r"config_groups\.g\.weights\.num_bits must be one of \[8\]"
    ):
        load(with_qc(bad_ct))
    # An HF FP8 checkpoint whose scale has the wrong shape.
    with_qc(None)
    state = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)
    state[name + "_scale"] = torch.ones(7)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"down_proj: weight_scale has 7 entries, expected 64"):
        load(with_qc({"quant_method": "fp8", "activation_scheme": "dynamic",
                      "modules_to_not_convert": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "lm_head"]}))  # fmt: skip
    # Flags: unknown values and conflicts name the field and the supported values.
    with pytest.raises(ValueError, match=r"quantization must be one of"):
        ModelConfig(model="x", quantization="int4")
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of"):
        EngineArgs(kv_cache_dtype="int8").create_engine_config()
    with pytest.raises(ValueError, match=r"calculate_kv_scales needs an FP8 kv_cache_dtype"):
        EngineArgs(calculate_kv_scales=True).create_engine_config()
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    with pytest.raises(ValueError, match=r"quantization 'int8' conflicts with the checkpoint"):
        load(ModelConfig(model=with_qc(qc).model, quantization="int8"))


def test_compressed_tensors_kv_cache_scales(tmp_path) -> None:
    """A ``kv_cache_scheme`` checkpoint: its per-tensor ``self_attn.k_scale`` /
    ``v_scale`` reach the attention layers with an FP8 cache (and go unused, with a
    warning, without one)."""
    model = _tiny_hf()
    _write_with_library(model, str(tmp_path), "float", True)
    path = str(tmp_path / "model.safetensors")
    state = load_file(path)
    for i in range(2):
        state[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([0.03 + 0.01 * i])
        state[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([0.02])
    save_file(state, path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["quantization_config"]["kv_cache_scheme"] = {
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True,
    }  # fmt: skip
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    mc = ModelConfig(model=str(tmp_path))
    arch = load_arch_config(mc)
    ours = load_model(mc, arch, get_backend_cls("torch"), torch.float32, torch.device("cpu"),
                      kv_cache_dtype="fp8")  # fmt: skip
    attn = [m for n, m in ours.named_modules() if n.endswith("self_attn.attn")]
    assert [round(float(a.k_scale[0]), 4) for a in attn] == [0.03, 0.04]
    assert float(attn[0].v_scale[1]) == pytest.approx(0.02)
    assert attn[0].backend.kv_scales is not None and attn[0].k_scale.dtype == torch.float32
    ref = _hf_logprobs(_dequantised_reference(str(tmp_path), model))
    fp8_kv = _kvasir_logits(str(tmp_path), kv_cache_dtype="fp8")
    assert (fp8_kv - ref).abs().max() < 0.1


def test_kvasir_quantize_smoothquant_calibration(tmp_path) -> None:
    """``--calib``: SmoothQuant keeps the float function (weights' columns times s,
    the norm before them over s) and the smoothed W8A8 checkpoint loads in kvasir."""
    import copy

    from kvasir.models.default import default_model_path
    from kvasir.models.loader import load_tokenizer
    from kvasir.quantization.writer import _smooth, quantize_checkpoint

    tok = load_tokenizer(ModelConfig(model=default_model_path()))
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, 3] *= 20.0  # an outlier channel
    src, dst = tmp_path / "float", tmp_path / "q"
    model.save_pretrained(str(src))
    tok.save_pretrained(str(src))
    calib = tmp_path / "calib.txt"
    calib.write_text("To be, or not to be, that is the question. " * 20)
    smoothed = copy.deepcopy(model)
    assert _smooth(smoothed, tok, str(calib)) == 4  # 2 layers x (qkv, gate/up)
    ids = torch.tensor([tok.encode("Whether 'tis nobler in the mind to suffer")])
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    norm0 = smoothed.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm0, model.model.layers[0].input_layernorm.weight)
    quantize_checkpoint(str(src), str(dst), "w8a8", calib=str(calib))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    assert hf(ids).logits.shape[-1] == len(tok)
    with pytest.raises(ValueError, match="calib .* applies to method 'w8a8' only"):
        quantize_checkpoint(str(src), str(tmp_path / "x"), "fp8", calib=str(calib))
