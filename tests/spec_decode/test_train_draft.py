"""``kvasir train-draft``: the command runs end to end on a tiny model, its heads load in
the engine and beat untrained ones on acceptance; the plain-torch EAGLE it trains
computes what the engine's paged EAGLE head computes; the target features it trains
on are the engine's; bad options are refused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kvasir import LLM, SamplingParams
from kvasir.config import KernelConfig, ParallelConfig, SpeculativeConfig
from kvasir.distributed.parallel_state import single_process_state
from kvasir.spec_decode.heads import load_eagle_head
from kvasir.spec_decode.train import (
    EagleTrainHead,
    Target,
    TrainDraftConfig,
    add_train_draft_parser,
    run_train_draft,
)

_TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
    "First Citizen: You are all resolved rather to die than to famish? All: Resolved. "
    "First Citizen: First, you know Caius Marcius is chief enemy to the people. "
) * 8


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvasir")
    add_train_draft_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _train(tmp: Path, method: str, steps: int, corpus: Path, capsys, *extra: str) -> str:  # type: ignore[no-untyped-def]
    out = tmp / f"{method}-{steps}{'-'.join(extra)}"
    args = _parse(
        ["train-draft", "--method", method, "--model", "tiny-llama", "--load-format", "dummy",
         "--corpus", str(corpus), "--out", str(out), "--steps", str(steps), "--lr", "1e-2",
         "--seq-len", "64", "--generate-tokens", "48", "--num-sequences", "32",
         "--batch-size", "8", "--num-heads", "3", *extra]
    )  # fmt: skip
    assert args.func is run_train_draft
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == steps and summary["sequences"] == 32
    if steps:
        assert summary["last_loss"] < summary["first_loss"]
    return str(out)


def _acceptance(method: str, heads: str, corpus: Path) -> float:
    text = corpus.read_bytes()
    starts = np.random.default_rng(5).integers(0, len(text) - 16, 10)
    prompts = [
        list(text[s : s + 16]) for s in starts.tolist()
    ]  # bytes: tiny-llama has no tokenizer
    spec = {"method": method, "model": heads, "num_speculative_tokens": 3}
    llm = LLM(model="tiny-llama", load_format="dummy", max_model_len=256, log=False,
              speculative_config=spec)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
    stats = llm.llm_engine.engine_core.scheduler.make_stats()
    return stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens


def test_train_draft_eagle_beats_untrained_heads(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # The data is the tiny model's own greedy continuations of corpus prompts (its
    # outputs are what the heads draft for), and so is the evaluation workload.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_TEXT)
    untrained = _acceptance("eagle", _train(tmp_path, "eagle", 0, corpus, capsys), corpus)
    trained = _acceptance("eagle", _train(tmp_path, "eagle", 100, corpus, capsys), corpus)
    print(f"acceptance: untrained {untrained:.3f}, trained {trained:.3f}")
    assert trained > max(1.5 * untrained, untrained + 0.05), (trained, untrained)


def test_eagle_draft_vocabulary_is_lossless_and_drafts_within_it(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # --draft-vocab: the head's LM head scores only the 96 tokens most frequent in the
    # training data (token_map); drafts come from those, verification stays lossless,
    # and sampled requests get a distribution that is zero outside them.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_TEXT)
    out = _train(tmp_path, "eagle", 60, corpus, capsys, "--draft-vocab", "96")
    token_map = load_file(str(Path(out) / "model.safetensors"))["token_map"]
    assert token_map.shape == (96,) and bool((token_map[1:] > token_map[:-1]).all())
    prompts = [list(b"First Citizen"), list(b"All: Speak"), list(b"You are all")]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    base = dict(model="tiny-llama", load_format="dummy", max_model_len=128, log=False)
    ref = LLM(**base).generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
    spec = {"method": "eagle", "model": out, "num_speculative_tokens": 3}
    llm = LLM(speculative_config=spec, **base)
    got = llm.generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    stats = llm.llm_engine.engine_core.scheduler.make_stats()
    assert stats.spec_num_accepted_tokens > 0
    proposer = llm.llm_engine.engine_core.runner.spec_decoder.proposer
    feats = torch.randn(4, 64)
    md = llm.llm_engine.engine_core.runner._sampling_metadata(np.zeros(0, dtype=np.int64), False)
    from dataclasses import replace

    md = replace(md, all_greedy=False, all_random=True, temperature=torch.ones(4))
    tok, q = proposer._draw(feats, md)
    allowed = set(token_map.tolist())
    assert set(tok.tolist()) <= allowed
    assert q is not None and torch.allclose(q.sum(1), torch.ones(4))
    outside = torch.ones(q.shape[1], dtype=torch.bool)
    outside[token_map] = False
    assert float(q[:, outside].abs().max()) == 0.0


def test_train_draft_medusa_runs_end_to_end(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_TEXT)
    out = _train(tmp_path, "medusa", 10, corpus, capsys)
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["medusa_num_heads"] == 3 and cfg["medusa_num_layers"] == 1
    names = set(load_file(str(Path(out) / "model.safetensors")))
    assert names == {
        f"medusa_head.{i}.0.linear.{k}" for i in range(3) for k in ("weight", "bias")
    } | {f"medusa_head.{i}.1.weight" for i in range(3)}
    # Served losslessly: greedy outputs as without speculation.
    prompts = [list(b"First Citizen"), list(b"All: Speak")]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    base = dict(model="tiny-llama", load_format="dummy", max_model_len=128, log=False)
    ref = LLM(**base).generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
    spec = {"method": "medusa", "model": out, "num_speculative_tokens": 3}
    got = LLM(speculative_config=spec, **base).generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]


def _engine_runner(target: Target) -> SimpleNamespace:
    return SimpleNamespace(
        arch_config=target.arch,
        attn_backend_cls=target.backend_cls,
        dtype=torch.float32,
        device=torch.device("cpu"),
        parallel=single_process_state(torch.device("cpu")),
        config=SimpleNamespace(kernel_config=KernelConfig(), parallel_config=ParallelConfig()),
    )


def test_trained_eagle_equals_the_engines_eagle_head(tmp_path: Path) -> None:
    """The training module (plain torch over whole sequences) and the engine's head
    (kvasir layers over a paged KV cache, fed in two chunks) give the same features
    for the same published checkpoint."""
    from kvasir.attention.backend import AttentionMetadata
    from kvasir.attention.torch_backend import TorchAttentionMetadata
    from kvasir.spec_decode.train import TrainDraftConfig, save_heads
    from kvasir.worker import kv_cache_sizing

    target = Target("tiny-llama", "dummy", 0)
    torch.manual_seed(3)
    train_head = EagleTrainHead(target.arch, 2, embed_scale=30.0)
    with torch.no_grad():
        for name, p in train_head.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    cfg = TrainDraftConfig(method="eagle", model="tiny-llama", corpus="-", out=str(tmp_path))
    save_heads(train_head, cfg, target.arch)
    head, _ = load_eagle_head(
        SpeculativeConfig(method="eagle", model=str(tmp_path)),
        _engine_runner(target),  # type: ignore[arg-type]
    )
    n, bs = 37, 16
    ids = torch.randint(0, target.arch.vocab_size, (1, n + 1))
    feats = target.hidden_states([ids[0, :n].numpy()])[0]  # [n, H]
    embeds = target.embed(ids[0, 1:])  # token[p + 1]
    with torch.no_grad():
        expect = train_head(embeds[None], feats[None])[0]
    specs = kv_cache_sizing.kv_cache_specs(head, bs, torch.float32)
    caches = kv_cache_sizing.allocate_kv_caches(specs, 4, target.backend_cls, torch.device("cpu"))
    table = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    got = []
    for a, b in ((0, 20), (20, n)):  # a chunk, then the rest over the cached prefix
        qsl = torch.tensor([0, b - a], dtype=torch.int32)
        sl = torch.tensor([b], dtype=torch.int32)
        slots = torch.arange(a, b) + bs  # blocks 1, 2, 3 are contiguous slots 16..
        common = AttentionMetadata(1, b - a, b - a, b, qsl, sl, table, slots, qsl, sl)
        md = TorchAttentionMetadata.from_common(common, bs)
        got.append(head(embeds[a:b], feats[a:b], torch.arange(a, b), caches, md))
    torch.testing.assert_close(torch.cat(got), expect, rtol=1e-4, atol=1e-4)


def test_target_features_are_the_engines(tmp_path: Path) -> None:
    """Features from the training target equal the engine model's on the same tokens
    through an independent float64 re-computation of the final logits' argmax."""
    target = Target("tiny-llama", "dummy", 0)
    seqs = [np.arange(3, 40), np.arange(100, 117)]
    feats = target.hidden_states(seqs, max_batch_tokens=40)  # two batches
    both = target.hidden_states(seqs)  # one batch
    for a, b in zip(feats, both, strict=True):
        torch.testing.assert_close(a, b)
    # The engine's greedy continuation is the argmax of the features' logits.
    llm = LLM(model="tiny-llama", load_format="dummy", max_model_len=128, log=False)
    out = llm.generate([seqs[0].tolist()], SamplingParams(temperature=0.0, max_tokens=1))
    logits = feats[0][-1].double() @ target.lm_head.double().T
    assert out[0].outputs[0].token_ids[0] == int(logits.argmax())


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"method": "tree"}, "method"),
        ({"steps": -1}, "steps"),
        ({"seq_len": 3, "method": "medusa"}, "seq_len"),
        ({"chat": True}, "chat"),
    ],
)
def test_bad_train_draft_options_are_refused(kw: dict, words: str) -> None:
    args = dict(method="eagle", model="tiny-llama", corpus="c", out="o")
    args.update(kw)
    with pytest.raises(ValueError, match=words):
        TrainDraftConfig(**args)  # type: ignore[arg-type]


def test_missing_corpus_fails_with_exit_code_2(tmp_path: Path) -> None:
    args = _parse(
        ["train-draft", "--method", "eagle", "--model", "tiny-llama", "--load-format", "dummy",
         "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert run_train_draft(args) == 2
