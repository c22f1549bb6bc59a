"""Watermark detection on the default model (SmolLM2-135M-Instruct): temperature-1
generations of 200 tokens, each batch in one engine call; the detection threshold is
set at a 1 % false-positive rate on the null texts (unwatermarked generations of the
same prompts and tinyshakespeare passages of the same token length) and the true
positive rate is read at it, on the texts as generated and with 20 % of their tokens
replaced at random. The perplexity cost is the plain model's perplexity of the
watermarked vs the unwatermarked generations. Slow (minutes on a CPU): the numbers go
to benchmarks/RESULTS.md.

With N samples per class, the empirical 1 % FPR threshold is the null's
ceil(0.99 N)-th value; the theoretical threshold (z = 2.33, one-sided normal) is
checked too, so a small null sample cannot make the check lenient.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from kvasir import LLM, SamplingParams
from kvasir.security.watermark import Watermark, WatermarkParams

KEY = "kvasir-watermark-eval"
NUM = 16
LEN = 200
SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
TOPICS = ["the sea", "a city at night", "learning to cook", "an old clock", "winter",
          "a train journey", "bees", "the moon landing", "a library", "mountains",
          "friendship", "rain in spring"]  # fmt: skip


def _prompts(tok) -> list[list[int]]:
    out = []
    for i in range(NUM):
        msg = [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."
                f" Version {i}."}]  # fmt: skip
        out.append(tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True))
    return [list(p["input_ids"] if hasattr(p, "keys") else p) for p in out]


def _z(wm: Watermark, ids: list[int], vocab: int) -> float:
    return wm.detect(ids, vocab)["z_score"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_watermark_tpr_at_1pct_fpr_on_default_model() -> None:
    gamma, delta = 0.25, 2.0
    wm = Watermark(WatermarkParams(KEY, gamma, delta))
    sp = SamplingParams(temperature=1.0, max_tokens=LEN, ignore_eos=True, seed=11)
    marked_llm = LLM(watermark_key=KEY, watermark_gamma=gamma, watermark_delta=delta,
                     max_model_len=512, kv_cache_gb=0.3, log=False)  # fmt: skip
    tok = marked_llm.get_tokenizer()
    vocab = len(tok)
    prompts = _prompts(tok)
    marked = [
        list(o.outputs[0].token_ids) for o in marked_llm.generate(prompts, sp, use_tqdm=False)
    ]
    del marked_llm
    plain_llm = LLM(max_model_len=512, kv_cache_gb=0.3, log=False)
    plain = [list(o.outputs[0].token_ids) for o in plain_llm.generate(prompts, sp, use_tqdm=False)]
    text = SHAKESPEARE.read_text()
    rng = random.Random(0)
    human = []
    for _ in range(NUM):
        start = rng.randrange(0, len(text) - 5000)
        human.append(list(tok.encode(text[start : start + 5000], add_special_tokens=False))[:LEN])
    z_marked = [_z(wm, ids, vocab) for ids in marked]
    replaced = []
    for ids in marked:
        ids = list(ids)
        for i in rng.sample(range(len(ids)), len(ids) // 5):
            ids[i] = rng.randrange(vocab)
        replaced.append(_z(wm, ids, vocab))
    null = sorted([_z(wm, ids, vocab) for ids in plain] + [_z(wm, ids, vocab) for ids in human])
    thr = max(null[math.ceil(0.99 * len(null)) - 1], 2.326)
    tpr = sum(z > thr for z in z_marked) / NUM
    tpr_20 = sum(z > thr for z in replaced) / NUM
    fpr = sum(z > thr for z in null) / len(null)

    # Perplexity of each generation under the plain model (prompt logprobs of the
    # prompt + generation; only the generated positions count).
    def ppl(gens: list[list[int]]) -> float:
        seqs = [p + g for p, g in zip(prompts, gens, strict=True)]
        outs = plain_llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=0),
                                  use_tqdm=False)  # fmt: skip
        nll, n = 0.0, 0
        for p, o in zip(prompts, outs, strict=True):
            for pos, tid in zip(
                o.prompt_logprobs[len(p) :], o.prompt_token_ids[len(p) :], strict=True
            ):
                nll -= pos[tid].logprob
                n += 1
        return math.exp(nll / n)

    ppl_marked, ppl_plain = ppl(marked), ppl(plain)
    print(
        f"watermark default model: N={NUM} x {LEN} tokens, gamma={gamma}, delta={delta}: "
        f"threshold z={thr:.2f} (null max {null[-1]:.2f}), TPR {tpr:.3f}, TPR after 20 % "
        f"replaced {tpr_20:.3f}, FPR {fpr:.3f}; median z marked {sorted(z_marked)[NUM // 2]:.2f},"
        f" replaced {sorted(replaced)[NUM // 2]:.2f}; perplexity plain {ppl_plain:.2f}, "
        f"watermarked {ppl_marked:.2f}"
    )
    assert tpr >= 0.95 and tpr_20 >= 0.80 and fpr <= 0.01 + 1e-9
