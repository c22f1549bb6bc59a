"""logit_bias, allowed_token_ids, bad_words and best_of through the engine (a tiny random
Llama with the default model's tokenizer), the batched masks against a per-row
reference, and the same masks under speculative decoding."""

from __future__ import annotations

import pytest
import torch
from model_utils import save_tiny_llama

from kvasir import LLM, SamplingParams
from kvasir.layers.sampler import TokenMasks, apply_token_masks
from kvasir.models.default import default_model_path

VOCAB = 49152  # the default model's tokenizer
PROMPTS = ["The capital of France is", "Once upon a time", "def main():"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("extras-llama"))
    save_tiny_llama(path, vocab_size=VOCAB, seed=5, hidden_size=32, intermediate_size=64)
    return path


@pytest.fixture(scope="module")
def llm(model_dir: str) -> LLM:
    return LLM(
        model=model_dir, tokenizer=default_model_path(), max_model_len=256,
        kv_cache_gb=0.02, log=False,
    )  # fmt: skip


def _tokens(llm: LLM, params: SamplingParams, prompts: list[str] = PROMPTS) -> list[list[int]]:
    return [c.token_ids for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]


def _greedy(llm: LLM, n: int = 12, **kw) -> list[list[int]]:
    return _tokens(llm, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw))


def test_logit_bias_minus_100_never_emits(llm: LLM) -> None:
    banned = sorted({t for seq in _greedy(llm) for t in seq})
    bias = {t: -100.0 for t in banned}
    greedy = _greedy(llm, logit_bias=bias)
    sampled = _tokens(
        llm, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=12, logit_bias=bias)
    )
    for seq in greedy + sampled:
        assert not set(seq) & set(banned)


