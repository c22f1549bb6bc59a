"""``kvasir quantize --method gptq|awq|rtn``: quantise an HF Llama-family model (a
directory, or a GGUF file read through HF transformers) to integer weights and write a
GPTQ (``rtn`` too) or AWQ checkpoint in the layout AutoGPTQ / AutoAWQ write and HF
transformers, vLLM and kvasir read.

Calibration (``--calib FILE``, text): ``--num-samples`` sequences of ``--seq-len`` tokens
from the file's start run through the decoder one layer at a time; each layer's linear
inputs are captured on the float layer, its weights quantised
(``kvasir.quantization.int4_algorithms``), and the layer rerun with the quantised weights
to give the next layer its inputs (errors propagate as they will at inference). The LM
head and the embedding stay float.

GPTQ (``--bits 4|8``, ``--group-size``, ``--act-order``, ``--sym/--no-sym``): every
projection from the Hessian of its inputs. AWQ (4-bit): q/k/v scaled against the input
norm, gate/up against the post-attention norm, down against up_proj (and o against v
where the heads are not grouped), the scales folded into the layer in front so the
float function is unchanged; then clipping (not for q/k) and zero-point rounding.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from kvasir.quantization import int4_algorithms as alg
from kvasir.quantization.wna16_linear import AWQ_ORDER, pack_along_n

logger = logging.getLogger(__name__)

METHODS = ("gptq", "awq", "rtn")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Stop(Exception):
    pass


def _load_hf(model_path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.expanduser(model_path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        d, f = os.path.dirname(path), os.path.basename(path)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(d, gguf_file=f)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model {model_path!r} must be an HF model directory or a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError(f"model {model_path!r} is already quantised")
    return model, AutoTokenizer.from_pretrained(path)


def _calibration_ids(tokenizer: Any, calib: str, num_samples: int, seq_len: int) -> torch.Tensor:
    if not os.path.isfile(calib):
        raise FileNotFoundError(f"calib file {calib!r} does not exist")
    with open(calib, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = num_samples * seq_len
    if ids.numel() < need:
        raise ValueError(f"calib file {calib!r} has {ids.numel()} tokens, need {need}")
    return ids[:need].reshape(num_samples, seq_len)


def _layer_inputs(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """The first decoder layer's hidden-state input and its other keyword arguments."""
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):  # noqa: ANN001, ANN202
        captured["x"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured["kwargs"].items() if k != "hidden_states"}
    return captured["x"], kwargs


