"""Verification of draft tokens: lossless rejection sampling (Leviathan et al., Chen et al.).

For one request with drafts ``x_1..x_k`` (drawn from the draft distributions ``q_j``) and
target distributions ``p_0..p_k`` (``p_{j-1}`` is the target's distribution for the
position of ``x_j``; ``p_k`` is the bonus position after the last draft):

- greedy request: draft ``x_j`` is accepted while it equals the target's argmax at its
  position; the first mismatch is replaced by that argmax, and a fully accepted block
  gets the bonus position's argmax;
- random request: ``x_j`` is accepted with probability ``min(1, p(x_j) / q(x_j))``
  (``uniform * q(x_j) < p(x_j)``); the first rejected one is replaced by a sample from
  the residual ``norm(max(0, p - q))``, and a fully accepted block gets a sample from
  ``p_k``. Every emitted token is then distributed exactly as the target alone would
  sample it. Point-mass drafts (n-gram lookup, ``draft_probs`` None) have
  ``q = one-hot(x_j)``: accepted with probability ``p(x_j)``, residual ``p`` without
  ``x_j``.

Every request emits ``num_accepted + 1`` tokens. Samples use the exponential race of
``kvasir.layers.sampler`` (``argmax(w / noise)`` with ``noise ~ Exp(1)``, exact for any
unnormalised ``w >= 0``), so a seeded request draws all of its randomness (one uniform per
draft, one noise row) from its own generator: see ``rejection_noise``.

Acceptance is ``uniform * q < p`` rather than ``<=``: ``uniform`` may be exactly 0, and
``<=`` would then accept a draft the target gives probability 0 (a top-k-masked token, a
token forbidden by min_tokens). For ``uniform`` in [0, 1) the two differ only there.

``rejection_sample_triton`` runs one program per request; ``rejection_sample_ref`` is the
vectorised plain-torch reference (no per-request Python work, no host sync). The two give
identical tokens: the same float32 operations in the same order, division correctly
rounded, first index on argmax ties.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------


@triton.jit
def _verify_greedy(
    out_ptr,  # [max_spec_len + 1] int64: this request's output row
    draft_token_ids_ptr,  # [D] int64
    target_argmax_ptr,  # [D + B] int64
    start,  # this request's first draft index
    num_draft,  # k
    first_row,  # this request's first target row (start + request index)
):
    num_accepted = tl.zeros((), dtype=tl.int32)
    for j in range(num_draft):
        alive = num_accepted == j  # every earlier draft accepted
        draft = tl.load(draft_token_ids_ptr + start + j)
        target = tl.load(target_argmax_ptr + first_row + j)
        # An accepted draft equals the target's argmax; a rejected one is replaced by it.
        tl.store(out_ptr + j, target, mask=alive)
        num_accepted += (alive & (draft == target)).to(tl.int32)
    bonus = tl.load(target_argmax_ptr + first_row + num_draft)
    tl.store(out_ptr + num_draft, bonus, mask=num_accepted == num_draft)
    return num_accepted


@triton.jit
def _verify_random(
    out_ptr,  # [max_spec_len + 1] int64: this request's output row
    draft_token_ids_ptr,  # [D] int64
    draft_probs_ptr,  # [D, V] float32 (read only if HAS_DRAFT_PROBS)
    target_probs_ptr,  # [D + B, V] float32
    uniform_ptr,  # [D] float32
    noise_ptr,  # [V] float32: this request's Exp(1) noise row
    stride_draft_probs,
    stride_target_probs,
    start,
    num_draft,
    first_row,
    vocab_size,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # --- accept drafts while uniform * q(x) < p(x) ---
    num_accepted = tl.zeros((), dtype=tl.int32)
    for j in range(num_draft):
        alive = num_accepted == j
        draft = tl.load(draft_token_ids_ptr + start + j)
        p = tl.load(target_probs_ptr + (first_row + j) * stride_target_probs + draft)
        u = tl.load(uniform_ptr + start + j)
        if HAS_DRAFT_PROBS:
            q = tl.load(draft_probs_ptr + (start + j) * stride_draft_probs + draft)
            accepted = alive & (u * q < p)
        else:
            accepted = alive & (u < p)
        tl.store(out_ptr + j, draft, mask=accepted)
        num_accepted += accepted.to(tl.int32)

    # --- one token from the residual (after a rejection) or from p (bonus) ---
    rejected = num_accepted < num_draft
    p_row_ptr = target_probs_ptr + (first_row + num_accepted) * stride_target_probs
    q_row_ptr = draft_probs_ptr + (start + num_accepted) * stride_draft_probs
    rejected_token = tl.load(draft_token_ids_ptr + start + num_accepted, mask=rejected, other=-1)
    q_len = tl.where(rejected, vocab_size, 0)  # q is read only after a rejection
    # Race over the residual w and, as the fallback for an all-zero residual, over p.
    best_w = tl.full((), -1.0, tl.float32)
    best_w_id = tl.zeros((), dtype=tl.int32)
    best_p = tl.full((), -1.0, tl.float32)
    best_p_id = tl.zeros((), dtype=tl.int32)
    for v0 in range(0, vocab_size, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        in_vocab = offs < vocab_size
        p = tl.load(p_row_ptr + offs, mask=in_vocab, other=0.0)
        noise = tl.load(noise_ptr + offs, mask=in_vocab, other=1.0)
        if HAS_DRAFT_PROBS:
            q = tl.load(q_row_ptr + offs, mask=offs < q_len, other=0.0)
            w = tl.maximum(p - q, 0.0)  # q = 0 without a rejection: w = p
        else:
            w = tl.where(offs == rejected_token, 0.0, p)
        # div_rn: correctly rounded, as torch's division (plain / is approximate on GPUs).
        w_score = tl.where(in_vocab, tl.math.div_rn(w, noise), -1.0)
        p_score = tl.where(in_vocab, tl.math.div_rn(p, noise), -1.0)
        block_w = tl.max(w_score, axis=0)
        block_w_id = tl.argmax(w_score, axis=0) + v0  # first index of the maximum
        block_p = tl.max(p_score, axis=0)
        block_p_id = tl.argmax(p_score, axis=0) + v0
        # Strictly greater: an earlier block keeps a tie (torch.argmax's first index).
        better_w = block_w > best_w
        best_w_id = tl.where(better_w, block_w_id, best_w_id)
        best_w = tl.where(better_w, block_w, best_w)
        better_p = block_p > best_p
        best_p_id = tl.where(better_p, block_p_id, best_p_id)
        best_p = tl.where(better_p, block_p, best_p)
    token = tl.where(best_w > 0.0, best_w_id, best_p_id)
    tl.store(out_ptr + num_accepted, token.to(tl.int64))
    return num_accepted


@triton.jit
def _rejection_sample_kernel(
    output_token_ids_ptr,  # [B, max_spec_len + 1] int64, prefilled with -1
    num_accepted_ptr,  # [B] int32
    draft_token_ids_ptr,  # [D] int64
    cu_num_draft_ptr,  # [B + 1] int32 / int64
    draft_probs_ptr,  # [D, V] float32 (read only if HAS_DRAFT_PROBS)
    target_probs_ptr,  # [D + B, V] float32 (read only if not ALL_GREEDY)
    target_argmax_ptr,  # [D + B] int64
    is_greedy_ptr,  # [B] bool
    uniform_ptr,  # [D] float32
    exp_noise_ptr,  # [B, V] float32 (read only if not ALL_GREEDY)
    stride_output,
    stride_draft_probs,
    stride_target_probs,
    stride_noise,
    vocab_size,
    HAS_DRAFT_PROBS: tl.constexpr,
    ALL_GREEDY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_num_draft_ptr + req).to(tl.int64)
    num_draft = tl.load(cu_num_draft_ptr + req + 1).to(tl.int64) - start
    first_row = start + req  # each earlier request has one more target row than drafts
    out_ptr = output_token_ids_ptr + req * stride_output
    if ALL_GREEDY:
        num_accepted = _verify_greedy(
            out_ptr, draft_token_ids_ptr, target_argmax_ptr, start, num_draft, first_row
        )
    else:
        if tl.load(is_greedy_ptr + req):
            num_accepted = _verify_greedy(
                out_ptr, draft_token_ids_ptr, target_argmax_ptr, start, num_draft, first_row
            )
        else:
            num_accepted = _verify_random(
                out_ptr,
                draft_token_ids_ptr,
                draft_probs_ptr,
                target_probs_ptr,
                uniform_ptr,
                exp_noise_ptr + req * stride_noise,
                stride_draft_probs,
                stride_target_probs,
                start,
                num_draft,
                first_row,
                vocab_size,
                HAS_DRAFT_PROBS,
                BLOCK_V,
            )
    tl.store(num_accepted_ptr + req, num_accepted)


def rejection_sample_triton(
    draft_token_ids: torch.Tensor,  # [D] int64
    cu_num_draft: torch.Tensor,  # [B + 1] int32 / int64
    draft_probs: torch.Tensor | None,  # [D, V] float32; None: point-mass drafts
    target_probs: torch.Tensor | None,  # [D + B, V] float32; None: every request greedy
    target_argmax: torch.Tensor,  # [D + B] int64
    is_greedy: torch.Tensor,  # [B] bool
    uniform: torch.Tensor,  # [D] float32 in [0, 1)
    exp_noise: torch.Tensor | None,  # [B, V] float32 ~ Exp(1); None: every request greedy
    max_spec_len: int,
    block_v: int | None = None,  # vocabulary tile; None: chosen from V
) -> tuple[torch.Tensor, torch.Tensor]:  # ([B, max_spec_len + 1] int64, [B] int32)
    """``rejection_sample`` as one Triton program per request. Runs on CUDA tensors, or
    on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it)."""
    num_reqs = cu_num_draft.shape[0] - 1
    device = draft_token_ids.device
    output_token_ids = torch.full(
        (num_reqs, max_spec_len + 1), -1, dtype=torch.int64, device=device
    )
    num_accepted = torch.empty(num_reqs, dtype=torch.int32, device=device)
    if num_reqs == 0:
        return output_token_ids, num_accepted
    all_greedy = target_probs is None or exp_noise is None
    if all_greedy:
        # Never read: any float32 tensor stands in for the missing pointers.
        target_probs = exp_noise = uniform
        vocab_size = 1
        stride_target_probs = stride_noise = 0
    else:
        assert target_probs is not None and exp_noise is not None
        assert target_probs.stride(1) == 1 and exp_noise.stride(1) == 1
        vocab_size = target_probs.shape[1]
        stride_target_probs, stride_noise = target_probs.stride(0), exp_noise.stride(0)
    if draft_probs is None:
        draft_probs_arg, stride_draft_probs = uniform, 0  # never read
    else:
        assert draft_probs.stride(1) == 1
        draft_probs_arg, stride_draft_probs = draft_probs, draft_probs.stride(0)
    if block_v is None:
        block_v = min(2048, triton.next_power_of_2(vocab_size))
    _rejection_sample_kernel[(num_reqs,)](
        output_token_ids,
        num_accepted,
        draft_token_ids,
        cu_num_draft,
        draft_probs_arg,
        target_probs,
        target_argmax,
        is_greedy,
        uniform,
        exp_noise,
        output_token_ids.stride(0),
        stride_draft_probs,
        stride_target_probs,
        stride_noise,
        vocab_size,
        HAS_DRAFT_PROBS=draft_probs is not None,
        ALL_GREEDY=all_greedy,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return output_token_ids, num_accepted


# ---------------------------------------------------------------------------------------
# Plain-torch reference
# ---------------------------------------------------------------------------------------


def rejection_sample_ref(
    draft_token_ids: torch.Tensor,  # [D] int64
    cu_num_draft: torch.Tensor,  # [B + 1] int32 / int64
    draft_probs: torch.Tensor | None,  # [D, V] float32; None: point-mass drafts
    target_probs: torch.Tensor | None,  # [D + B, V] float32; None: every request greedy
    target_argmax: torch.Tensor,  # [D + B] int64
    is_greedy: torch.Tensor,  # [B] bool
    uniform: torch.Tensor,  # [D] float32 in [0, 1)
    exp_noise: torch.Tensor | None,  # [B, V] float32 ~ Exp(1); None: every request greedy
    max_spec_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([B, max_spec_len + 1] int64, [B] int32)
    """``rejection_sample`` vectorised over requests; loops over nothing and never
    synchronises with the device. Request ``i``'s ``max_spec_len + 1`` positions are laid
    out as columns; positions past its ``k_i`` are padding."""
    device = draft_token_ids.device
    num_reqs = cu_num_draft.shape[0] - 1
    num_drafts = draft_token_ids.shape[0]
    max_k = max_spec_len
    cu = cu_num_draft.to(torch.int64)
    start = cu[:-1]  # [B]
    num_draft = cu[1:] - start  # [B]
    pos = torch.arange(max_k + 1, device=device)  # [K + 1]
    # Target rows, padding clamped to each request's bonus row.
    first_row = start + torch.arange(num_reqs, device=device)  # [B]
    rows = first_row[:, None] + torch.minimum(pos, num_draft[:, None])  # [B, K + 1]
    is_draft = pos[:max_k] < num_draft[:, None]  # [B, K]
    # Draft indices, padding clamped into range (its values are masked by is_draft).
    draft_idx = (start[:, None] + pos[:max_k]).clamp(max=max(num_drafts - 1, 0))  # [B, K]
    if num_drafts > 0:
        drafts = torch.where(is_draft, draft_token_ids[draft_idx], 0)  # [B, K]
    else:
        drafts = torch.zeros(num_reqs, max_k, dtype=torch.int64, device=device)
    argmax_rows = target_argmax[rows]  # [B, K + 1]

    # Greedy: accept the prefix of drafts that equal the target's argmax.
    greedy_match = is_draft & (drafts == argmax_rows[:, :max_k])  # [B, K]
    num_accepted = greedy_match.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]
    final_token = argmax_rows.gather(1, num_accepted[:, None]).squeeze(1)  # [B]

    if target_probs is not None and exp_noise is not None:
        sampled, num_accepted_random = _sample_random_ref(
            drafts, draft_idx, is_draft, num_draft, rows, draft_probs, target_probs,
            uniform, exp_noise,
        )  # fmt: skip
        num_accepted = torch.where(is_greedy, num_accepted, num_accepted_random)
        final_token = torch.where(is_greedy, final_token, sampled)

    tokens = torch.cat([drafts, final_token[:, None]], dim=1)  # [B, K + 1]
    final = final_token[:, None].expand(-1, max_k + 1)  # [B, K + 1]
    n = num_accepted[:, None]  # [B, 1]
    output_token_ids = torch.where(pos < n, tokens, torch.where(pos == n, final, -1))
    return output_token_ids, num_accepted.to(torch.int32)


def _sample_random_ref(
    drafts: torch.Tensor,  # [B, K] int64, padding 0
    draft_idx: torch.Tensor,  # [B, K] int64, clamped into [0, D)
    is_draft: torch.Tensor,  # [B, K] bool
    num_draft: torch.Tensor,  # [B] int64
    rows: torch.Tensor,  # [B, K + 1] int64 target rows
    draft_probs: torch.Tensor | None,  # [D, V] float32
    target_probs: torch.Tensor,  # [D + B, V] float32
    uniform: torch.Tensor,  # [D] float32
    exp_noise: torch.Tensor,  # [B, V] float32
) -> tuple[torch.Tensor, torch.Tensor]:  # (final token [B] int64, num_accepted [B] int64)
    """The random requests' verification, computed for every row (greedy rows' results
    are discarded by the caller)."""
    num_reqs, max_k = drafts.shape
    vocab_size = target_probs.shape[1]
    if max_k > 0 and uniform.shape[0] > 0:
        p_draft = target_probs[rows[:, :max_k], drafts]  # [B, K]: p(x_j)
        u = uniform[draft_idx]  # [B, K]
        if draft_probs is not None:
            accepted = is_draft & (u * draft_probs[draft_idx, drafts] < p_draft)
        else:
            accepted = is_draft & (u < p_draft)
        num_accepted = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]
    else:
        num_accepted = torch.zeros(num_reqs, dtype=torch.int64, device=drafts.device)

    p = target_probs[rows.gather(1, num_accepted[:, None]).squeeze(1)]  # [B, V]
    w = p
    if max_k > 0 and uniform.shape[0] > 0:
        rejected = (num_accepted < num_draft)[:, None]  # [B, 1]
        rejected_pos = num_accepted.clamp(max=max_k - 1)[:, None]  # [B, 1]
        if draft_probs is not None:
            q = draft_probs[draft_idx.gather(1, rejected_pos).squeeze(1)]  # [B, V]
            w = torch.where(rejected, (p - q).clamp(min=0), p)
        else:
            rejected_token = drafts.gather(1, rejected_pos)  # [B, 1]
            vocab = torch.arange(vocab_size, device=p.device)  # [V]
            w = torch.where(rejected & (vocab == rejected_token), 0.0, p)
    w_score = w / exp_noise  # [B, V]
    p_score = p / exp_noise  # [B, V]
    # An all-zero residual (p == q up to rounding): sample from p instead.
    token = torch.where(w_score.amax(dim=1) > 0, w_score.argmax(dim=1), p_score.argmax(dim=1))
    return token, num_accepted


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [D] int64: the drafts of all B requests, concatenated
    cu_num_draft: torch.Tensor,  # [B + 1] int32 / int64 on the device
    draft_probs: torch.Tensor | None,  # [D, V] float32; None: point-mass drafts
    target_probs: torch.Tensor | None,  # [D + B, V] float32; None: every request greedy
    target_argmax: torch.Tensor,  # [D + B] int64
    is_greedy: torch.Tensor,  # [B] bool
    uniform: torch.Tensor,  # [D] float32 in [0, 1): one per draft
    exp_noise: torch.Tensor | None,  # [B, V] float32 ~ Exp(1); None: every request greedy
    max_spec_len: int,  # >= every k_i
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify the drafts of ``B`` requests and sample one more token for each.

    Request ``i`` owns drafts ``cu_num_draft[i]:cu_num_draft[i + 1]`` (``k_i``, may be 0)
    and target rows ``cu_num_draft[i] + i .. cu_num_draft[i + 1] + i`` (``k_i + 1``;
    greedy requests' rows of ``target_probs`` are never read). Returns
    ``(output_token_ids [B, max_spec_len + 1] int64, num_accepted [B] int32)``: request
    ``i``'s tokens are ``output_token_ids[i, :num_accepted[i] + 1]``, the rest is -1.

    The Triton kernel runs on CUDA tensors, the plain-torch reference elsewhere; both
    give the same tokens.
    """
    num_reqs = cu_num_draft.shape[0] - 1
    assert is_greedy.shape == (num_reqs,)
    assert target_argmax.shape == (draft_token_ids.shape[0] + num_reqs,)
    assert uniform.shape == draft_token_ids.shape
    if draft_token_ids.is_cuda:
        return rejection_sample_triton(
            draft_token_ids, cu_num_draft, draft_probs, target_probs, target_argmax,
            is_greedy, uniform, exp_noise, max_spec_len,
        )  # fmt: skip
    return rejection_sample_ref(
        draft_token_ids, cu_num_draft, draft_probs, target_probs, target_argmax,
        is_greedy, uniform, exp_noise, max_spec_len,
    )  # fmt: skip


