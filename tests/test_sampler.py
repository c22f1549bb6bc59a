"""Sampler vs. a per-row float64 reference written here, plus statistical checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from kvasir.layers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_min_tokens_mask,
    apply_penalties,
    compute_probs,
    compute_token_logprobs,
)


@dataclass
class Row:
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    min_tokens_stop_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None


def make_metadata(rows: list[Row], vocab_size: int, device: str = "cpu") -> SamplingMetadata:
    no_pen = all(r.presence == 0 and r.frequency == 0 and r.repetition == 1 for r in rows)
    prompt_ids = None
    if not no_pen:
        width = max(1, max(len(r.prompt) for r in rows))
        prompt_ids = torch.full((len(rows), width), vocab_size, dtype=torch.int64)
        for i, r in enumerate(rows):
            prompt_ids[i, : len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.int64)
    wants = [r.logprobs for r in rows if r.logprobs is not None]

    def t(vals: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(vals, dtype=dtype, device=device)

    return SamplingMetadata(
        temperature=t(
            [0.0 if r.temperature < 1e-5 else r.temperature for r in rows], torch.float32
        ),
        all_greedy=all(r.temperature < 1e-5 for r in rows),
        all_random=all(r.temperature >= 1e-5 for r in rows),
        top_k=t([r.top_k if r.top_k > 0 else vocab_size for r in rows], torch.int64)
        if any(r.top_k > 0 for r in rows)
        else None,
        top_p=t([r.top_p for r in rows], torch.float32) if any(r.top_p < 1 for r in rows) else None,
        min_p=t([r.min_p for r in rows], torch.float32) if any(r.min_p > 0 for r in rows) else None,
        generators={
            i: torch.Generator(device=device).manual_seed(r.seed)
            for i, r in enumerate(rows)
            if r.seed is not None
        },
        no_penalties=no_pen,
        presence_penalties=t([r.presence for r in rows], torch.float32),
        frequency_penalties=t([r.frequency for r in rows], torch.float32),
        repetition_penalties=t([r.repetition for r in rows], torch.float32),
        prompt_token_ids=None if prompt_ids is None else prompt_ids.to(device),
        output_token_ids=[list(r.output) for r in rows],
        min_tokens_stop_ids={
            i: r.min_tokens_stop_ids for i, r in enumerate(rows) if r.min_tokens_stop_ids
        },
        max_num_logprobs=max(wants) if wants else None,
    )


# ---------------------------------------------------------------- float64 reference


def ref_penalised(logits: list[float], r: Row) -> list[float]:
    out = [float(x) for x in logits]
    for tok in r.min_tokens_stop_ids or []:
        out[tok] = -math.inf
    seen = set(r.prompt) | set(r.output)
    for tok in range(len(out)):
        if tok in seen:
            out[tok] = out[tok] / r.repetition if out[tok] > 0 else out[tok] * r.repetition
        count = r.output.count(tok)
        out[tok] -= r.frequency * count
        out[tok] -= r.presence * (1.0 if count > 0 else 0.0)
    return out


def softmax64(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    s = sum(e)
    return [v / s for v in e]


def ref_probs(logits: list[float], r: Row) -> list[float]:
    """Temperature, top-k, top-p, min-p, one after another, each renormalising."""
    v = len(logits)
    probs = softmax64([x / r.temperature for x in logits])
    order = sorted(range(v), key=lambda i: -probs[i])
    if r.top_k > 0:
        kth = probs[order[r.top_k - 1]]
        probs = [p if p >= kth else 0.0 for p in probs]
        s = sum(probs)
        probs = [p / s for p in probs]
    if r.top_p < 1:
        keep, acc = set(), 0.0
        for i in order:
            if acc >= r.top_p:
                break
            keep.add(i)
            acc += probs[i]
        probs = [p if i in keep else 0.0 for i, p in enumerate(probs)]
        s = sum(probs)
        probs = [p / s for p in probs]
    if r.min_p > 0:
        m = max(probs)
        probs = [p if p >= r.min_p * m else 0.0 for p in probs]
        s = sum(probs)
        probs = [p / s for p in probs]
    return probs


def processed_probs(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    md = make_metadata(rows, logits.shape[1])
    x = logits
    if md.min_tokens_stop_ids:
        x = apply_min_tokens_mask(x, md.min_tokens_stop_ids)
    if not md.no_penalties:
        x = apply_penalties(x, md)
    return compute_probs(x, md)


# ---------------------------------------------------------------- tests


def test_hand_computed_top_k_top_p_min_p() -> None:
    base = [0.4, 0.3, 0.15, 0.1, 0.05]
    logits = torch.tensor([[math.log(p) for p in base]] * 6, dtype=torch.float32)
    rows = [
        Row(
            top_k=3, top_p=0.8, min_p=0.7
        ),  # top-3 -> .47/.35/.18 -> top-p keeps 2 -> both > .7*max
        Row(top_p=0.8),  # .4 + .3 < .8, so .15 is needed too
        Row(top_k=2),
        Row(min_p=0.3),  # threshold .12 drops .1 and .05
        Row(top_k=3, min_p=0.4),  # renormalised .47/.35/.18; .4 * .47 = .188 drops .18
        Row(temperature=2.0, top_k=2),  # probs ~ sqrt(p)
    ]
    s2 = math.sqrt(0.4) + math.sqrt(0.3)
    expected = [
        [4 / 7, 3 / 7, 0, 0, 0],
        [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0],
        [4 / 7, 3 / 7, 0, 0, 0],
        [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0],
        [4 / 7, 3 / 7, 0, 0, 0],
        [math.sqrt(0.4) / s2, math.sqrt(0.3) / s2, 0, 0, 0],
    ]
    got = processed_probs(logits, rows)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    for r, e in zip(rows, expected, strict=True):
        assert ref_probs([math.log(p) for p in base], r) == pytest.approx(e, abs=1e-12)


def random_rows(gen: torch.Generator, num_rows: int, vocab_size: int) -> list[Row]:
    rows = []
    for _ in range(num_rows):
        u = torch.rand(8, generator=gen).tolist()
        rows.append(
            Row(
                temperature=0.3 + 1.5 * u[0],
                top_k=int(1 + u[1] * vocab_size) if u[2] < 0.5 else -1,
                top_p=0.2 + 0.8 * u[3] if u[4] < 0.6 else 1.0,
                min_p=0.3 * u[5] if u[6] < 0.5 else 0.0,
                presence=1.5 * u[7] - 0.5,
                frequency=0.3,
                repetition=1.3,
                prompt=torch.randint(0, vocab_size, (5,), generator=gen).tolist(),
                output=torch.randint(0, vocab_size, (7,), generator=gen).tolist(),
            )
        )
    return rows


def test_filtered_distribution_matches_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab_size = 64
    rows = random_rows(gen, 32, vocab_size)
    logits = 2 * torch.randn(len(rows), vocab_size, generator=gen)
    got = processed_probs(logits, rows)
    for i, r in enumerate(rows):
        exp = torch.tensor(ref_probs(ref_penalised(logits[i].tolist(), r), r), dtype=torch.float64)
        # Same support, same values.
        assert torch.equal(got[i] > 0, exp > 0), i
        torch.testing.assert_close(got[i].double(), exp, atol=2e-6, rtol=1e-4)


def test_greedy_with_penalties_is_reference_argmax() -> None:
    gen = torch.Generator().manual_seed(1)
    vocab_size = 100
    rows = random_rows(gen, 16, vocab_size)
    for r in rows:
        r.temperature = 0.0
    logits = 2 * torch.randn(len(rows), vocab_size, generator=gen)
    # Make penalties decide: the raw favourite of each row is a token it already produced.
    for i, r in enumerate(rows):
        r.output.append(int(logits[i].argmax()))
    md = make_metadata(rows, vocab_size)
    out = Sampler()(logits, md)
    expected = [
        max(range(vocab_size), key=lambda t, i=i, r=r: ref_penalised(logits[i].tolist(), r)[t])
        for i, r in enumerate(rows)
    ]
    assert out.sampled_token_ids.tolist() == expected
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.logprobs_tensors is None
    assert expected != logits.argmax(-1).tolist()  # the penalties mattered


def test_mixed_greedy_and_random_rows() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 50, generator=gen)
    rows = [Row(temperature=0.0), Row(temperature=1.0, top_k=1), Row(temperature=0.0)] * 2
    before = logits.clone()
    out = Sampler()(logits, make_metadata(rows, 50))
    # top_k=1 at any temperature is also the argmax.
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)  # the caller's logits are untouched


@pytest.mark.parametrize(
    "row",
    [
        Row(),
        Row(temperature=0.7, top_k=4),
        Row(top_p=0.6),
        Row(temperature=1.3, min_p=0.2),
        Row(top_k=5, top_p=0.9, min_p=0.1, presence=0.5, output=[0, 0, 1]),
    ],
)
def test_sampling_frequencies_match_filtered_distribution(row: Row) -> None:
    torch.manual_seed(1234)
    vocab_size, num_draws = 8, 40_000
    logits = torch.tensor([[1.0, 0.5, 0.2, 0.0, -0.3, -0.6, -1.0, -2.0]])
    expected = ref_probs(ref_penalised(logits[0].tolist(), row), row)
    rows = [row] * num_draws
    out = Sampler()(logits.expand(num_draws, -1), make_metadata(rows, vocab_size))
    counts = torch.bincount(out.sampled_token_ids, minlength=vocab_size).tolist()
    chi2, dof = 0.0, -1
    for c, p in zip(counts, expected, strict=True):
        if p == 0:
            assert c == 0  # filtered tokens never come out
            continue
        chi2 += (c - num_draws * p) ** 2 / (num_draws * p)
        dof += 1
    # 99.9th percentile of chi-square with <= 7 degrees of freedom is < 24.4.
    assert chi2 < 24.4, (chi2, dof, counts, expected)


def test_seeded_rows_independent_of_batch_composition() -> None:
    vocab_size = 300
    gen = torch.Generator().manual_seed(3)
    seeded = Row(temperature=0.9, top_p=0.95, seed=42)

    def run(rows: list[Row], row_index: int, steps: int) -> list[int]:
        md = make_metadata(rows, vocab_size)
        tokens = []
        for step in range(steps):
            step_gen = torch.Generator().manual_seed(100 + step)
            base = torch.randn(vocab_size, generator=step_gen)
            logits = torch.randn(len(rows), vocab_size, generator=gen)
            logits[row_index] = base
            tokens.append(int(Sampler()(logits, md).sampled_token_ids[row_index]))
        return tokens

    alone = run([seeded], 0, 20)
    with_others = run([Row(), Row(temperature=0.0), seeded, Row(seed=7)], 2, 20)
    other_place = run([seeded, Row(top_k=3), Row(temperature=2.0)], 0, 20)
    assert alone == with_others == other_place
    assert len(set(alone)) > 5  # it really sampled


def test_min_tokens_mask() -> None:
    vocab_size = 20
    logits = torch.zeros(4, vocab_size)
    logits[:, 3] = 10.0  # "EOS" is by far the favourite
    logits[:, 7] = 9.0  # a stop token id
    rows = [
        Row(temperature=0.0, min_tokens_stop_ids=[3, 7]),
        Row(temperature=0.0),
        Row(temperature=1.0, min_tokens_stop_ids=[3, 7]),
        Row(temperature=0.0, min_tokens_stop_ids=[3]),
    ]
    md = make_metadata(rows, vocab_size)
    for _ in range(50):
        sampled = Sampler()(logits, md).sampled_token_ids.tolist()
        assert sampled[0] not in (3, 7)
        assert sampled[1] == 3
        assert sampled[2] not in (3, 7)
        assert sampled[3] == 7


def test_logprobs_are_raw_and_ranked() -> None:
    gen = torch.Generator().manual_seed(4)
    vocab_size = 40
    rows = [
        Row(temperature=0.0, logprobs=3, repetition=1.5, output=[0, 1]),
        Row(temperature=0.5, top_k=5, logprobs=0),
        Row(temperature=1.2, presence=1.0, output=[2], logprobs=2),
    ]
    logits = torch.randn(len(rows), vocab_size, generator=gen)
    out = Sampler()(logits, make_metadata(rows, vocab_size))
    lp = out.logprobs_tensors
    assert lp is not None
    assert lp.logprob_token_ids.shape == (3, 4) and lp.logprobs.shape == (3, 4)
    ref = torch.log_softmax(logits.double(), dim=-1)
    sampled = out.sampled_token_ids
    assert torch.equal(lp.logprob_token_ids[:, 0], sampled)
    for i in range(len(rows)):
        tok = int(sampled[i])
        assert lp.logprobs[i, 0].item() == pytest.approx(ref[i, tok].item(), abs=1e-5)
        assert int(lp.selected_token_ranks[i]) == 1 + int((ref[i] > ref[i, tok]).sum())
        top_vals, top_ids = ref[i].topk(3)
        assert lp.logprob_token_ids[i, 1:].tolist() == top_ids.tolist()
        torch.testing.assert_close(lp.logprobs[i, 1:].double(), top_vals, atol=1e-5, rtol=0)


def test_compute_token_logprobs() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 30, generator=gen)
    targets = torch.randint(0, 30, (7,), generator=gen)
    lp = compute_token_logprobs(logits, targets, 2)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert lp.logprob_token_ids[:, 0].tolist() == targets.tolist()
    torch.testing.assert_close(
        lp.logprobs[:, 0].double(), ref.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=0
    )
    ranks = [1 + int((ref[i] > ref[i, targets[i]]).sum()) for i in range(7)]
    assert lp.selected_token_ranks.tolist() == ranks
    assert lp.logprob_token_ids[:, 1:].tolist() == ref.topk(2).indices.tolist()
    assert compute_token_logprobs(logits, targets, 0).logprobs.shape == (7, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(6)
    vocab_size = 1000
    rows = random_rows(gen, 8, vocab_size)
    for r in rows[:4]:
        r.temperature = 0.0
    rows[5].seed = 11
    rows[6].logprobs = 4
    logits = torch.randn(len(rows), vocab_size, generator=gen)
    cpu = Sampler()(logits, make_metadata(rows, vocab_size))
    gpu = Sampler()(logits.cuda(), make_metadata(rows, vocab_size, device="cuda"))
    assert gpu.sampled_token_ids[:4].cpu().tolist() == cpu.sampled_token_ids[:4].tolist()
    assert gpu.logprobs_tensors is not None and cpu.logprobs_tensors is not None
    torch.testing.assert_close(
        gpu.logprobs_tensors.logprobs[:, 1:].cpu(), cpu.logprobs_tensors.logprobs[:, 1:]
    )


@pytest.mark.parametrize("vocab,chunks", [(1000, 64), (1024, 64), (49152, 64), (130, 7)])
def test_two_stage_argmax_matches_argmax(vocab: int, chunks: int) -> None:
    from kvasir.layers.sampler import argmax_two_stage

    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 5, (6, vocab), generator=g).float()  # many ties: first index wins
    x[1, -1] = 99.0  # the maximum in the remainder chunk
    x[2, 0] = 99.0
    x[3, vocab // 2] = float("nan")  # NaN counts as the maximum, as in torch
    x[4] = float("-inf")
    assert torch.equal(argmax_two_stage(x, chunks), x.argmax(dim=-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_argmax_rows_on_gpu_matches_argmax() -> None:
    from kvasir.layers.sampler import argmax_rows

    g = torch.Generator().manual_seed(0)
    for rows in (1, 7, 32, 64):
        x = torch.randint(0, 50, (rows, 128256), generator=g).float().cuda()
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
