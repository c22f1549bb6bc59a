"""State-space model kernels over a flat varlen batch, each in Triton beside the plain-torch
version the CPU runs:

* ``causal_conv1d``: the depthwise causal convolution in front of the scan (kernel width
  ``K``), continuing from each request's conv state (its last ``K - 1`` inputs) and
  leaving the new one there;
* ``selective_scan`` (Mamba-1): ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``,
  ``y_t = C_t h_t + D x_t``, gated by ``silu(z_t)``, with input-dependent ``dt`` (per
  channel), ``B`` and ``C``; the recurrent state ``h`` is ``[channels, d_state]``;
* ``ssd_scan`` (Mamba-2): the same recurrence with one scalar ``A`` per head and ``B``,
  ``C`` shared by a group of heads, computed in chunks (state space duality): within a
  chunk of ``Q`` tokens ``Y = (C B^T ∘ L) (dt x)`` with the decay mask
  ``L[i, j] = exp(sum_{j < u <= i} dt_u A)`` plus the carried state's contribution
  ``exp(cumsum) C h``, and the state passed on to the next chunk once per chunk.

A step's batch is ``num_reqs`` requests laid out by ``query_start_loc`` (host ints);
request ``r`` continues from state slot ``slots[r]`` when ``has_initial_state[r]``
(tokens of it were computed before) and starts from zeros otherwise; its final state is
written back to the same slot. A decode is a one-token request: the same code paths.
``slots=None`` runs without a state cache (zeros in, nothing kept): a profiling pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- torch


def _split_singles(query_start_loc: Sequence[int]) -> tuple[list[int], list[int]]:
    """(requests with one token, requests with more), empty ones dropped."""
    singles, rest = [], []
    for r in range(len(query_start_loc) - 1):
        n = query_start_loc[r + 1] - query_start_loc[r]
        if n == 1:
            singles.append(r)
        elif n > 1:
            rest.append(r)
    return singles, rest


def causal_conv1d_torch(
    x: torch.Tensor,  # [T, D]
    weight: torch.Tensor,  # [D, K]
    bias: torch.Tensor | None,  # [D]
    query_start_loc: Sequence[int],
    has_initial_state: Sequence[bool],
    conv_states: torch.Tensor | None,  # [slots, D, K - 1]
    slots: Sequence[int] | None,
    silu: bool = True,
) -> torch.Tensor:  # [T, D]
    k = weight.shape[1]
    out = torch.empty_like(x)
    singles, rest = _split_singles(query_start_loc)
    if singles:  # one-token requests (decodes): all at once
        rows = torch.tensor([query_start_loc[r] for r in singles], device=x.device)
        if slots is not None:
            assert conv_states is not None
            idx = torch.tensor([slots[r] for r in singles], device=x.device)
            keep = torch.tensor([bool(has_initial_state[r]) for r in singles], device=x.device)
            prev = conv_states[idx].to(x.dtype) * keep[:, None, None]
        else:
            prev = x.new_zeros(len(singles), x.shape[1], k - 1)
        window = torch.cat([prev, x[rows][:, :, None]], dim=2)  # [S, D, K]
        y = (window * weight).sum(-1)
        if bias is not None:
            y = y + bias
        out[rows] = F.silu(y) if silu else y
        if slots is not None:
            conv_states[idx] = window[:, :, 1:].to(conv_states.dtype)
    for r in rest:
        lo, hi = query_start_loc[r], query_start_loc[r + 1]
        xr = x[lo:hi].t()  # [D, L]
        if slots is not None and has_initial_state[r]:
            assert conv_states is not None
            prev = conv_states[slots[r]].to(x.dtype)
        else:
            prev = x.new_zeros(x.shape[1], k - 1)
        window = torch.cat([prev, xr], dim=1)  # [D, K - 1 + L]
        y = F.conv1d(window[None], weight[:, None, :], bias, groups=x.shape[1])[0]
        out[lo:hi] = (F.silu(y) if silu else y).t()
        if slots is not None:
            assert conv_states is not None
            conv_states[slots[r]] = window[:, -(k - 1) :].to(conv_states.dtype)
    return out


def selective_scan_torch(
    x: torch.Tensor,  # [T, D]
    dt: torch.Tensor,  # [T, D], before softplus (dt_proj's bias included)
    A: torch.Tensor,  # [D, N] (negative)
    B: torch.Tensor,  # [T, N]
    C: torch.Tensor,  # [T, N]
    D: torch.Tensor | None,  # [D]
    z: torch.Tensor | None,  # [T, D]
    query_start_loc: Sequence[int],
    has_initial_state: Sequence[bool],
    ssm_states: torch.Tensor | None,  # [slots, D, N] float32
    slots: Sequence[int] | None,
) -> torch.Tensor:  # [T, D]
    """Token by token in float32 (vectorised over channels and state)."""
    out = torch.empty_like(x)
    af = A.float()
    singles, rest = _split_singles(query_start_loc)
    if singles:  # one-token requests (decodes): one recurrence step for all of them
        rows = torch.tensor([query_start_loc[r] for r in singles], device=x.device)
        if slots is not None:
            assert ssm_states is not None
            idx = torch.tensor([slots[r] for r in singles], device=x.device)
            keep = torch.tensor([bool(has_initial_state[r]) for r in singles], device=x.device)
            h = ssm_states[idx].float() * keep[:, None, None]
        else:
            h = x.new_zeros((len(singles), *af.shape), dtype=torch.float32)
        xs, ds = x[rows].float(), F.softplus(dt[rows].float())  # [S, D]
        h = torch.exp(ds[:, :, None] * af) * h + (ds * xs)[:, :, None] * B[rows].float()[:, None]
        y = (h @ C[rows].float()[:, :, None]).squeeze(-1)
        if D is not None:
            y = y + xs * D.float()
        if z is not None:
            y = y * F.silu(z[rows].float())
        out[rows] = y.to(x.dtype)
        if slots is not None:
            ssm_states[idx] = h.to(ssm_states.dtype)
    for r in rest:
        lo, hi = query_start_loc[r], query_start_loc[r + 1]
        if slots is not None and has_initial_state[r]:
            assert ssm_states is not None
            h = ssm_states[slots[r]].float().clone()
        else:
            h = x.new_zeros(af.shape, dtype=torch.float32)
        xs, ds = x[lo:hi].float(), F.softplus(dt[lo:hi].float())
        bs, cs = B[lo:hi].float(), C[lo:hi].float()
        ys = []
        for t in range(hi - lo):
            h = torch.exp(ds[t, :, None] * af) * h + (ds[t] * xs[t])[:, None] * bs[t][None, :]
            ys.append(h @ cs[t])
        y = torch.stack(ys)
        if D is not None:
            y = y + xs * D.float()
        if z is not None:
            y = y * F.silu(z[lo:hi].float())
        out[lo:hi] = y.to(x.dtype)
        if slots is not None:
            assert ssm_states is not None
            ssm_states[slots[r]] = h.to(ssm_states.dtype)
    return out


def ssd_scan_torch(
    x: torch.Tensor,  # [T, H, P]
    dt: torch.Tensor,  # [T, H] before dt_bias and softplus
    dt_bias: torch.Tensor,  # [H]
    A: torch.Tensor,  # [H] (negative)
    B: torch.Tensor,  # [T, G, N]
    C: torch.Tensor,  # [T, G, N]
    D: torch.Tensor | None,  # [H]
    query_start_loc: Sequence[int],
    has_initial_state: Sequence[bool],
    ssm_states: torch.Tensor | None,  # [slots, H, P, N] float32
    slots: Sequence[int] | None,
    chunk_size: int = 64,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:  # [T, H, P]
    """The chunked (SSD) form in float32, all heads at once."""
    num_heads, groups = x.shape[1], B.shape[1]
    rep = num_heads // groups
    out = torch.empty_like(x)
    af = A.float()
    singles, rest = _split_singles(query_start_loc)
    if singles:  # one-token requests (decodes): one recurrence step for all of them
        rows = torch.tensor([query_start_loc[r] for r in singles], device=x.device)
        shape = (len(singles), num_heads, x.shape[2], B.shape[2])
        if slots is not None:
            assert ssm_states is not None
            idx = torch.tensor([slots[r] for r in singles], device=x.device)
            keep = torch.tensor([bool(has_initial_state[r]) for r in singles], device=x.device)
            h = ssm_states[idx].float() * keep[:, None, None, None]
        else:
            h = x.new_zeros(shape, dtype=torch.float32)
        d = F.softplus(dt[rows].float() + dt_bias.float()).clamp(*dt_limit)  # [S, H]
        xs = x[rows].float()  # [S, H, P]
        bs = B[rows].float().repeat_interleave(rep, dim=1)  # [S, H, N]
        cs = C[rows].float().repeat_interleave(rep, dim=1)
        h = (
            torch.exp(d * af)[:, :, None, None] * h
            + (xs * d[:, :, None])[..., None] * bs[:, :, None, :]
        )
        y = (h @ cs[..., None]).squeeze(-1)  # [S, H, P]
        if D is not None:
            y = y + xs * D.float()[None, :, None]
        out[rows] = y.to(x.dtype)
        if slots is not None:
            ssm_states[idx] = h.to(ssm_states.dtype)
    for r in rest:
        lo, hi = query_start_loc[r], query_start_loc[r + 1]
        if slots is not None and has_initial_state[r]:
            assert ssm_states is not None
            state = ssm_states[slots[r]].float().clone()  # [H, P, N]
        else:
            state = x.new_zeros((num_heads, x.shape[2], B.shape[2]), dtype=torch.float32)
        d = F.softplus(dt[lo:hi].float() + dt_bias.float()).clamp(*dt_limit)  # [L, H]
        xs = x[lo:hi].float()
        bs = B[lo:hi].float().repeat_interleave(rep, dim=1)  # [L, H, N]
        cs = C[lo:hi].float().repeat_interleave(rep, dim=1)
        for c0 in range(0, hi - lo, chunk_size):
            sl = slice(c0, min(c0 + chunk_size, hi - lo))
            a = d[sl] * af  # [Q, H]
            cum = torch.cumsum(a, dim=0)  # [Q, H]
            seg = cum[:, None, :] - cum[None, :, :]  # [Qi, Qj, H]
            q = a.shape[0]
            causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device))
            decay = torch.exp(seg.masked_fill(~causal[:, :, None], float("-inf")))
            g = torch.einsum("ihn,jhn->ijh", cs[sl], bs[sl])  # [Qi, Qj, H]
            xdt = xs[sl] * d[sl][:, :, None]  # [Q, H, P]
            y = torch.einsum("ijh,jhp->ihp", g * decay, xdt)
            y = y + torch.einsum("ihn,hpn->ihp", cs[sl], state) * torch.exp(cum)[:, :, None]
            if D is not None:
                y = y + xs[sl] * D.float()[None, :, None]
            out[lo + c0 : lo + sl.stop] = y.to(x.dtype)
            to_end = torch.exp(cum[-1][None, :] - cum)  # [Q, H]
            state = state * torch.exp(cum[-1])[:, None, None] + torch.einsum(
                "jhp,jhn->hpn", xdt * to_end[:, :, None], bs[sl]
            )
        if slots is not None:
            assert ssm_states is not None
            ssm_states[slots[r]] = state.to(ssm_states.dtype)
    return out


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _conv1d_kernel(
    x_ptr,  # [T, D]
    w_ptr,  # [D, K]
    b_ptr,  # [D]
    out_ptr,  # [T, D]
    qsl_ptr,  # [R + 1] int32
    init_ptr,  # [R] int32
    slot_ptr,  # [R] int32
    state_ptr,  # [S, D, K - 1]
    D,
    stride_x,
    stride_o,
    stride_ss,
    stride_sd,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lo = tl.load(qsl_ptr + r)
    length = tl.load(qsl_ptr + r + 1) - lo
    init = tl.load(init_ptr + r)
    slot = tl.load(slot_ptr + r)
    state_base = state_ptr + slot.to(tl.int64) * stride_ss + offs_d * stride_sd
    # Read the old conv state only where the request continues (a vector mask).
    mask_init = mask_d & ((tl.zeros((BLOCK_D,), dtype=tl.int32) + init) != 0)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for t0 in range(0, length, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < length
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32) + bias[None, :]
        for k in tl.static_range(K):
            s = offs_t - (K - 1) + k  # input position (negative: from the conv state)
            xv = tl.load(
                x_ptr + (lo + s[:, None]).to(tl.int64) * stride_x + offs_d[None, :],
                mask=mask_t[:, None] & (s[:, None] >= 0) & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            if HAS_STATE:
                xv += tl.load(
                    state_base[None, :] + (K - 1 + s[:, None]),
                    mask=mask_t[:, None] & (s[:, None] < 0) & mask_init[None, :],
                    other=0.0,
                ).to(tl.float32)
            wk = tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(tl.float32)
            acc += xv * wk[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(
            out_ptr + (lo + offs_t[:, None]).to(tl.int64) * stride_o + offs_d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=mask_t[:, None] & mask_d[None, :],
        )
    if HAS_STATE:
        # The new conv state: the last K - 1 inputs. Entry j reads old entry
        # length + j >= j, which no earlier iteration has overwritten.
        for j in tl.static_range(K - 1):
            # position in this request's chunk, as a vector (masks must be blocks)
            s = tl.zeros((BLOCK_D,), dtype=tl.int32) + (length - (K - 1) + j)
            from_x = tl.load(
                x_ptr + (lo + s).to(tl.int64) * stride_x + offs_d,
                mask=mask_d & (s >= 0),
                other=0.0,
            ).to(tl.float32)
            old = tl.load(state_base + (K - 1 + s), mask=mask_init & (s < 0), other=0.0).to(
                tl.float32
            )
            new = tl.where(s >= 0, from_x, old)
            tl.store(state_base + j, new.to(state_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _selective_scan_kernel(
    x_ptr,  # [T, D]
    dt_ptr,  # [T, D]
    a_ptr,  # [D, N]
    b_ptr,  # [T, N]
    c_ptr,  # [T, N]
    dskip_ptr,  # [D]
    z_ptr,  # [T, D]
    out_ptr,  # [T, D]
    qsl_ptr,
    init_ptr,
    slot_ptr,
    state_ptr,  # [S, D, N] float32
    D,
    stride_x,
    stride_dt,
    stride_b,
    stride_c,
    stride_z,
    stride_o,
    stride_ss,
    N: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_n = tl.arange(0, N)
    lo = tl.load(qsl_ptr + r)
    length = tl.load(qsl_ptr + r + 1) - lo
    a = tl.load(a_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d[:, None], other=0.0)
    a = a.to(tl.float32)
    h = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    state_off = offs_d[:, None] * N + offs_n[None, :]
    if HAS_STATE:
        init = tl.load(init_ptr + r)
        slot = tl.load(slot_ptr + r).to(tl.int64)
        mask_init = mask_d & ((tl.zeros((BLOCK_D,), dtype=tl.int32) + init) != 0)
        h = tl.load(state_ptr + slot * stride_ss + state_off, mask=mask_init[:, None], other=0.0)
    dskip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        dskip = tl.load(dskip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for t in range(0, length):
        row = (lo + t).to(tl.int64)
        xv = tl.load(x_ptr + row * stride_x + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dv = tl.load(dt_ptr + row * stride_dt + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dv = tl.where(dv > 20.0, dv, tl.log(1.0 + tl.exp(dv)))  # softplus
        bv = tl.load(b_ptr + row * stride_b + offs_n).to(tl.float32)
        cv = tl.load(c_ptr + row * stride_c + offs_n).to(tl.float32)
        h = tl.exp(dv[:, None] * a) * h + (dv * xv)[:, None] * bv[None, :]
        y = tl.sum(h * cv[None, :], axis=1) + dskip * xv
        if HAS_Z:
            zv = tl.load(z_ptr + row * stride_z + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(out_ptr + row * stride_o + offs_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    if HAS_STATE:
        tl.store(state_ptr + slot * stride_ss + state_off, h, mask=mask_d[:, None])


@triton.jit
def _ssd_kernel(
    x_ptr,  # [T, H, P]
    dt_ptr,  # [T, H]
    dtb_ptr,  # [H]
    a_ptr,  # [H]
    b_ptr,  # [T, G, N]
    c_ptr,  # [T, G, N]
    dskip_ptr,  # [H]
    out_ptr,  # [T, H, P]
    qsl_ptr,
    init_ptr,
    slot_ptr,
    state_ptr,  # [S, H, P, N] float32
    P,
    heads_per_group,
    dt_min,
    dt_max,
    stride_xt,
    stride_xh,
    stride_dtt,
    stride_bt,
    stride_bg,
    stride_ct,
    stride_cg,
    stride_ot,
    stride_oh,
    stride_ss,
    stride_sh,
    N: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_STATE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    r = tl.program_id(0)
    hd = tl.program_id(1)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_n = tl.arange(0, N)
    offs_q = tl.arange(0, CHUNK)
    grp = hd // heads_per_group
    lo = tl.load(qsl_ptr + r)
    length = tl.load(qsl_ptr + r + 1) - lo
    a = tl.load(a_ptr + hd).to(tl.float32)
    dtb = tl.load(dtb_ptr + hd).to(tl.float32)
    dskip = 0.0
    if HAS_D:
        dskip = tl.load(dskip_ptr + hd).to(tl.float32)
    state = tl.zeros((BLOCK_P, N), dtype=tl.float32)
    state_ptrs = state_ptr + hd * stride_sh + offs_p[:, None] * N + offs_n[None, :]
    if HAS_STATE:
        init = tl.load(init_ptr + r)
        slot = tl.load(slot_ptr + r).to(tl.int64)
        mask_init = mask_p & ((tl.zeros((BLOCK_P,), dtype=tl.int32) + init) != 0)
        state = tl.load(state_ptrs + slot * stride_ss, mask=mask_init[:, None], other=0.0)
    causal = offs_q[:, None] >= offs_q[None, :]
    for c0 in range(0, length, CHUNK):
        rows = c0 + offs_q
        valid = rows < length
        t = (lo + rows).to(tl.int64)
        dv = tl.load(dt_ptr + t * stride_dtt + hd, mask=valid, other=0.0).to(tl.float32) + dtb
        dv = tl.where(dv > 20.0, dv, tl.log(1.0 + tl.exp(dv)))
        dv = tl.minimum(tl.maximum(dv, dt_min), dt_max)
        dv = tl.where(valid, dv, 0.0)
        cum = tl.cumsum(dv * a, axis=0)  # [Q]
        total = tl.sum(dv * a, axis=0)
        xq = tl.load(
            x_ptr + t[:, None] * stride_xt + hd * stride_xh + offs_p[None, :],
            mask=valid[:, None] & mask_p[None, :],
            other=0.0,
        ).to(tl.float32)
        bq = tl.load(
            b_ptr + t[:, None] * stride_bt + grp * stride_bg + offs_n[None, :],
            mask=valid[:, None],
            other=0.0,
        ).to(tl.float32)
        cq = tl.load(
            c_ptr + t[:, None] * stride_ct + grp * stride_cg + offs_n[None, :],
            mask=valid[:, None],
            other=0.0,
        ).to(tl.float32)
        decay = tl.where(causal, tl.exp(cum[:, None] - cum[None, :]), 0.0)  # [Q, Q]
        g = tl.dot(cq, tl.trans(bq), input_precision="ieee")  # [Q, Q]
        xdt = xq * dv[:, None]
        y = tl.dot(g * decay, xdt, input_precision="ieee")  # [Q, P]
        y += tl.dot(cq, tl.trans(state), input_precision="ieee") * tl.exp(cum)[:, None]
        y += dskip * xq
        tl.store(
            out_ptr + t[:, None] * stride_ot + hd * stride_oh + offs_p[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=valid[:, None] & mask_p[None, :],
        )
        to_end = tl.exp(total - cum)  # [Q]
        state = state * tl.exp(total) + tl.dot(
            tl.trans(xdt * to_end[:, None]), bq, input_precision="ieee"
        )
    if HAS_STATE:
        tl.store(state_ptrs + slot * stride_ss, state, mask=mask_p[:, None])


def _meta(
    query_start_loc: Sequence[int] | torch.Tensor,
    has_initial_state: Sequence[bool] | torch.Tensor,
    slots: Sequence[int] | torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' int32 device metadata. Device tensors (the runner's persistent
    buffers: one set per step, read by every layer and by CUDA-graph replays) pass
    through; host sequences (tests, eager callers) are copied over."""

    def dev(v: Sequence[int] | Sequence[bool] | torch.Tensor) -> torch.Tensor:
        if isinstance(v, torch.Tensor) and v.device == device and v.dtype == torch.int32:
            return v
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=torch.int32)
        return torch.tensor([int(b) for b in v], dtype=torch.int32).to(device)

    qsl, init = dev(query_start_loc), dev(has_initial_state)
    if slots is None:
        return qsl, init, torch.zeros_like(init)
    return qsl, init, dev(slots)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    query_start_loc: Sequence[int] | torch.Tensor,
    has_initial_state: Sequence[bool] | torch.Tensor,
    conv_states: torch.Tensor | None,
    slots: Sequence[int] | torch.Tensor | None,
    silu: bool = True,
) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    d, k = weight.shape
    out = torch.empty_like(x)
    qsl, init, sl = _meta(query_start_loc, has_initial_state, slots, x.device)
    has_state = slots is not None and conv_states is not None
    st = conv_states if has_state else x
    block_d = min(64, triton.next_power_of_2(d))
    grid = (len(query_start_loc) - 1, triton.cdiv(d, block_d))
    _conv1d_kernel[grid](
        x, weight, bias if bias is not None else x, out, qsl, init, sl, st, d,
        x.stride(0), out.stride(0),
        st.stride(0) if has_state else 0, st.stride(1) if has_state else 0,
        K=k, HAS_BIAS=bias is not None, HAS_STATE=has_state, SILU=silu,
        BLOCK_T=16, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def selective_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    query_start_loc: Sequence[int] | torch.Tensor,
    has_initial_state: Sequence[bool] | torch.Tensor,
    ssm_states: torch.Tensor | None,
    slots: Sequence[int] | torch.Tensor | None,
) -> torch.Tensor:
    d, n = A.shape
    if n & (n - 1):
        raise ValueError(f"selective scan: d_state must be a power of two, got {n}")
    A = A.float().contiguous()
    out = torch.empty_like(x)
    qsl, init, sl = _meta(query_start_loc, has_initial_state, slots, x.device)
    has_state = slots is not None and ssm_states is not None
    st = ssm_states if has_state else A
    block_d = min(32, triton.next_power_of_2(d))
    grid = (len(query_start_loc) - 1, triton.cdiv(d, block_d))
    zz = z if z is not None else x
    _selective_scan_kernel[grid](
        x, dt, A, B, C, D if D is not None else A, zz, out, qsl, init, sl, st, d,
        x.stride(0), dt.stride(0), B.stride(0), C.stride(0), zz.stride(0), out.stride(0),
        st.stride(0) if has_state else 0,
        N=n, HAS_D=D is not None, HAS_Z=z is not None, HAS_STATE=has_state, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def ssd_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    query_start_loc: Sequence[int] | torch.Tensor,
    has_initial_state: Sequence[bool] | torch.Tensor,
    ssm_states: torch.Tensor | None,
    slots: Sequence[int] | torch.Tensor | None,
    chunk_size: int = 64,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    t, h, p = x.shape
    n = B.shape[2]
    if n & (n - 1) or n < 16:
        raise ValueError(f"SSD scan: d_state must be a power of two >= 16, got {n}")
    out = torch.empty_like(x)
    qsl, init, sl = _meta(query_start_loc, has_initial_state, slots, x.device)
    has_state = slots is not None and ssm_states is not None
    st = ssm_states if has_state else x
    block_p = max(16, min(64, triton.next_power_of_2(p)))
    chunk = max(16, min(triton.next_power_of_2(chunk_size), 64))
    grid = (len(query_start_loc) - 1, h, triton.cdiv(p, block_p))
    _ssd_kernel[grid](
        x, dt, dt_bias, A.float().contiguous(), B, C, D if D is not None else dt_bias, out,
        qsl, init, sl, st, p, h // B.shape[1], float(dt_limit[0]), float(min(dt_limit[1], 1e30)),
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0),
        C.stride(1), out.stride(0), out.stride(1),
        st.stride(0) if has_state else 0, st.stride(1) if has_state else 0,
        N=n, HAS_D=D is not None, HAS_STATE=has_state, CHUNK=chunk, BLOCK_P=block_p,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- dispatch


def causal_conv1d(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
    fn = causal_conv1d_triton if x.is_cuda else causal_conv1d_torch
    return fn(x, *args, **kwargs)


def selective_scan(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
    fn = selective_scan_triton if x.is_cuda else selective_scan_torch
    return fn(x, *args, **kwargs)


def ssd_scan(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
    fn = ssd_scan_triton if x.is_cuda else ssd_scan_torch
    return fn(x, *args, **kwargs)
