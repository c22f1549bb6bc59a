"""The default model (SmolLM2-135M Q4_1 GGUF) with its linear weights kept packed
(``--quantization gguf``) against the same file dequantised at load (``--quantization
none``, float32): resident weight bytes, and batch-1 greedy decode speed on this device.

    PYTHONPATH=. python benchmarks/bench_gguf_packed.py [--tokens 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer (the KV cache is not part of the model) and
    of the packed GGUF shards; ``linear``: the decoder's linear layers alone."""
    from kvasir.layers.linear import LinearBase

    total = linear = 0
    seen: set[int] = set()
    for module in model.modules():
        own = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))]
        own += [t for _, t in getattr(module, "gguf_shards", [])]
        nbytes = 0
        for t in own:
            if t.device.type == "meta" or id(t) in seen:
                continue
            seen.add(id(t))
            nbytes += t.numel() * t.element_size()
        total += nbytes
        if isinstance(module, LinearBase) and module.prefix != "lm_head":
            linear += nbytes
    return {"total": total, "linear": linear}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from kvasir.entrypoints.llm import LLM
    from kvasir.models.default import default_model_path
    from kvasir.sampling_params import SamplingParams

    result: dict[str, object] = {"device": args.device, "tokens": args.tokens}
    if args.device == "cpu":
        result["cpu_threads"] = torch.get_num_threads()
    for quantization in ("none", "gguf"):
        llm = LLM(model=default_model_path(), quantization=quantization, device=args.device,
                  max_model_len=256, kv_cache_gb=0.05, log=False)  # fmt: skip
        try:
            model = llm.llm_engine.engine_core.runner.model
        except AttributeError:
            model = None
        sp = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
        t = time.perf_counter()
        llm.generate(["The capital of France is"], sp, use_tqdm=False)
        elapsed = time.perf_counter() - t
        entry: dict[str, object] = {"decode_tok_s": round(args.tokens / elapsed, 2)}
        if model is not None:
            entry["weight_bytes"] = weight_bytes(model)
        result[quantization] = entry
        llm.llm_engine.engine_core.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
