"""``kvasir quantize``: write an 8-bit checkpoint of an HF model in the compressed-tensors
format (as llm-compressor does), which kvasir, vLLM, the ``compressed-tensors`` library
and HF transformers read back.

Methods (every linear layer but ``lm_head``; symmetric, per output channel):

* ``fp8``: FP8 E4M3 weights, dynamic per-token FP8 activations (``float-quantized``);
* ``int8``: INT8 weights only, W8A16 (the library's format for it: ``pack-quantized``);
* ``w8a8``: INT8 weights and dynamic per-token INT8 activations (``int-quantized``).

``--calib FILE`` (``w8a8``): SmoothQuant. The largest magnitude of every input channel
of each q/k/v and gate/up projection is measured on the file's text; the factors
``s_j = max|X_j|^0.5 / max|W_j|^0.5`` move activation outliers into the weights (the
weights' columns multiplied by ``s``, the RMSNorm in front divided by it), so the
function is unchanged and per-token INT8 activations lose less.

The scales are computed here (``kvasir.quantization.utils``, the same rule as online
quantisation); the library packs and names the tensors and writes the config.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from typing import Any

logger = logging.getLogger(__name__)

METHODS = ("fp8", "int8", "w8a8")
SMOOTHQUANT_ALPHA = 0.5
_CALIB_TOKENS = 2048


def _scheme(method: str) -> Any:  # -> compressed_tensors QuantizationScheme
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kind = "float" if method == "fp8" else "int"
    weights = QuantizationArgs(
        num_bits=8, type=kind, strategy="channel", symmetric=True, dynamic=False
    )
    acts = None
    if method != "int8":
        acts = QuantizationArgs(
            num_bits=8, type=kind, strategy="token", symmetric=True, dynamic=True
        )
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def _smooth(model: Any, tokenizer: Any, calib_path: str) -> int:
    """SmoothQuant on every decoder layer's q/k/v (behind input_layernorm) and
    gate/up (behind post_attention_layernorm); returns the layers smoothed."""
    import torch

    with torch.no_grad():
        return _smooth_no_grad(model, tokenizer, calib_path)


def _smooth_no_grad(model: Any, tokenizer: Any, calib_path: str) -> int:
    import torch

    with open(calib_path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"calib file {calib_path!r} is empty")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :_CALIB_TOKENS]
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith(("self_attn.q_proj", "mlp.gate_proj")):

            def hook(mod, args, name=name):  # noqa: ANN001, ANN202
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                amax[name] = torch.maximum(amax[name], x) if name in amax else x

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    count = 0
    for layer in model.model.layers:
        pairs = [
            (layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                     layer.self_attn.v_proj], "self_attn.q_proj"),
            (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj],
             "mlp.gate_proj"),
        ]  # fmt: skip
        for norm, linears, key in pairs:
            name = next(n for n, m in model.named_modules() if m is linears[0])
            assert name.endswith(key)
            x_max = amax[name].clamp_min(1e-5)
            w_max = torch.stack([lin.weight.abs().amax(0).float() for lin in linears]).amax(0)
            s = x_max**SMOOTHQUANT_ALPHA / w_max.clamp_min(1e-5) ** (1 - SMOOTHQUANT_ALPHA)
            s = s.clamp(1e-2, 1e2)
            norm.weight.div_(s.to(norm.weight.dtype))
            for lin in linears:
                lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
            count += 1
    return count


def quantize_checkpoint(
    model_dir: str, out_dir: str, method: str, calib: str | None = None
) -> dict[str, Any]:
    """Write ``model_dir`` quantised with ``method`` to ``out_dir``; returns the
    ``quantization_config`` written."""
    import json

    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvasir.quantization.utils import FP8_E4M3, quantize_weight

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(
            f"model {model_dir!r} must be an HF model directory (config.json + safetensors)"
        )
    if calib is not None and method != "w8a8":
        raise ValueError("calib (SmoothQuant) applies to method 'w8a8' only")
    if calib is not None and not os.path.isfile(calib):
        raise FileNotFoundError(f"calib file {calib!r} does not exist")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError(f"model {model_dir!r} is already quantised")
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        if calib is not None:
            raise ValueError(f"calib needs the model's tokenizer; {model_dir!r} has none") from None
    if calib is not None:
        logger.info("SmoothQuant: %d projection groups smoothed", _smooth(model, tokenizer, calib))
    config = QuantizationConfig(
        config_groups={"group_0": _scheme(method)},
        ignore=["lm_head"],
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(model, config, show_progress=False)
    qdtype = FP8_E4M3 if method == "fp8" else torch.int8
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        _, scale = quantize_weight(module.weight.data, qdtype, "channel")
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        zp = getattr(module, "weight_zero_point", None)
        if zp is not None:
            zp.data.zero_()
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    for extra in ("generation_config.json",):
        src = os.path.join(model_dir, extra)
        if os.path.isfile(src) and not os.path.exists(os.path.join(out_dir, extra)):
            shutil.copy(src, out_dir)
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)["quantization_config"]


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an 8-bit compressed-tensors checkpoint (fp8, int8, w8a8) or a "
        "GPTQ / AWQ one (gptq, awq, rtn)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from kvasir.quantization.int4_writer import METHODS as INT_METHODS

    p.add_argument("--method", required=True, choices=[*METHODS, *INT_METHODS])
    p.add_argument(
        "--model", required=True, help="HF model directory (safetensors); gptq/awq/rtn: or .gguf"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--calib", default=None, help="calibration text: SmoothQuant (w8a8), gptq, awq")
    g = p.add_argument_group("gptq / awq / rtn (kvasir.quantization.int4_writer)")
    g.add_argument("--bits", type=int, default=4, help="4 or 8 (awq: 4)")
    g.add_argument("--group-size", type=int, default=128, help="32, 64, 128 or -1 (per channel)")
    g.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing H_ii")
    g.add_argument("--no-sym", dest="sym", action="store_false", help="gptq/rtn: zero points")
    g.add_argument("--damp", type=float, default=0.01, help="gptq: damping of the Hessian")
    g.add_argument("--num-samples", type=int, default=16, help="calibration sequences")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.method not in METHODS:
        from kvasir.quantization.int4_writer import quantize_int4

        qc = quantize_int4(
            args.model, args.out, args.method, args.calib, args.bits, args.group_size,
            args.act_order, args.sym, args.damp, args.num_samples, args.seq_len,
        )  # fmt: skip
        print(
            f"wrote {args.out} ({qc['quant_method']}, {qc['bits']}-bit, group {qc['group_size']})"
        )
        return 0
    qc = quantize_checkpoint(args.model, args.out, args.method, args.calib)
    groups = qc.get("config_groups", {})
    print(f"wrote {args.out} ({args.method}, format {qc.get('format')}, {len(groups)} group(s))")
    return 0