def rejection_noise(
    cu_num_draft_host: np.ndarray,  # [B + 1] int
    vocab_size: int,
    generators: dict[int, torch.Generator],  # request index -> its generator (seeded)
    any_random: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (uniform [D] float32, exp_noise [B, V])
    """The randomness of one ``rejection_sample`` call: ``uniform`` ([D], in [0, 1), one
    per draft) and ``exp_noise`` ([B, V] float32 ~ Exp(1), one row per request; None when
    no request samples randomly). A request with a generator draws its own
    ``uniform[cu[i]:cu[i + 1]]`` and then its ``exp_noise[i]`` from it, so its tokens do
    not depend on what else is in the batch. ``uniform`` is returned even for an all-greedy
    batch (the kernel takes one; it is never read there)."""
    num_reqs = len(cu_num_draft_host) - 1
    num_drafts = int(cu_num_draft_host[-1])
    uniform = torch.empty(num_drafts, dtype=torch.float32, device=device)
    exp_noise = None
    if not any_random:
        return uniform.uniform_(), None
    exp_noise = torch.empty(num_reqs, vocab_size, dtype=torch.float32, device=device)
    if len(generators) < num_reqs:
        uniform.uniform_()
        exp_noise.exponential_()
    for req, generator in generators.items():
        start, end = int(cu_num_draft_host[req]), int(cu_num_draft_host[req + 1])
        uniform[start:end].uniform_(generator=generator)
        exp_noise[req].exponential_(generator=generator)
    return uniform, exp_noise


__all__ = [
    "rejection_noise",
    "rejection_sample",
    "rejection_sample_ref",
    "rejection_sample_triton",
]