def _run_layer(layer: Any, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _capture(layer: Any, x: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Each projection's input ``[tokens, K]`` on the float layer."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in _PROJ:
        module = _proj(layer, name)

        def hook(mod, args, name=name):  # noqa: ANN001, ANN202
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        _run_layer(layer, x, kwargs)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _proj(layer: Any, name: str) -> Any:
    return getattr(layer.self_attn if name in _PROJ[:4] else layer.mlp, name)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2.0 * x.T @ x / x.shape[0]


def _quantize_layer(
    layer: Any, x: torch.Tensor, kwargs: dict[str, Any], method: str, opts: dict[str, Any]
) -> dict[str, alg.IntWeights]:
    bits, group = opts["bits"], opts["group_size"]
    inputs = _capture(layer, x, kwargs)
    result: dict[str, alg.IntWeights] = {}
    hessians: dict[tuple, torch.Tensor] = {}  # q/k/v (and gate/up) see the same tensor
    with torch.no_grad():
        if method == "awq":
            _awq_scale_layer(layer, inputs, bits, group)
        for name in _PROJ:
            w = _proj(layer, name).weight.data.float()
            # GPTQ's v1 format cannot store a zero point of 0 (it stores zero - 1).
            if method == "rtn":
                result[name] = alg.rtn(w, bits, group, opts["sym"], min_zero=1)
            elif method == "gptq":
                x_in = inputs[name]
                key = (x_in.data_ptr(), tuple(x_in.shape))
                h = hessians.get(key)
                if h is None:
                    h = hessians[key] = _hessian(x_in)
                result[name] = alg.gptq(w, h, bits, group, opts["sym"], opts["act_order"],
                                        opts["damp"], min_zero=1)  # fmt: skip
            else:
                clip = None
                if name not in ("q_proj", "k_proj"):
                    clip = alg.awq_clip(w, inputs[name], bits, group)
                result[name] = alg.awq_quantize(w, bits, group, clip)
            _proj(layer, name).weight.data.copy_(result[name].dequantize())
    return result


def _awq_scale_layer(layer: Any, inputs: dict[str, torch.Tensor], bits: int, group: int) -> None:
    """Fold AWQ's scales into the layer; ``inputs`` are divided by them in place."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [
        (layer.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj],
         ["q_proj", "k_proj", "v_proj"]),
        (layer.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj],
         ["gate_proj", "up_proj"]),
        (mlp.up_proj.weight, [mlp.down_proj], ["down_proj"]),
    ]  # fmt: skip
    if attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1]:
        groups.append((attn.v_proj.weight, [attn.o_proj], ["o_proj"]))
    for prev, linears, names in groups:
        s = alg.awq_scales([lin.weight.data for lin in linears], inputs[names[0]], bits, group)
        if prev.dim() == 1:
            prev.data.div_(s)
        else:  # the rows of the projection in front produce the scaled channels
            prev.data.div_(s[:, None])
        for lin in linears:
            lin.weight.data.mul_(s[None, :])
        for name in names:
            inputs[name] = inputs[name] / s[None, :]


def _gptq_tensors(iw: alg.IntWeights) -> dict[str, torch.Tensor]:
    from kvasir.kernels.wna16 import pack_along_k

    return {
        "qweight": pack_along_k(iw.q.T, iw.bits),  # [K / P, N]
        "qzeros": pack_along_n(iw.zeros - 1, iw.bits),  # v1 stores zero - 1 (zeros >= 1)
        "scales": iw.scales.half(),
        "g_idx": iw.g_idx,
    }


def _awq_tensors(iw: alg.IntWeights) -> dict[str, torch.Tensor]:
    return {
        "qweight": pack_along_n(iw.q.T.contiguous(), 4, AWQ_ORDER),  # [K, N / 8]
        "qzeros": pack_along_n(iw.zeros, 4, AWQ_ORDER),
        "scales": iw.scales.half(),
    }


def quantize_int4(
    model_path: str,
    out_dir: str,
    method: str,
    calib: str | None,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = True,
    damp: float = 0.01,
    num_samples: int = 16,
    seq_len: int = 512,
) -> dict[str, Any]:
    """Write ``model_path`` quantised with ``method`` to ``out_dir``; returns the
    ``quantization_config`` written."""
    from safetensors.torch import save_file

    from kvasir.quantization.wna16_linear import WNA16Scheme

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    WNA16Scheme(bits, group_size, "awq" if method == "awq" else "gptq")  # validates both
    if method != "rtn" and calib is None:
        raise ValueError(f"method {method!r} needs --calib FILE (calibration text)")
    model, tokenizer = _load_hf(model_path)
    if method == "rtn":
        ids = torch.tensor([[tokenizer.bos_token_id or 0]])
    else:
        ids = _calibration_ids(tokenizer, calib or "", num_samples, seq_len)
    opts = {"bits": bits, "group_size": group_size, "sym": sym if method != "awq" else False,
            "act_order": act_order, "damp": damp}  # fmt: skip
    packed: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        x, kwargs = _layer_inputs(model, ids)
        for i, layer in enumerate(model.model.layers):
            weights = _quantize_layer(layer, x, kwargs, method, opts)
            for name, iw in weights.items():
                prefix = f"model.layers.{i}.{'self_attn' if name in _PROJ[:4] else 'mlp'}.{name}"
                parts = _awq_tensors(iw) if method == "awq" else _gptq_tensors(iw)
                packed.update({f"{prefix}.{k}": v.contiguous() for k, v in parts.items()})
            if method != "rtn":
                x = _run_layer(layer, x, kwargs)
            logger.info("layer %d quantised", i)
    state = {}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in _PROJ and module.startswith("model."):
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[name] = t.contiguous()
    state.update(packed)
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if method == "awq":
        qc: dict[str, Any] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                              "zero_point": True, "version": "gemm"}  # fmt: skip
    else:
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
              "desc_act": act_order, "sym": sym, "damp_percent": damp,
              "true_sequential": False, "static_groups": False,
              "checkpoint_format": "gptq"}  # fmt: skip
    config = model.config.to_dict()
    config["quantization_config"] = qc
    config["torch_dtype"] = "float16"
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(out_dir)
    return qc
