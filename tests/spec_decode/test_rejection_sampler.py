"""Rejection sampler: the Triton kernel against the torch reference, hand-made greedy and
residual cases, losslessness (chi-squared against the target distribution), acceptance
rates against theory, and seeded noise that does not depend on the batch.

The kernel runs under Triton's CPU interpreter when no CUDA GPU is present.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
import torch

# ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel (see
# tests/kernels/conftest.py): set it before the import, and re-import a module that an
# earlier test imported compiled-mode on this CPU-only machine.
_MODULE = "kvasir.spec_decode.rejection_sampler"
if not torch.cuda.is_available():
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
    if _MODULE in sys.modules:
        importlib.reload(sys.modules[_MODULE])

from kvasir.spec_decode.rejection_sampler import (  # noqa: E402
    rejection_noise,
    rejection_sample,
    rejection_sample_ref,
    rejection_sample_triton,
)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
IMPLS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "ref": rejection_sample_ref,
    "kernel": rejection_sample_triton,
}


def _cu(num_draft: list[int]) -> torch.Tensor:  # [B + 1] int32
    return torch.tensor(np.concatenate([[0], np.cumsum(num_draft)]), dtype=torch.int32)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-squared goodness of fit of ``counts`` ([V]) to ``probs`` ([V]) over
    the cells of positive probability; the p-value is the regularised upper incomplete
    gamma function Q(df / 2, stat / 2) (no scipy in the venv)."""
    counts, probs = counts.double().cpu(), probs.double().cpu()
    support = probs > 0
    expected = probs[support] / probs[support].sum() * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = torch.tensor(float(support.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def test_chi2_pvalue_against_known_quantiles():
    # chi2(df=1) 0.95 quantile 3.8415; chi2(df=7) 0.99 quantile 18.475 (tables).
    assert _chi2_pvalue(torch.tensor([50 + 9.8, 50 - 9.8]), torch.tensor([0.5, 0.5])) == (
        pytest.approx(0.05, abs=1e-3)
    )
    stat_cells = torch.full((8,), 100.0)
    stat_cells[0] += (18.475 * 100 / 2) ** 0.5  # stat = 2 * d^2 / 100 = 18.475
    stat_cells[1] -= (18.475 * 100 / 2) ** 0.5
    assert _chi2_pvalue(stat_cells, torch.full((8,), 1 / 8)) == pytest.approx(0.01, abs=1e-3)


# ---------------------------------------------------------------------------------------
# Kernel == reference
# ---------------------------------------------------------------------------------------


def _random_batch(
    seed: int, num_reqs: int, vocab_size: int, max_k: int, point_mass: bool
) -> dict[str, torch.Tensor | None]:
    """A mixed batch: ~30 % greedy, k_i in 0..max_k, drafts close enough to the target
    that acceptances, rejections and bonus tokens all occur."""
    g = torch.Generator().manual_seed(seed)
    num_draft = torch.randint(0, max_k + 1, (num_reqs,), generator=g).tolist()
    cu = _cu(num_draft)
    num_drafts = int(cu[-1])
    logits = torch.randn(num_drafts + num_reqs, vocab_size, generator=g) * 3
    target_probs = torch.softmax(logits, dim=-1)  # [D + B, V]
    # The target row of draft j of request i is cu[i] + i + j.
    draft_rows = torch.cat(
        [torch.arange(n) + int(cu[i]) + i for i, n in enumerate(num_draft)]
    ).long()  # [D]
    noisy = logits[draft_rows] + torch.randn(num_drafts, vocab_size, generator=g)
    draft_probs = torch.softmax(noisy, dim=-1)  # [D, V]
    draft_token_ids = torch.multinomial(draft_probs, 1, generator=g).squeeze(1)
    is_greedy = torch.rand(num_reqs, generator=g) < 0.3
    target_argmax = target_probs.argmax(dim=-1)
    # Greedy requests' drafts mostly hit the argmax, so greedy acceptance runs long.
    req_of_draft = torch.repeat_interleave(torch.arange(num_reqs), torch.tensor(num_draft))
    hit = is_greedy[req_of_draft] & (torch.rand(num_drafts, generator=g) < 0.7)
    draft_token_ids = torch.where(hit, target_argmax[draft_rows], draft_token_ids)
    return {
        "draft_token_ids": draft_token_ids,
        "cu_num_draft": cu,
        "draft_probs": None if point_mass else draft_probs,
        "target_probs": target_probs,
        "target_argmax": target_argmax,
        "is_greedy": is_greedy,
        "uniform": torch.rand(num_drafts, generator=g),
        "exp_noise": torch.empty(num_reqs, vocab_size).exponential_(generator=g),
    }


def _to(batch: dict[str, torch.Tensor | None], device: torch.device) -> dict:
    return {k: None if v is None else v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft_probs", "point_mass"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_reference(seed, point_mass):
    max_k = 4
    batch = _to(_random_batch(seed, 40, 1000, max_k, point_mass), DEVICE)
    out_ref, acc_ref = rejection_sample_ref(**batch, max_spec_len=max_k)
    # block_v 256: four vocabulary tiles, the last one partial (1000 = 3 * 256 + 232).
    out, acc = rejection_sample_triton(**batch, max_spec_len=max_k, block_v=256)
    assert torch.equal(acc, acc_ref)
    assert torch.equal(out, out_ref)
    # The batch exercises every outcome: full acceptance, early rejection, k = 0.
    num_draft = (batch["cu_num_draft"][1:] - batch["cu_num_draft"][:-1]).long()
    assert (acc_ref.long() == num_draft).any() and (acc_ref.long() < num_draft).any()
    assert (num_draft == 0).any()
    # Shape, padding and the one extra token per request.
    assert out.shape == (40, max_k + 1) and out.dtype == torch.int64
    length = (out >= 0).sum(dim=1)
    assert torch.equal(length, acc.long() + 1)
    # A wider block (one tile) and a larger spec length give the same tokens.
    out_wide, _ = rejection_sample_triton(**batch, max_spec_len=max_k + 2)
    assert torch.equal(out_wide[:, : max_k + 1], out_ref)
    assert (out_wide[:, max_k + 1 :] == -1).all()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("point_mass", [False, True], ids=["draft_probs", "point_mass"])
def test_kernel_matches_reference_full_size(point_mass):
    """A Qwen-sized vocabulary (151936, not a power of two) and 256 requests."""
    max_k = 5
    batch = _to(_random_batch(7, 256, 151936, max_k, point_mass), DEVICE)
    out_ref, acc_ref = rejection_sample_ref(**batch, max_spec_len=max_k)
    out, acc = rejection_sample(**batch, max_spec_len=max_k)  # CUDA: the kernel
    assert torch.equal(acc, acc_ref)
    assert torch.equal(out, out_ref)


# ---------------------------------------------------------------------------------------
# Hand-made cases
# ---------------------------------------------------------------------------------------

# Four greedy requests, max_spec_len 3, V = 10.
_GREEDY_DRAFTS = [[3, 1, 4], [2, 2], [], [0, 5, 5]]
_GREEDY_ARGMAX = [[3, 1, 5, 9], [2, 2, 7], [6], [1, 5, 5, 5]]
_GREEDY_EXPECTED = [[3, 1, 5, -1], [2, 2, 7, -1], [6, -1, -1, -1], [1, -1, -1, -1]]
_GREEDY_ACCEPTED = [2, 2, 0, 0]  # the last one's later matches do not count


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_hand_made(impl):
    fn = IMPLS[impl]
    drafts = torch.tensor(sum(_GREEDY_DRAFTS, []), dtype=torch.int64, device=DEVICE)
    cu = _cu([len(d) for d in _GREEDY_DRAFTS]).to(DEVICE)
    argmax = torch.tensor(sum(_GREEDY_ARGMAX, []), dtype=torch.int64, device=DEVICE)
    greedy = torch.ones(4, dtype=torch.bool, device=DEVICE)
    uniform = torch.rand(drafts.shape[0], device=DEVICE)
    out, acc = fn(drafts, cu, None, None, argmax, greedy, uniform, None, 3)
    assert out.tolist() == _GREEDY_EXPECTED
    assert acc.tolist() == _GREEDY_ACCEPTED


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_rows_never_read_in_a_mixed_batch(impl):
    """The greedy requests beside one random request: their rows of target_probs are NaN,
    which must not reach any output."""
    fn = IMPLS[impl]
    vocab_size = 10
    drafts_per_req = [*_GREEDY_DRAFTS, [4]]
    drafts = torch.tensor(sum(drafts_per_req, []), dtype=torch.int64)
    cu = _cu([len(d) for d in drafts_per_req])
    argmax = torch.tensor(sum(_GREEDY_ARGMAX, []) + [0, 0], dtype=torch.int64)
    target_probs = torch.full((argmax.shape[0], vocab_size), float("nan"))
    # The random request (index 4): p_0 puts all mass on its draft 4, p_1 on token 8.
    target_probs[-2:] = 0.0
    target_probs[-2, 4] = 1.0
    target_probs[-1, 8] = 1.0
    greedy = torch.tensor([True, True, True, True, False])
    uniform = torch.rand(drafts.shape[0])
    noise = torch.empty(5, vocab_size).exponential_()
    batch = (drafts, cu, None, target_probs, argmax, greedy, uniform, noise)
    out, acc = fn(*(x.to(DEVICE) if x is not None else None for x in batch), 3)
    assert out.tolist() == [*_GREEDY_EXPECTED, [4, 8, -1, -1]]
    assert acc.tolist() == [*_GREEDY_ACCEPTED, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_hand_made(impl):
    """Three random requests with k = 1, draft token 2, uniform 0.9 (each rejects):
    0: a real residual, 1: p <= q everywhere (residual all zero: sample from p),
    2: point-mass-like p = 0.5 * one-hot(draft) handled with draft_probs = one-hot."""
    fn = IMPLS[impl]
    p0 = [0.5, 0.3, 0.2, 0.0, 0.0]
    q0 = [0.1, 0.1, 0.8, 0.0, 0.0]  # residual [0.4, 0.2, 0, 0, 0]
    q1 = [0.1, 0.2, 0.4, 0.2, 0.1]
    p1 = [0.1, 0.2, 0.2, 0.2, 0.1]  # below q1 everywhere: 0.9 * 0.4 >= 0.2 rejects
    p2 = [0.0, 0.0, 0.5, 0.0, 0.0]
    q2 = [0.0, 0.0, 1.0, 0.0, 0.0]
    bonus = [0.2] * 5  # the rows after each draft; unused after a rejection
    target_probs = torch.tensor([p0, bonus, p1, bonus, p2, bonus])
    draft_probs = torch.tensor([q0, q1, q2])
    noise = torch.tensor(
        [
            [4.0, 1.0, 0.5, 1.0, 1.0],  # residual scores [0.1, 0.2, 0, 0, 0]: token 1
            [1.0, 2.0, 0.5, 1.0, 1.0],  # fallback p scores [0.1, 0.1, 0.4, 0.2, 0.1]: 2
            [1.0, 1.0, 1.0, 1.0, 1.0],  # fallback: the only token of p, 2
        ]
    )
    args = [
        torch.tensor([2, 2, 2]),
        _cu([1, 1, 1]),
        draft_probs,
        target_probs,
        torch.zeros(6, dtype=torch.int64),
        torch.zeros(3, dtype=torch.bool),
        torch.full((3,), 0.9),
        noise,
    ]
    out, acc = fn(*(a.to(DEVICE) for a in args), 1)
    assert out.tolist() == [[1, -1], [2, -1], [2, -1]]
    assert acc.tolist() == [0, 0, 0]
    # Point-mass drafts (draft_probs None): request 0's residual is p0 without token 2,
    # [0.5, 0.3, 0, 0, 0] -> scores [0.125, 0.3, 0, ...]: token 1 (p0 itself would give 2,
    # 0.2 / 0.5); request 2 falls back.
    args[2] = None
    out, acc = fn(*(a.to(DEVICE) if a is not None else None for a in args), 1)
    assert out[:, 0].tolist()[0] == 1 and out[:, 0].tolist()[2] == 2
    assert acc.tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------
# Losslessness and acceptance rates, i.i.d. target
# ---------------------------------------------------------------------------------------

# Target p_t at output position t (independent of the prefix), t = 0..3; zeros included.
_P = torch.tensor(
    [
        [0.40, 0.20, 0.15, 0.10, 0.05, 0.05, 0.05, 0.00],
        [0.05, 0.05, 0.10, 0.50, 0.10, 0.10, 0.10, 0.00],
        [0.125] * 8,
        [0.00, 0.10, 0.10, 0.10, 0.30, 0.20, 0.10, 0.10],
    ]
)
# A poor draft q_j for draft j = 1..3: mass where p has none, little where p has much.
# Acceptance per draft: sum min(p, q) = 0.65, 0.60, 0.575; point-mass sum q p = 0.16,
# 0.15, 0.125 (so later positions exist for few point-mass trials).
_Q = torch.tensor(
    [
        [0.30, 0.05, 0.05, 0.10, 0.10, 0.10, 0.10, 0.20],
        [0.20, 0.20, 0.10, 0.20, 0.05, 0.10, 0.05, 0.10],
        [0.40, 0.00, 0.00, 0.20, 0.20, 0.10, 0.05, 0.05],
    ]
)
_K = 3
# The interpreter runs one Python program per request (several ms each).
_NUM_TRIALS = {"ref": 20000, "kernel": 20000 if ON_GPU else 1500}


@cache
def _iid_run(impl: str, point_mass: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(drafts [B, K], output_token_ids [B, K + 1], num_accepted [B]) for B independent
    requests with k = 3, drafts x_j ~ q_j, target rows p_0..p_3."""
    num_reqs = _NUM_TRIALS[impl]
    g = torch.Generator().manual_seed(1234 + point_mass)
    drafts = torch.stack(
        [torch.multinomial(_Q[j], num_reqs, replacement=True, generator=g) for j in range(_K)],
        dim=1,
    )  # [B, K]
    args = [
        drafts.flatten(),
        _cu([_K] * num_reqs),
        None if point_mass else _Q.repeat(num_reqs, 1),  # [B * K, V]
        _P.repeat(num_reqs, 1),  # [B * (K + 1), V]
        _P.argmax(dim=1).repeat(num_reqs),
        torch.zeros(num_reqs, dtype=torch.bool),
        torch.rand(num_reqs * _K, generator=g),
        torch.empty(num_reqs, _P.shape[1]).exponential_(generator=g),
    ]
    out, acc = IMPLS[impl](*(a.to(DEVICE) if a is not None else None for a in args), _K)
    return drafts, out.cpu(), acc.cpu().long()


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft_probs", "point_mass"])
@pytest.mark.parametrize("impl", IMPLS)
def test_lossless_chi_squared(impl, point_mass):
    drafts, out, acc = _iid_run(impl, point_mass)
    vocab_size = _P.shape[1]
    # The test has power: the draft tokens themselves are far from the target.
    draft_counts = torch.bincount(drafts[:, 0], minlength=vocab_size)
    assert _chi2_pvalue(draft_counts, _P[0]) < 1e-6
    checked = []
    for t in range(_K + 1):
        tokens = out[acc >= t, t]  # output position t exists iff t drafts were accepted
        if tokens.numel() * _P[t][_P[t] > 0].min() < 5:
            continue  # too few trials reach t for the chi-squared approximation
        checked.append(t)
        counts = torch.bincount(tokens, minlength=vocab_size)
        assert counts[_P[t] == 0].sum() == 0, f"position {t}: a token of probability 0"
        pvalue = _chi2_pvalue(counts, _P[t])
        assert pvalue > 0.01, f"position {t}: chi2 p-value {pvalue:.2e}, counts {counts}"
    assert checked[:2] == [0, 1]
    if not point_mass:
        assert checked == [0, 1, 2, 3]


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft_probs", "point_mass"])
@pytest.mark.parametrize("impl", IMPLS)
def test_acceptance_rate_matches_theory(impl, point_mass):
    """P(accept draft j | drafts before it accepted) is sum_v min(p, q) for a sampled
    draft distribution q, and sum_v q(v) p(v) for point-mass verification of drafts
    x ~ q (accepted with probability p(x))."""
    _, _, acc = _iid_run(impl, point_mass)
    checked = []
    for j in range(_K):
        p, q = _P[j], _Q[j]
        expected = float((q * p).sum() if point_mass else torch.minimum(p, q).sum())
        reached = acc >= j  # drafts 1..j accepted: draft j + 1 is verified
        rate = float((acc[reached] >= j + 1).double().mean())
        n = int(reached.sum())
        if n < 100:
            continue  # too few trials verify draft j + 1
        checked.append(j)
        sigma = (expected * (1 - expected) / n) ** 0.5
        assert abs(rate - expected) < 4.5 * sigma, (j, rate, expected, n)
    assert checked[:2] == [0, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_draft_equal_to_target_is_always_accepted(impl):
    num_reqs = 300
    g = torch.Generator().manual_seed(5)
    drafts = torch.stack(
        [torch.multinomial(_P[j], num_reqs, replacement=True, generator=g) for j in range(_K)],
        dim=1,
    ).flatten()  # x_j ~ p_{j-1}
    target_probs = _P.repeat(num_reqs, 1)  # [B * (K + 1), V]
    draft_probs = _P[:_K].repeat(num_reqs, 1)  # q = p, exactly the same numbers
    args = [
        drafts,
        _cu([_K] * num_reqs),
        draft_probs,
        target_probs,
        target_probs.argmax(dim=1),
        torch.zeros(num_reqs, dtype=torch.bool),
        torch.rand(num_reqs * _K, generator=g),
        torch.empty(num_reqs, _P.shape[1]).exponential_(generator=g),
    ]
    out, acc = IMPLS[impl](*(a.to(DEVICE) for a in args), _K)
    assert (acc == _K).all()
    assert torch.equal(out[:, :_K].cpu(), drafts.view(num_reqs, _K))
    # Point-mass drafts that the target is certain of are accepted as well.
    one_hot = torch.nn.functional.one_hot(drafts, _P.shape[1]).float()  # [B * K, V]
    rows = torch.arange(num_reqs * (_K + 1)) % (_K + 1) != _K  # the non-bonus rows
    target_probs[rows] = one_hot
    args[2], args[3] = None, target_probs
    _, acc = IMPLS[impl](*(a.to(DEVICE) if a is not None else None for a in args), _K)
    assert (acc == _K).all()


# ---------------------------------------------------------------------------------------
# Seeded noise
# ---------------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def test_rejection_noise_seeded_requests_ignore_the_batch():
    vocab_size = 50
    # Alone: request 0 with seed 7 and 3 drafts.
    uniform_a, noise_a = rejection_noise(
        np.array([0, 3]), vocab_size, {0: _generator(7)}, True, DEVICE
    )
    # In a batch: unseeded (2 drafts), seed 11 (1), seed 7 (3), unseeded (0).
    cu_b = np.array([0, 2, 3, 6, 6])
    generators = {1: _generator(11), 2: _generator(7)}
    uniform_b, noise_b = rejection_noise(cu_b, vocab_size, generators, True, DEVICE)
    assert noise_a is not None and noise_b is not None
    assert uniform_b.shape == (6,) and noise_b.shape == (4, vocab_size)
    assert torch.equal(uniform_b[3:6], uniform_a)
    assert torch.equal(noise_b[2], noise_a[0])
    uniform_c, noise_c = rejection_noise(
        np.array([0, 1]), vocab_size, {0: _generator(11)}, True, DEVICE
    )
    assert noise_c is not None
    assert torch.equal(uniform_b[2:3], uniform_c) and torch.equal(noise_b[1], noise_c[0])
    # Valid ranges.
    assert ((uniform_b >= 0) & (uniform_b < 1)).all() and (noise_b > 0).all()
    # An all-greedy batch gets no race noise.
    uniform_g, noise_g = rejection_noise(cu_b, vocab_size, {}, False, DEVICE)
    assert noise_g is None and uniform_g.shape == (6,)


def test_seeded_request_tokens_ignore_the_batch():
    """End to end through ``rejection_sample``: the seeded request's tokens are the same
    alone and placed second in a batch of other requests."""
    vocab_size, k = 40, 3
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(k + 1, vocab_size, generator=g), dim=-1)  # [k + 1, V]
    q = torch.softmax(torch.randn(k, vocab_size, generator=g), dim=-1)  # [k, V]
    drafts = torch.multinomial(q, 1, generator=g).squeeze(1)  # [k]
    other_p = torch.softmax(torch.randn(3, vocab_size, generator=g), dim=-1)
    other_q = torch.softmax(torch.randn(2, vocab_size, generator=g), dim=-1)
    results = []
    for alone in (True, False):
        if alone:
            cu_host, draft_ids, draft_probs, target_probs = np.array([0, k]), drafts, q, p
        else:
            # Request 0: 2 drafts (rows 0..2), request 1: the seeded one (rows 3..6).
            cu_host = np.array([0, 2, 2 + k])
            draft_ids = torch.cat([torch.tensor([1, 2]), drafts])
            draft_probs = torch.cat([other_q, q])
            target_probs = torch.cat([other_p, p])
        req = 0 if alone else 1
        uniform, noise = rejection_noise(cu_host, vocab_size, {req: _generator(42)}, True, DEVICE)
        num_reqs = len(cu_host) - 1
        out, acc = rejection_sample(
            draft_ids.to(DEVICE),
            torch.from_numpy(cu_host).to(DEVICE),
            draft_probs.to(DEVICE),
            target_probs.to(DEVICE),
            target_probs.argmax(dim=1).to(DEVICE),
            torch.zeros(num_reqs, dtype=torch.bool, device=DEVICE),
            uniform,
            noise,
            k,
        )
        results.append((out[req].tolist(), int(acc[req])))
    assert results[0] == results[1]
