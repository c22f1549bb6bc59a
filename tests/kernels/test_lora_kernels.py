"""BGMV / SGMV shrink and expand against the plain-torch references (``kvasir.lora.ops``),
under ``TRITON_INTERPRET=1`` on the CPU: mixed ranks (zero-padded slots), base-model
tokens (-1) and empty segments in one launch."""

from __future__ import annotations

import pytest
import torch

from kvasir.kernels import lora as k
from kvasir.lora import ops


def _slots(num_slots: int, max_rank: int, in_f: int, out_f: int, ranks: list[int], gen):
    a = torch.zeros(num_slots, max_rank, in_f)
    b = torch.zeros(num_slots, out_f, max_rank)
    for s, r in enumerate(ranks):  # slot s has rank r: the rest is padding
        a[s, :r] = torch.randn(r, in_f, generator=gen)
        b[s, :, :r] = torch.randn(out_f, r, generator=gen)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bgmv_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    a, b = _slots(4, 16, 72, 40, [16, 4, 8, 1], gen)
    a, b = a.to(dtype), b.to(dtype)
    slots = torch.tensor([0, -1, 3, 1, 1, 2, -1, 0, 3], dtype=torch.int32)
    x = torch.randn(len(slots), 72, generator=gen).to(dtype)
    y0 = torch.randn(len(slots), 40, generator=gen).to(dtype)
    s = k.bgmv_shrink(x, a, slots)
    s_ref = ops.bgmv_shrink_ref(x, a, slots)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(s, s_ref, **tol)
    y = k.bgmv_expand(s_ref, b, slots, y0.clone())
    y_ref = ops.bgmv_expand_ref(s_ref, b, slots, y0.clone())
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    # Base-model rows are untouched, bit for bit.
    base = slots < 0
    assert torch.equal(y[base], y0[base])
    # The reference itself against a float64 per-token product.
    t = 2
    want = y0[t].double() + b[3].double() @ (a[3].double() @ x[t].double())
    torch.testing.assert_close(y_ref[t].double(), want, rtol=2e-2, atol=2e-2)


def test_sgmv_matches_reference_with_empty_segments():
    gen = torch.Generator().manual_seed(1)
    a, b = _slots(3, 32, 50, 70, [32, 5, 17], gen)
    # Segments: 20 tokens of slot 2, an empty one, 3 base tokens, 1 of slot 0, an empty
    # one of slot 1, 18 of slot 1 (two row tiles), 2 of slot 0.
    lens = [20, 0, 3, 1, 0, 18, 2]
    seg_slots = [2, 0, -1, 0, 1, 1, 0]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    x = torch.randn(starts[-1], 50, generator=gen)
    y0 = torch.randn(starts[-1], 70, generator=gen)
    st = torch.tensor(starts, dtype=torch.int32)
    ss = torch.tensor(seg_slots, dtype=torch.int32)
    s = k.sgmv_shrink(x, a, st, ss, max(lens))
    s_ref = ops.sgmv_shrink_ref(x, a, starts, seg_slots)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    y = k.sgmv_expand(s_ref, b, st, ss, max(lens), y0.clone())
    y_ref = ops.sgmv_expand_ref(s_ref, b, starts, seg_slots, y0.clone())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[20:23], y0[20:23])  # the base segment
    # SGMV and BGMV references agree (the same products, grouped differently).
    token_slots = torch.repeat_interleave(ss, torch.tensor(lens))
    torch.testing.assert_close(ops.bgmv_shrink_ref(x, a, token_slots), s_ref)


def test_no_segments_and_no_tokens():
    a = torch.randn(2, 16, 8)
    b = torch.randn(2, 8, 16)
    x = torch.randn(0, 8)
    empty = torch.zeros(0, dtype=torch.int32)
    assert k.bgmv_shrink(x, a, empty).shape == (0, 16)
    assert k.sgmv_shrink(x, a, torch.zeros(1, dtype=torch.int32), empty, 0).shape == (0, 16)
    y = torch.randn(4, 8)
    out = k.sgmv_expand(torch.randn(4, 16), b, torch.zeros(1, dtype=torch.int32), empty, 0, y)
    assert out is y


def test_cpu_paths_match_reference():
    # The CPU's per-slot and batched (padded groups) paths against the gather reference.
    gen = torch.Generator().manual_seed(2)
    a, b = _slots(5, 8, 24, 30, [8, 3, 8, 1, 5], gen)
    token_slots = torch.tensor([4, 0, 0, -1, 2, 4, 4, 1, 0, 3, -1, 2], dtype=torch.int32)
    x = torch.randn(len(token_slots), 24, generator=gen)
    y0 = torch.randn(len(token_slots), 30, generator=gen)
    want = ops.bgmv_expand_ref(ops.bgmv_shrink_ref(x, a, token_slots), b, token_slots, y0.clone())
    slots = [0, 1, 2, 3, 4]
    per_slot = [(s, torch.nonzero(token_slots == s).flatten()) for s in slots]
    got = ops.segmented_delta(x, a, b, per_slot, y0.clone())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got = ops.batched_delta(x, a, b, ops.PaddedGroups(token_slots, slots), y0.clone())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], y0[3]) and torch.equal(got[10], y0[10])  # base tokens
