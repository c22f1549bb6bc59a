"""GPU sampling kernels: penalties exactly, filters exactly, greedy exactly, the sampled
distribution statistically, and per-row seeding independent of the batch."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import DEVICE, ON_GPU

from kvasir.kernels.sampling import (
    apply_penalties_and_temperature,
    apply_penalties_and_temperature_ref,
    output_token_counts_from_ids,
    sample,
    sampling_probs_ref,
)


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


def _penalty_inputs(num_rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=g) * 3
    counts = torch.randint(0, 3, (num_rows, vocab), generator=g, dtype=torch.int32)
    counts[torch.rand(num_rows, vocab, generator=g) < 0.7] = 0
    prompt = torch.rand(num_rows, vocab, generator=g) < 0.2
    rep = 1 + torch.rand(num_rows, generator=g)
    freq = torch.rand(num_rows, generator=g) - 0.5
    pres = torch.rand(num_rows, generator=g) - 0.5
    return _dev(logits, counts, prompt, rep, freq, pres)


def test_penalties_and_temperature():
    logits, counts, prompt, rep, freq, pres = _penalty_inputs(5, 77)
    logits[1, 3:9] = float("-inf")  # masked vocabulary entries stay -inf
    temp = torch.tensor([0.0, 0.5, 1.0, 1.7, 1e-6], device=DEVICE)
    kw = dict(
        output_token_counts=counts, prompt_token_mask=prompt, repetition_penalty=rep,
        frequency_penalty=freq, presence_penalty=pres,
    )  # fmt: skip
    out = apply_penalties_and_temperature(logits, temp, **kw)
    ref = apply_penalties_and_temperature_ref(logits, temp, **kw)
    # GPU code may contract x - f * c into one FMA: allow float32 rounding, no more.
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # Without counts the logits are only temperature-scaled.
    out = apply_penalties_and_temperature(logits, temp)
    torch.testing.assert_close(out, apply_penalties_and_temperature_ref(logits, temp))


@pytest.mark.parametrize("block_v", [None, 16])  # one tile per row, or rows over 7 tiles
def test_filters_keep_exactly_the_reference_support(block_v):
    g = torch.Generator().manual_seed(0)
    rows, vocab = 8, 100
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[3, 5:50] = float("-inf")  # e.g. a grammar mask
    logits[5, :] = logits[5, :10].repeat(10)  # ties at every threshold
    temp = torch.tensor([0.7, 1.0, 1.5, 0.9, 2.0, 1.0, 0.5, 1.2])
    top_k = torch.tensor([5, 0, 1, 99, 100, 30, 3, -1], dtype=torch.int32)
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.3, 0.99, 1.0, 0.95, 0.1])
    min_p = torch.tensor([0.0, 0.1, 0.0, 0.05, 0.0, 0.01, 0.3, 0.0])
    logits, temp, top_k, top_p, min_p = _dev(logits, temp, top_k, top_p, min_p)
    threshold = torch.empty(rows, device=DEVICE)
    tokens = sample(
        logits, temp, torch.arange(rows, device=DEVICE), torch.zeros_like(top_k, dtype=torch.int64),
        top_k=top_k, top_p=top_p, min_p=min_p, kept_threshold=threshold, block_v=block_v,
    )  # fmt: skip
    ref = sampling_probs_ref(logits, temp, top_k=top_k, top_p=top_p, min_p=min_p)
    x = (logits / temp[:, None]).cpu()  # the kernel divides with IEEE rounding too
    kept = (x >= threshold.cpu()[:, None]) & (x > float("-inf"))
    assert torch.equal(kept, ref > 0)
    assert bool((ref[torch.arange(rows), tokens.cpu()] > 0).all())


@pytest.mark.parametrize("block_v", [None, 32])
def test_greedy_is_exact_argmax_after_penalties(block_v):
    logits, counts, prompt, rep, freq, pres = _penalty_inputs(4, 300, seed=1)
    logits[0, 7] = logits[0, 250] = logits[0].max() + 1  # tie across tiles: first wins
    temp = torch.zeros(4, device=DEVICE)
    kw = dict(
        output_token_counts=counts, prompt_token_mask=prompt, repetition_penalty=rep,
        frequency_penalty=freq, presence_penalty=pres,
    )  # fmt: skip
    seeds = torch.arange(4, device=DEVICE)
    top_k = torch.full((4,), 3, dtype=torch.int32, device=DEVICE)  # ignored when greedy
    tokens = sample(logits, temp, seeds, seeds * 0, top_k=top_k, block_v=block_v, **kw)
    expect = apply_penalties_and_temperature_ref(logits, temp, **kw).argmax(dim=-1)
    assert torch.equal(tokens, expect)
    flat = sample(logits[:1].clone().fill_(1.0), temp[:1], seeds[:1], seeds[:1], block_v=block_v)
    assert int(flat[0]) == 0


def _check_distribution(tokens, probs):
    n = tokens.numel()
    emp = torch.bincount(tokens.cpu(), minlength=probs.numel()).double() / n
    assert float(emp[probs == 0].sum()) == 0.0
    # Every category within 4.5 standard errors (deterministic: the seeds are fixed).
    bound = 4.5 * (probs * (1 - probs) / n).sqrt() + 1e-3
    assert bool(((emp - probs).abs() <= bound).all()), (emp, probs)


@pytest.mark.parametrize("use_min_p", [False, True])
def test_sampled_distribution_matches_reference(use_min_p):
    n, vocab = (20000, 4096) if ON_GPU else (300, 12)
    g = torch.Generator().manual_seed(2)
    row = torch.randn(vocab, generator=g) * 1.5
    logits = row[None].repeat(n, 1).to(DEVICE)
    temp = torch.full((n,), 0.8, device=DEVICE)
    min_p = torch.full((n,), 0.05, device=DEVICE) if use_min_p else None
    seeds = torch.randint(0, 2**62, (n,), generator=g).to(DEVICE)
    # Several tiles per row (the GPU's layout) on the CPU too.
    tokens = sample(logits, temp, seeds, torch.zeros_like(seeds), min_p=min_p, block_v=8)
    probs = sampling_probs_ref(logits[:1], temp[:1], min_p=None if min_p is None else min_p[:1])
    _check_distribution(tokens, probs[0])


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_sampled_distribution_with_top_k_top_p_gpu():
    n, vocab = 20000, 32000
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(vocab, generator=g) * 2)[None].repeat(n, 1).to(DEVICE)
    temp = torch.full((n,), 1.0, device=DEVICE)
    top_k = torch.full((n,), 40, dtype=torch.int32, device=DEVICE)
    top_p = torch.full((n,), 0.8, device=DEVICE)
    seeds = torch.randint(0, 2**62, (n,), generator=g).to(DEVICE)
    tokens = sample(logits, temp, seeds, torch.zeros_like(seeds), top_k=top_k, top_p=top_p)
    probs = sampling_probs_ref(logits[:1], temp[:1], top_k=top_k[:1], top_p=top_p[:1])
    _check_distribution(tokens, probs[0])


def test_seeded_row_does_not_depend_on_the_batch():
    vocab = 64
    g = torch.Generator().manual_seed(4)
    row = torch.randn(vocab, generator=g)
    others = torch.randn(5, vocab, generator=g)
    seed, offset = 1234567, 9
    batch_a = torch.cat([row[None], others[:2]]).to(DEVICE)
    batch_b = torch.cat([others[2:], row[None]]).to(DEVICE)
    seeds_a = torch.tensor([seed, 1, 2], device=DEVICE)
    seeds_b = torch.tensor([3, 4, 5, seed], device=DEVICE)
    offs_a = torch.tensor([offset, 0, 0], device=DEVICE)
    offs_b = torch.tensor([7, 7, 7, offset], device=DEVICE)
    ta = sample(batch_a, torch.ones(3, device=DEVICE), seeds_a, offs_a)
    tb = sample(batch_b, torch.ones(4, device=DEVICE), seeds_b, offs_b)
    assert int(ta[0]) == int(tb[3])
    # Successive offsets give fresh draws (for the same seed and logits).
    flat = torch.zeros(8, vocab, device=DEVICE)
    many = sample(flat, torch.ones(8, device=DEVICE), torch.full((8,), seed, device=DEVICE),
                  torch.arange(8, device=DEVICE))  # fmt: skip
    assert len(set(many.tolist())) > 1


def test_output_token_counts_from_ids():
    ids = torch.tensor([[3, 3, 1, -1], [0, -1, -1, -1]], device=DEVICE)
    counts = output_token_counts_from_ids(ids, 5)
    expect = torch.tensor([[0, 1, 0, 2, 0], [1, 0, 0, 0, 0]], dtype=torch.int32)
    assert torch.equal(counts.cpu(), expect)
