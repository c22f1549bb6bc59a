"""Decode cost against context length: a state-space model (Mamba-2, random weights)
against a Llama of about the same parameter count, in the same process and run.

For each context length L a single request prefills L random tokens, then decodes; the
decode rate is measured over the steps after the first token (engine steps timed one
by one, so the prefill does not count). A Mamba decode step reads a fixed-size state,
so its rate should stay flat as L grows; attention reads L cached tokens per step.

    python benchmarks/bench_ssm_context.py --contexts 1024 4096 16384 --out DIR

prints one JSON line per (model, context) and writes ``ssm_context.png`` (matplotlib)
and ``ssm_context.json`` to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from kvasir import SamplingParams
from kvasir.engine.arg_utils import EngineArgs
from kvasir.engine.llm_engine import LLMEngine

# About 30M parameters each (embeddings included), 8 layers.
SHAPES = {
    "mamba2": {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": 512,
        "num_hidden_layers": 8, "state_size": 64, "expand": 2, "num_heads": 16,
        "head_dim": 64, "n_groups": 1, "conv_kernel": 4, "chunk_size": 64,
        "vocab_size": 32000, "tie_word_embeddings": True, "layer_norm_epsilon": 1e-5,
    },
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
        "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    },
}  # fmt: skip


def measure(config_path: str, context: int, decode_tokens: int, device: str) -> float:
    """Decode tokens/s of one request after a ``context``-token prompt."""
    args = EngineArgs(
        model=config_path,
        load_format="dummy",
        max_model_len=context + decode_tokens + 8,
        max_num_seqs=1,
        max_num_batched_tokens=2048,
        enable_prefix_caching=False,
        kv_cache_gb=2.0,
        device=device,
        dtype="float32" if device == "cpu" else "auto",
    )
    engine = LLMEngine.from_engine_args(args, log=False)
    try:
        prompt = np.random.default_rng(0).integers(10, 30000, context).tolist()
        params = SamplingParams(max_tokens=decode_tokens + 1, ignore_eos=True, temperature=0.0)
        engine.add_request("r", prompt, params)
        got, times = 0, []
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            n = sum(len(c.token_ids) for o in outs for c in o.outputs)
            if got >= 1 and n > got:  # a decode step (the first token came with prefill)
                times.append(dt)
            got = max(got, n)
        return len(times) / sum(times)
    finally:
        engine.engine_core.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, cfg in SHAPES.items():
            path = os.path.join(d, f"{name}.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            results[name] = {}
            for ctx in a.contexts:
                rate = measure(path, ctx, a.decode_tokens, a.device)
                results[name][ctx] = rate
                print(json.dumps({"model": name, "context": ctx, "decode_tok_s": round(rate, 2)}))
    with open(os.path.join(a.out, "ssm_context.json"), "w") as f:
        json.dump(results, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_ctx in results.items():
        xs = sorted(by_ctx)
        ax.plot(xs, [by_ctx[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"Decode rate vs context: Mamba-2 vs Llama (~30M params, {a.device})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "ssm_context.png"), dpi=120)


if __name__ == "__main__":
    main()