def test_logit_bias_plus_100_always_emits(llm: LLM) -> None:
    out = _tokens(
        llm,
        SamplingParams(
            n=4, temperature=1.0, seed=1, max_tokens=10, ignore_eos=True, logit_bias={"777": 100}
        ),
    )
    assert out and all(seq == [777] * 10 for seq in out)
    # Mixed in one batch with unbiased requests: only the biased one is changed.
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    biased = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={5: 100})
    outs = llm.generate(PROMPTS[:2], [plain, biased], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == _greedy(llm, 6)[0]
    assert outs[1].outputs[0].token_ids == [5] * 6


def test_allowed_token_ids(llm: LLM) -> None:
    allowed = [11, 400, 1234, 40000]
    out = _tokens(
        llm,
        SamplingParams(n=6, temperature=1.5, seed=2, max_tokens=12, allowed_token_ids=allowed),
    )
    seen = {t for seq in out for t in seq}
    assert seen <= set(allowed) and len(seen) > 1


def _contains(seq: list[int], word: list[int]) -> bool:
    return any(seq[i : i + len(word)] == word for i in range(len(seq) - len(word) + 1))


def test_bad_words(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    ref = _greedy(llm, 10)[0]
    # A two-token word the model generates at positions 3-4 when unconstrained.
    word = tok.decode(ref[3:5])
    resolved = llm.llm_engine.input_processor.resolve_token_masks(
        SamplingParams(bad_words=[word])
    ).bad_words_token_ids
    assert resolved and all(len(w) >= 1 for w in resolved)
    out = _greedy(llm, 10, bad_words=[word])
    seq = out[0]
    assert not any(_contains(seq, w) for w in resolved)
    if ref[3:5] in resolved:
        # Only the word's last token is banned, and only after its prefix.
        assert seq[:4] == ref[:4] and seq[4] != ref[4]
    # A single-token word is never emitted, even when logit_bias pushes it to the top.
    ids = llm.llm_engine.input_processor.resolve_token_masks(
        SamplingParams(bad_words=["the"])
    ).bad_words_token_ids
    banned = {w[0] for w in ids if len(w) == 1}
    assert len(banned) == 2  # "the" and " the"
    params = SamplingParams(
        n=4, temperature=1.0, seed=3, max_tokens=10, bad_words=["the"],
        logit_bias={t: 100.0 for t in banned},
    )  # fmt: skip
    for s in _tokens(llm, params):
        assert not set(s) & banned


def test_best_of_returns_highest_scoring(llm: LLM) -> None:
    prompt = PROMPTS[1]
    all6 = llm.generate(
        prompt, SamplingParams(n=6, temperature=1.0, seed=7, max_tokens=8, logprobs=0),
        use_tqdm=False,
    )[0].outputs  # fmt: skip
    ranked = sorted(all6, key=lambda c: c.cumulative_logprob, reverse=True)
    best = llm.generate(
        prompt, SamplingParams(n=2, best_of=6, temperature=1.0, seed=7, max_tokens=8),
        use_tqdm=False,
    )[0]  # fmt: skip
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked[:2]]
    assert [c.index for c in best.outputs] == [0, 1]
    assert best.outputs[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob)
    assert best.outputs[0].logprobs is None  # not asked for
    assert best.extra["num_candidate_tokens"] == sum(len(c.token_ids) for c in all6)


def test_bad_params(llm: LLM) -> None:
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 100.5})
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate("hi", SamplingParams(logit_bias={VOCAB: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate("hi", SamplingParams(allowed_token_ids=[VOCAB + 3]), use_tqdm=False)
    assert _greedy(llm, 2)  # still serving


def _reference(logits, bias, allowed, words, outputs):
    """Per-row Python: the semantics apply_token_masks must have."""
    out = logits.clone()
    for r in range(out.shape[0]):
        if allowed.get(r):
            keep = torch.full((out.shape[1],), float("-inf"))
            keep[allowed[r]] = 0.0
            out[r] += keep
        for w in words.get(r, []):
            if len(w) == 1 or outputs[r][len(outputs[r]) - len(w) + 1 :] == w[:-1]:
                if len(w) == 1 or len(outputs[r]) >= len(w) - 1:
                    out[r, w[-1]] = float("-inf")
        for t, b in bias.get(r, {}).items():
            out[r, t] += b
    return out


def test_token_masks_match_per_row_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 6, 50
    logits = torch.randn(rows, vocab, generator=gen)
    outputs = [[1, 2, 3], [], [7], [4, 5], [9, 9, 9, 9], [3]]
    bias = {0: {4: 2.5, 9: -100.0}, 3: {1: 100.0}}
    allowed = {2: [3, 4, 5], 5: [0, 1]}
    words = {0: [[2, 3, 10], [3, 11], [12]], 1: [[5, 6]], 3: [[4, 5, 13], [5, 14]], 4: [[9, 9, 15]]}
    width = 2
    w_rows, prefix, last = [], [], []
    for r, ws in words.items():
        for w in ws:
            w_rows.append(r)
            p = [-1] * (width - len(w) + 1) + w[:-1]
            prefix.append(p)
            last.append(w[-1])
    recent = torch.tensor([([-1] * width + o)[-width:] for o in outputs])
    b = [(r, t, v) for r, d in bias.items() for t, v in d.items()]
    a_rows = list(allowed)
    masks = TokenMasks(
        bias_rows=torch.tensor([x[0] for x in b]),
        bias_token_ids=torch.tensor([x[1] for x in b]),
        bias_values=torch.tensor([x[2] for x in b]),
        allowed_rows=torch.tensor(a_rows),
        allowed_index=torch.tensor(
            [
                [i for i, r in enumerate(a_rows) for _ in allowed[r]],
                [t for r in a_rows for t in allowed[r]],
            ]
        ),
        bad_rows=torch.tensor(w_rows),
        bad_prefix=torch.tensor(prefix),
        bad_last=torch.tensor(last),
        max_bad_prefix=width,
    )
    got = apply_token_masks(logits, masks, recent)
    torch.testing.assert_close(got, _reference(logits, bias, allowed, words, outputs))
    assert torch.equal(logits, logits.clone())  # the input is left alone


def test_masks_under_speculative_decoding(model_dir: str, llm: LLM) -> None:
    spec = LLM(
        model=model_dir, tokenizer=default_model_path(), max_model_len=256, kv_cache_gb=0.02,
        log=False, speculative_config={"method": "ngram", "num_speculative_tokens": 3},
    )  # fmt: skip
    prompt = "a b c a b c a b c a b c a b c"
    out = spec.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={9: 100}),
        use_tqdm=False,
    )[0].outputs[0]  # fmt: skip
    assert out.token_ids == [9] * 8
    allowed = [64, 65, 66]
    out = spec.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=8, allowed_token_ids=allowed),
        use_tqdm=False,
    )[0].outputs[0]  # fmt: skip
    assert set(out.token_ids) <= set(allowed)
    # Multi-token bad words and biases: greedy speculative decoding gives exactly the
    # tokens of the plain engine (the drafts before a position count as its output).
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ref = llm.generate(prompt, greedy, use_tqdm=False)
    toks = ref[0].outputs[0].token_ids
    words = [toks[2:4], toks[5:8], [toks[9]]]
    params = SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, bad_words_token_ids=words,
        bad_words=["placeholder"], logit_bias={toks[1]: -3.0},
    )  # fmt: skip
    plain = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    fast = spec.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert fast == plain and plain != toks
    assert not any(_contains(plain, w) for w in words)
    stats = spec.llm_engine.engine_core.scheduler.make_stats()
    assert stats.spec_num_draft_tokens > 0  # the drafts went through the masked verifier
