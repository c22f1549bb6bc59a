"""Beam search (``LLM.beam_search``) against HF transformers' ``generate(num_beams=4,
do_sample=False)`` on a tiny random Llama, with length penalties, and the KV blocks it
shares through the prefix cache all given back afterwards."""

from __future__ import annotations

import pytest
import torch
from model_utils import save_tiny_llama

from kvasir import LLM, BeamSearchParams

VOCAB = 256
EOS = 2
PROMPT_LENS = [3, 9, 17]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = str(tmp_path_factory.mktemp("beam-llama"))
    hf = save_tiny_llama(path, vocab_size=VOCAB, seed=3)
    with torch.no_grad():  # EOS among the candidates often, so hypotheses end early too
        hf.lm_head.weight[EOS] *= 2.5
    hf.save_pretrained(path)
    llm = LLM(model=path, max_model_len=256, kv_cache_gb=0.02, block_size=4, log=False)
    return hf, llm


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _hf_beams(hf, prompt: list[int], max_new: int, length_penalty: float) -> list[list[int]]:
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        num_beams=4,
        num_return_sequences=4,
        do_sample=False,
        max_new_tokens=max_new,
        length_penalty=length_penalty,
        eos_token_id=EOS,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    seqs = []
    for row in out.sequences.tolist():
        gen = row[len(prompt) :]
        if EOS in gen:
            gen = gen[: gen.index(EOS) + 1]
        seqs.append(gen)
    return seqs, out.sequences_scores.tolist()


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_matches_hf(tiny, length_penalty: float) -> None:
    hf, llm = tiny
    max_new = 10
    params = BeamSearchParams(beam_width=4, max_tokens=max_new, length_penalty=length_penalty)
    prompts = _prompts()
    outs = llm.beam_search(prompts, params)
    saw_eos = False
    for prompt, out in zip(prompts, outs, strict=True):
        ref, ref_scores = _hf_beams(hf, prompt, max_new, length_penalty)
        ours = [s.output_token_ids for s in out.sequences]
        assert ours == ref, (prompt, ours, ref)
        scores = [s.score for s in out.sequences]
        assert scores == pytest.approx(ref_scores, abs=1e-4)
        for s in out.sequences:
            assert s.tokens[: len(prompt)] == prompt
            assert s.cum_logprob == pytest.approx(sum(s.logprobs), abs=1e-5)
            saw_eos |= s.finish_reason == "stop"
    assert saw_eos  # the length penalty mattered: some hypotheses ended early


def test_no_blocks_leak_after_beam_search(tiny) -> None:
    _, llm = tiny
    kv = llm.llm_engine.engine_core.scheduler.kv_cache_manager
    llm.beam_search(_prompts(), BeamSearchParams(beam_width=4, max_tokens=8))
    assert not llm.llm_engine.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_usable_blocks
    # The beams shared their prompts' blocks: the prefix cache saw hits.
    assert kv.prefix_cache_hits > 0


def test_beam_search_bad_params() -> None:
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)
