"""State-space kernels (Triton under the interpreter on a CPU, and the torch paths the
CPU runs) against a sequential float64 recurrence: the causal conv1d and its state, the
Mamba-1 selective scan and the Mamba-2 chunked SSD scan, over ragged batches whose
lengths fall on, before and after chunk boundaries, requests that continue a state and
ones that start fresh, and a sequence split into chunks equal to it whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvasir.kernels import mamba as mk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [1, 15, 16, 17, 33, 2]  # chunk 16: on, before and after its edges
INIT = [True, False, True, True, False, True]
SLOTS = [5, 1, 2, 6, 3, 4]


def _layout(lens: list[int]) -> list[int]:
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    return qsl


def _seq_scan64(x, dt, A, B, C, D, z, qsl, init, state, slots, heads_per_group=None):
    """h = exp(dt A) h + dt B x, y = C h + D x (Mamba-1: per channel; Mamba-2: per head,
    dt/A scalar per head, B/C per group), one token at a time in float64."""
    out = torch.zeros_like(x, dtype=torch.float64)
    new_state = state.double().clone()
    for r in range(len(qsl) - 1):
        h = state[slots[r]].double().clone() if init[r] else torch.zeros_like(new_state[0])
        for t in range(qsl[r], qsl[r + 1]):
            if heads_per_group is None:  # Mamba-1: h [D, N]
                d = F.softplus(dt[t].double())
                h = (
                    torch.exp(d[:, None] * A.double()) * h
                    + (d * x[t].double())[:, None] * B[t].double()
                )
                y = h @ C[t].double() + D.double() * x[t].double()
                out[t] = y * F.silu(z[t].double())
            else:  # Mamba-2: h [H, P, N]
                d = dt[t].double()  # already softplus'd by the caller
                bs = B[t].double().repeat_interleave(heads_per_group, 0)
                cs = C[t].double().repeat_interleave(heads_per_group, 0)
                h = torch.exp(d * A.double())[:, None, None] * h + (
                    (x[t].double() * d[:, None])[..., None] * bs[:, None, :]
                )
                out[t] = (h @ cs[..., None]).squeeze(-1) + D.double()[:, None] * x[t].double()
        new_state[slots[r]] = h
    return out, new_state


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_conv1d_continues_its_state(impl: str) -> None:
    fn = mk.causal_conv1d_triton if impl == "triton" else mk.causal_conv1d_torch
    g = torch.Generator().manual_seed(0)
    d, k = 40, 4
    qsl = _layout(LENS)
    x = torch.randn(qsl[-1], d, generator=g)
    w, b = torch.randn(d, k, generator=g), torch.randn(d, generator=g)
    states = torch.randn(8, d, k - 1, generator=g)
    before = states.clone()
    out = fn(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), qsl, INIT, s := states.to(DEVICE), SLOTS)
    for r in range(len(LENS)):
        lo, hi = qsl[r], qsl[r + 1]
        prev = before[SLOTS[r]] if INIT[r] else torch.zeros(d, k - 1)
        full = torch.cat([prev, x[lo:hi].t()], 1).double()
        ref = F.conv1d(full[None], w.double()[:, None], b.double(), groups=d)[0].t()
        torch.testing.assert_close(out[lo:hi].cpu().double(), F.silu(ref), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s[SLOTS[r]].cpu().double(), full[:, -(k - 1) :])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_selective_scan_vs_sequential_float64(impl: str) -> None:
    fn = mk.selective_scan_triton if impl == "triton" else mk.selective_scan_torch
    g = torch.Generator().manual_seed(1)
    d, n = 24, 16
    qsl = _layout(LENS)
    t = qsl[-1]
    x, dt, z = (torch.randn(t, d, generator=g) for _ in range(3))
    A = -(torch.rand(d, n, generator=g) * 2 + 0.5)
    B, C = torch.randn(t, n, generator=g), torch.randn(t, n, generator=g)
    D = torch.randn(d, generator=g)
    state = torch.randn(8, d, n, generator=g)
    ref, ref_state = _seq_scan64(x, dt, A, B, C, D, z, qsl, INIT, state, SLOTS)
    st = state.to(DEVICE)
    args = [a.to(DEVICE) for a in (x, dt, A, B, C, D, z)]
    out = fn(*args, qsl, INIT, st, SLOTS)
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st.cpu().double(), ref_state, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_ssd_scan_vs_sequential_float64(impl: str) -> None:
    fn = mk.ssd_scan_triton if impl == "triton" else mk.ssd_scan_torch
    g = torch.Generator().manual_seed(2)
    h, p, n, groups = 4, 16, 16, 2
    qsl = _layout(LENS)
    t = qsl[-1]
    x = torch.randn(t, h, p, generator=g)
    dt, dt_bias = torch.randn(t, h, generator=g), torch.randn(h, generator=g) * 0.5 - 1
    A = -(torch.rand(h, generator=g) * 2 + 0.5)
    B, C = torch.randn(t, groups, n, generator=g), torch.randn(t, groups, n, generator=g)
    D = torch.randn(h, generator=g)
    state = torch.randn(8, h, p, n, generator=g)
    d = F.softplus(dt + dt_bias)
    ref, ref_state = _seq_scan64(x, d, A, B, C, D, None, qsl, INIT, state, SLOTS, h // groups)
    st = state.to(DEVICE)
    args = [a.to(DEVICE) for a in (x, dt, dt_bias, A, B, C, D)]
    out = fn(*args, qsl, INIT, st, SLOTS, chunk_size=16)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(st.cpu().double(), ref_state, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_chunks_equal_one_pass(impl: str) -> None:
    """A 45-token sequence in chunks of 7, 16, 1, 21 (state carried through the slot)
    equals it in one pass: conv, Mamba-1 scan and SSD."""
    conv = mk.causal_conv1d_triton if impl == "triton" else mk.causal_conv1d_torch
    scan = mk.selective_scan_triton if impl == "triton" else mk.selective_scan_torch
    ssd = mk.ssd_scan_triton if impl == "triton" else mk.ssd_scan_torch
    g = torch.Generator().manual_seed(3)
    L, d, n, k = 45, 32, 16, 4
    x, dt, z = (torch.randn(L, d, generator=g).to(DEVICE) for _ in range(3))
    w = torch.randn(d, k, generator=g).to(DEVICE)
    A = (-(torch.rand(d, n, generator=g) * 2 + 0.5)).to(DEVICE)
    B, C = (torch.randn(L, n, generator=g).to(DEVICE) for _ in range(2))
    D = torch.randn(d, generator=g).to(DEVICE)
    xh = x.view(L, 2, 16)
    Bh, Ch = B.view(L, 1, 16), C.view(L, 1, 16)
    dth, Ah = dt[:, :2].contiguous(), A[:2, 0].contiguous()
    dtb, Dh = torch.zeros(2, device=DEVICE), D[:2].contiguous()

    def run(cuts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cs = torch.zeros(2, d, k - 1, device=DEVICE)
        ss = torch.zeros(2, d, n, device=DEVICE)
        s2 = torch.zeros(2, 2, 16, 16, device=DEVICE)
        outs: list[list[torch.Tensor]] = [[], [], []]
        lo = 0
        for c in cuts:
            sl = slice(lo, lo + c)
            q, init = [0, c], [lo > 0]
            outs[0].append(conv(x[sl].contiguous(), w, None, q, init, cs, [1]))
            outs[1].append(scan(x[sl].contiguous(), dt[sl].contiguous(), A, B[sl].contiguous(),
                                C[sl].contiguous(), D, z[sl].contiguous(), q, init, ss, [1]))  # fmt: skip
            outs[2].append(ssd(xh[sl].contiguous(), dth[sl].contiguous(), dtb, Ah,
                               Bh[sl].contiguous(), Ch[sl].contiguous(), Dh, q, init, s2, [1],
                               chunk_size=16))  # fmt: skip
            lo += c
        return tuple(torch.cat(o) for o in outs)  # type: ignore[return-value]

    for a, b in zip(run([L]), run([7, 16, 1, 21]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_triton_paths_take_device_metadata() -> None:
    """The layers pass the runner's persistent int32 buffers (query_start_loc, the
    continue flags, the slots) straight to the kernels, as CUDA-graph replays need:
    the same results as host lists."""
    g = torch.Generator().manual_seed(4)
    d, k, n = 24, 4, 16
    qsl = _layout(LENS)
    t = qsl[-1]
    meta = [torch.tensor(v, dtype=torch.int32, device=DEVICE) for v in (qsl, INIT, SLOTS)]
    x, dt, z = (torch.randn(t, d, generator=g).to(DEVICE) for _ in range(3))
    w, b = torch.randn(d, k, generator=g).to(DEVICE), torch.randn(d, generator=g).to(DEVICE)
    A = (-(torch.rand(d, n, generator=g) * 2 + 0.5)).to(DEVICE)
    B, C = (torch.randn(t, n, generator=g).to(DEVICE) for _ in range(2))
    D = torch.randn(d, generator=g).to(DEVICE)
    cs0, ss0 = torch.randn(8, d, k - 1, generator=g), torch.randn(8, d, n, generator=g)
    outs = []
    for m in ((qsl, INIT, SLOTS), meta):
        cs, ss = cs0.clone().to(DEVICE), ss0.clone().to(DEVICE)
        y = mk.causal_conv1d_triton(x, w, b, m[0], m[1], cs, m[2])
        y = mk.selective_scan_triton(y, dt, A, B, C, D, z, m[0], m[1], ss, m[2])
        outs.append((y, cs, ss))
    for a, b_ in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a, b_)
