"""Watermark: the green list is a keyed, uniform split; generation through the engine
(batched, n > 1, speculative decoding) is detectable and unwatermarked text is not; the
biased distribution is exactly softmax(logits + delta * green)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from kvasir import LLM, SamplingParams
from kvasir.security.watermark import Watermark, WatermarkParams

KEY = "test-watermark-key"
VOCAB = 1024
MAX_NEW = 64


def test_green_list_is_a_keyed_gamma_split() -> None:
    wm = Watermark(WatermarkParams(KEY, gamma=0.25))
    ctx = torch.arange(64, dtype=torch.int64)[:, None]
    green = wm.green_mask(ctx, 8192)  # [64, 8192]
    frac = green.float().mean(dim=1)
    # Each row is Binomial(8192, 0.25)/8192: sd 0.0048; 6 sd bounds.
    assert (frac - 0.25).abs().max() < 0.03
    # Different contexts give different lists, another key another split.
    assert (green[0] != green[1]).float().mean() > 0.3
    other = Watermark(WatermarkParams("another-key", gamma=0.25)).green_mask(ctx, 8192)
    assert (green != other).float().mean() > 0.3
    # The detector's per-position test agrees with the mask the sampler uses.
    ids = [5, 17, 900, 3, 3, 4000]
    flags = wm.is_green(ids, 8192)
    for i in range(1, len(ids)):
        assert flags[i - 1] == bool(wm.green_mask(torch.tensor([[ids[i - 1]]]), 8192)[0, ids[i]])


def test_apply_is_logits_plus_delta_on_green() -> None:
    wm = Watermark(WatermarkParams(KEY, gamma=0.5, delta=2.0, context=2))
    logits = torch.randn(3, 50, dtype=torch.float64)
    ctx = torch.tensor([[1, 2], [3, -1], [7, 7]])
    out = wm.apply(logits, ctx)
    ref = logits + 2.0 * wm.green_mask(ctx, 50).double()
    assert torch.equal(out, ref)


def test_detect_statistics_by_hand() -> None:
    wm = Watermark(WatermarkParams(KEY, gamma=0.25, context=1))
    ids = list(range(100, 301))
    r = wm.detect(ids, 8192)
    g, t = r["num_green_tokens"], r["num_tokens_scored"]
    assert t == 200
    assert r["z_score"] == pytest.approx((g - 50) / math.sqrt(200 * 0.25 * 0.75))
    assert r["p_value"] == pytest.approx(0.5 * math.erfc(r["z_score"] / math.sqrt(2)))
    # A repeated (context, token) pair is scored once.
    assert wm.detect([1, 2] * 50, 8192)["num_tokens_scored"] == 2


def _llm(**kw) -> LLM:
    return LLM(model="tiny-llama", load_format="dummy", max_model_len=256, kv_cache_gb=0.02,
               log=False, **kw)  # fmt: skip


def _z(wm: Watermark, out) -> list[float]:
    return [
        wm.detect(out.prompt_token_ids[-1:] + list(c.token_ids), VOCAB)["z_score"]
        for c in out.outputs
    ]


@pytest.fixture(scope="module")
def wm() -> Watermark:
    return Watermark(WatermarkParams(KEY, gamma=0.25, delta=2.0))


def test_engine_generations_are_detected_batched_and_n(wm: Watermark) -> None:
    """Temperature-1 samples from a random tiny model (high entropy: the watermark's
    best case) in one batch, four prompts x n=2, vs the same without the watermark."""
    prompts = [[1, 5 + i, 40 + 3 * i, 7] for i in range(4)]
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True, seed=3)
    marked = _llm(watermark_key=KEY).generate(prompts, sp, use_tqdm=False)
    plain = _llm().generate(prompts, sp, use_tqdm=False)
    z_marked = [z for o in marked for z in _z(wm, o)]
    z_plain = [z for o in plain for z in _z(wm, o)]
    assert len(z_marked) == 8 and min(z_marked) > 4.0, z_marked
    # Unmarked: z ~ N(0, 1) per sequence; 4 sd keeps a false alarm below 1e-4.
    assert max(abs(z) for z in z_plain) < 4.0, z_plain


def test_speculative_decoding_keeps_the_watermark(wm: Watermark) -> None:
    """n-gram speculation on a repetitive prompt proposes drafts; the verifier must
    accept/resample against the watermarked distribution, so the output stays marked."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "prompt_lookup_max": 3}  # fmt: skip
    llm = _llm(watermark_key=KEY, speculative_config=spec)
    prompts = [[1] + list(range(100, 300)) for _ in range(2)]  # many tokens to look up
    sp = SamplingParams(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True, seed=5)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    z = [zz for o in outs for zz in _z(wm, o)]
    assert min(z) > 4.0, z
    assert sum(o.metrics.num_draft_tokens for o in outs) > 0  # drafts were verified


def test_watermark_detect_cli(tmp_path) -> None:
    from kvasir.models.default import default_model_path  # noqa: F401  (tokenizer source)

    f = tmp_path / "t.txt"
    f.write_text("To be, or not to be, that is the question.")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvasir.entrypoints.cli",
            "watermark",
            "detect",
            "--key",
            KEY,
            str(f),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(r) >= {"z_score", "p_value", "num_tokens_scored"}
    assert r["num_tokens_scored"] > 5 and abs(r["z_score"]) < 4.0
