"""``kvasir eval perplexity``: the sliding windows, the engine's prompt-logprob
perplexity against HF transformers' own forward on the same windows, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from kvasir.eval.perplexity import perplexity, sliding_windows

transformers = pytest.importorskip("transformers")


def test_sliding_windows_score_every_position_once() -> None:
    for n, length, stride in [(100, 32, 20), (100, 32, 32), (64, 32, 1), (10, 32, 8), (33, 32, 31)]:
        windows = sliding_windows(n, length, stride)
        scored = [p for w in windows for p in range(w.first_scored, w.end)]
        # Only the first token of a window that overlaps nothing has no context to score.
        unscorable = [w.begin for prev, w in zip(windows, windows[1:]) if w.begin == prev.end]
        assert bool(unscorable) == (stride == length and n > length)
        assert scored == [p for p in range(1, n) if p not in unscorable]
        assert windows[-1].end == n
        for w in windows:
            assert w.end - w.begin <= length and w.begin < w.first_scored
            # every scored token sees at least length - stride tokens of context
            assert w.first_scored - w.begin >= min(length - stride, w.first_scored)
    assert len(sliding_windows(1000, 32, 16, max_windows=3)) == 3
    for bad in [(100, 1, 1), (100, 32, 0), (100, 32, 33), (1, 32, 8)]:
        with pytest.raises(ValueError, match="max_model_len|stride|at least 2"):
            sliding_windows(*bad)


def test_engine_perplexity_matches_hf(tmp_path) -> None:
    from kvasir.entrypoints.llm import LLM

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaky enough that the perplexity is far from the vocab size
        hf.lm_head.weight.mul_(3.0)
    hf.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    length, stride = 48, 20
    nll, count = 0.0, 0
    for w in sliding_windows(len(ids), length, stride):
        with torch.no_grad():
            logits = hf(torch.tensor([ids[w.begin : w.end]])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        for p in range(w.first_scored, w.end):
            nll -= lp[p - w.begin - 1, ids[p]].item()
            count += 1
    ref = math.exp(nll / count)

    llm = LLM(model=str(tmp_path), max_model_len=length + 1, kv_cache_gb=0.01, log=False)
    res = perplexity(llm, ids, length, stride, use_tqdm=False)
    assert res.num_scored_tokens == count == len(ids) - 1
    assert res.num_windows == len(sliding_windows(len(ids), length, stride))
    assert 2.0 < ref < 10_000.0
    assert res.perplexity == pytest.approx(ref, rel=1e-4)


def test_cli_prints_perplexity_and_json(tmp_path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 40)
    out = tmp_path / "ppl.json"
    r = subprocess.run(
        [sys.executable, "-m", "kvasir.entrypoints.cli", "eval", "perplexity",
         "--dataset", str(data), "--max-model-len", "64", "--stride", "48",
         "--max-windows", "2", "--kv-cache-gb", "0.05", "--json", str(out), "--no-progress",
         "--kv-cache-dtype", "fp8", "--calculate-kv-scales", "--compare"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    assert summary["num_windows"] == 2 and summary["num_scored_tokens"] == 63 + 48
    # A repeated sentence is easy to predict once seen: far below the vocabulary size.
    assert 1.0 < summary["perplexity"] < 20.0
    # --compare: the same windows with the unquantised cache, and the relative change.
    base = summary["baseline"]
    assert (
        summary["config"]["kv_cache_dtype"] == "fp8" and base["config"]["kv_cache_dtype"] == "auto"
    )
    assert base["num_scored_tokens"] == summary["num_scored_tokens"]
    assert summary["relative_delta"] == pytest.approx(
        summary["perplexity"] / base["perplexity"] - 1
    )
    assert summary["perplexity"] != base["perplexity"]
    assert "fp8_e4m3" in r.stderr  # the start-up line names the cache dtype
    assert "perplexity" in r.stdout.splitlines()[0]
    bad = subprocess.run(
        [sys.executable, "-m", "kvasir.entrypoints.cli", "eval", "perplexity",
         "--dataset", str(tmp_path / "missing.txt")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "missing.txt" in bad.stderr
