"""Speculative decoding is lossless for sampled requests, through the whole engine.

A tiny HF Llama with a 24-token vocabulary is the target; a differently seeded random
one is a deliberately poor draft (and n-gram lookup gives point-mass drafts). Over many
seeded requests (temperature 1, three output tokens), the empirical distribution of
the tokens at output positions 1 and 2 -- made by accepted drafts, residual resamples
and bonus tokens -- must match the target's marginal distribution computed directly
with HF transformers (chi-squared, p > 0.01 at a fixed seed set).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from model_utils import randomize_

from kvasir import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

VOCAB = 24
# Every token occurs in the prompt, so n-gram lookup always finds a 1-gram to draft from.
PROMPT = [11, 4, 19, 0, 7, 22, 13, 2, 16, 9, 1, 20, 5, 14, 23, 8, 3, 17, 10, 21, 6, 15, 12, 18]
NUM_SAMPLES = 1500


def _save(path, seed: int) -> str:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    randomize_(model, seed=seed)
    with torch.no_grad():  # a flatter distribution: every token gets some mass
        model.lm_head.weight.mul_(0.3)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    return _save(tmp_path_factory.mktemp("target"), 1), _save(tmp_path_factory.mktemp("draft"), 2)


def _marginals(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """P(token at output position 1) and P(position 2), summed over the earlier tokens."""
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def next_probs(prefixes: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor([PROMPT + p for p in prefixes])
        with torch.no_grad():
            return torch.softmax(hf(ids).logits[:, -1].double(), dim=-1)

    p0 = next_probs([[]])[0]  # [V]
    p1_given = next_probs([[a] for a in range(VOCAB)])  # [V, V]
    joint01 = p0[:, None] * p1_given
    pairs = list(itertools.product(range(VOCAB), repeat=2))
    p2_given = next_probs([list(t) for t in pairs]).reshape(VOCAB, VOCAB, VOCAB)
    m1 = joint01.sum(0)
    m2 = (joint01[:, :, None] * p2_given).sum((0, 1))
    return m1, m2


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    keep = expected >= 5  # pool the rare tokens into one bin
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_sampled_tokens_follow_the_target_distribution(models, method: str) -> None:
    target, draft = models
    spec = {"method": method, "num_speculative_tokens": 3}
    if method == "draft_model":
        spec["model"] = draft
    llm = LLM(model=target, max_model_len=64, speculative_config=spec, log=False)
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=3, ignore_eos=True)
        for s in range(NUM_SAMPLES)
    ]
    outs = llm.generate([PROMPT] * NUM_SAMPLES, params, use_tqdm=False)
    stats = llm.llm_engine.engine_core.scheduler.make_stats()
    # Drafts were verified, and some (not all) rejected: every path of the sampler ran.
    assert stats.spec_num_draft_tokens > NUM_SAMPLES // 2
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    toks = torch.tensor([o.outputs[0].token_ids for o in outs])  # [N, 3]
    m1, m2 = _marginals(target)
    for pos, m in ((1, m1), (2, m2)):
        counts = torch.bincount(toks[:, pos], minlength=VOCAB).double()
        p = _chi2_pvalue(counts, m)
        assert p > 0.01, (method, pos, p)
    # The test can fail: the draft's own marginal is far from the target's.
    d1, _ = _marginals(draft)
    assert _chi2_pvalue(torch.bincount(toks[:, 1], minlength=VOCAB).double(), d1) < 1e-3
