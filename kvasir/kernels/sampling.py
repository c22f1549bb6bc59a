"""Token sampling on the GPU with no host synchronisation (vLLM v1 semantics).

Per row, in order: repetition / frequency / presence penalties -> temperature ->
min-p -> top-k -> top-p (over the top-k survivors, renormalised) -> sample. Rows with
``temperature < 1e-5`` are greedy: the argmax of the penalised logits (first index on
ties, like ``torch.argmax``), ignoring the filters.

Two kernels:
  1. ``_penalties_kernel`` (grid: rows x vocab tiles) writes the penalised,
     temperature-scaled logits to a float32 scratch row.
  2. ``_sample_kernel`` (one program per row) finds the max, then the exact top-k and
     top-p thresholds by a multi-pivot search over a monotone int32 key of the float
     (each pass counts, for 16 pivots at once, the tokens / probability mass at or above
     the pivot, and shrinks the key interval 17-fold, so a search ends in at most 8
     passes), then samples by the Gumbel-max trick: ``argmax(x_i - log(-log(u_i)))``
     over the kept tokens, which needs neither a normalisation nor a cumulative sum.

Randomness: ``u_i`` is Philox-4x32 keyed by the row's 64-bit ``seed`` with counter
``(token index, offset lo, offset hi, 0)``, so a row's draw depends only on its own
(seed, offset, logits), never on its position in the batch. For a seeded request pass
its seed and e.g. its number of generated tokens as the offset; for unseeded rows pass
fresh random seeds each step (``torch.randint`` on the device: no sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GREEDY_EPS = 1e-5  # temperature below this means greedy (SamplingParams.is_greedy)
_NUM_PIVOTS = 16


@triton.jit
def _penalties_kernel(
    logits_ptr,  # [num_rows, vocab]
    out_ptr,  # [num_rows, vocab] float32
    counts_ptr,  # [num_rows, vocab] int32: output-token counts (HAS_PENALTIES)
    prompt_mask_ptr,  # [num_rows, vocab] bool: token is in the prompt (HAS_PROMPT_MASK)
    temperature_ptr,  # [num_rows] float32
    repetition_ptr,  # [num_rows] float32
    frequency_ptr,  # [num_rows] float32
    presence_ptr,  # [num_rows] float32
    vocab_size,
    stride_l,
    stride_c,
    stride_p,
    HAS_PENALTIES: tl.constexpr,
    HAS_PROMPT_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab_size
    x = tl.load(logits_ptr + row * stride_l + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PENALTIES:
        counts = tl.load(counts_ptr + row * stride_c + offs, mask=mask, other=0)
        in_output = counts > 0
        seen = in_output
        if HAS_PROMPT_MASK:
            in_prompt = tl.load(prompt_mask_ptr + row * stride_p + offs, mask=mask, other=0)
            seen = seen | (in_prompt != 0)
        rep = tl.load(repetition_ptr + row)
        # IEEE division (Triton's `/` is approximate): thresholds match torch bit for bit.
        x = tl.where(seen, tl.where(x > 0.0, tl.math.div_rn(x, tl.zeros_like(x) + rep), x * rep), x)
        x = x - tl.load(frequency_ptr + row) * counts.to(tl.float32)
        x = x - tl.load(presence_ptr + row) * in_output.to(tl.float32)
    temp = tl.load(temperature_ptr + row)
    temp = tl.where(temp < 1e-5, 1.0, temp)  # greedy rows keep their logits' scale
    x = tl.math.div_rn(x, tl.zeros_like(x) + temp)
    tl.store(out_ptr + row * vocab_size + offs, x, mask=mask)


@triton.jit
def _key(x):
    """float32 -> int32 with the same order (negative floats: flip the magnitude bits)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _load_filtered(row_ptr, offs, vocab_size, min_logit):
    # Min-p runs first (vLLM v1): tokens under it become -inf for every later filter.
    x = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf"))
    return tl.where(x >= min_logit, x, float("-inf"))


@triton.jit
def _sample_kernel(
    x_ptr,  # [num_rows, vocab] float32, penalised and temperature-scaled
    out_ptr,  # [num_rows] int64: sampled token ids
    temperature_ptr,  # [num_rows] float32
    top_k_ptr,  # [num_rows] int32 (USE_TOP_K)
    top_p_ptr,  # [num_rows] float32 (USE_TOP_P)
    min_p_ptr,  # [num_rows] float32 (USE_MIN_P)
    seeds_ptr,  # [num_rows] int64
    offsets_ptr,  # [num_rows] int64
    threshold_ptr,  # [num_rows] float32 (WRITE_THRESHOLD): kept iff x >= threshold
    vocab_size,
    WRITE_THRESHOLD: tl.constexpr,
    USE_TOP_K: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * vocab_size
    lanes = tl.arange(0, BLOCK)

    # -- pass 1: max and its first index ---------------------------------------------
    best = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    best_idx = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    for v0 in range(0, vocab_size, BLOCK):
        x = tl.load(row_ptr + v0 + lanes, mask=v0 + lanes < vocab_size, other=float("-inf"))
        tile_max = tl.max(x, axis=0)
        tile_idx = tl.argmax(x, axis=0) + v0
        best_idx = tl.where(tile_max > best, tile_idx, best_idx)
        best = tl.maximum(best, tile_max)

    temp = tl.load(temperature_ptr + row)
    # Greedy rows skip everything below: their loops run zero times.
    n_vocab = tl.where(temp < 1e-5, 0, vocab_size)
    min_logit = float("-inf")
    if USE_MIN_P:
        # p_i >= min_p * p_max  <=>  x_i >= max + log(min_p); min_p = 0 gives -inf.
        min_logit = best + tl.log(tl.load(min_p_ptr + row))
    key_max = _key(best)
    piv_j = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
    # Keep keys >= thresh; start with everything (the key of -inf).
    thresh = tl.max(_key(tl.full([1], float("-inf"), tl.float32)), axis=0)

    # -- top-k: the largest key c with #{key >= c} >= k -------------------------------
    if USE_TOP_K:
        k = tl.load(top_k_ptr + row)
        lo = thresh  # #{key >= lo} = vocab >= k
        hi = key_max + 1  # #{key >= hi} = 0 < k
        hi = tl.where((k > 0) & (k < vocab_size) & (n_vocab > 0), hi, lo + 1)
        # int64: the key span can exceed 2^31.
        while hi.to(tl.int64) - lo.to(tl.int64) > 1:
            span = hi.to(tl.int64) - lo.to(tl.int64)
            pivots = (lo.to(tl.int64) + span * piv_j // (NUM_PIVOTS + 1)).to(tl.int32)
            counts = tl.zeros([BLOCK, NUM_PIVOTS], tl.int32)
            for v0 in range(0, vocab_size, BLOCK):
                x = _load_filtered(row_ptr, v0 + lanes, vocab_size, min_logit)
                valid = (v0 + lanes) < vocab_size
                ge = (_key(x)[:, None] >= pivots[None, :]) & valid[:, None]
                counts += ge.to(tl.int32)
            ok = tl.sum(counts, axis=0) >= k  # [NUM_PIVOTS], True then False
            lo = tl.max(tl.where(ok, pivots, lo), axis=0)
            hi = tl.min(tl.where(ok, hi, pivots), axis=0)
        thresh = lo

    # -- top-p: keep token i iff the mass strictly above it is < p * (top-k mass) ------
    if USE_TOP_P:
        p = tl.load(top_p_ptr + row)
        n_p = tl.where(p < 1.0, n_vocab, 0)
        z_acc = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, n_p, BLOCK):
            x = _load_filtered(row_ptr, v0 + lanes, vocab_size, min_logit)
            z_acc += tl.where(_key(x) >= thresh, tl.exp(x - best), 0.0)
        target = p * tl.sum(z_acc, axis=0)
        lo = thresh  # mass(key >= lo) = Z >= target
        hi = tl.where(n_p > 0, key_max + 1, lo + 1)  # mass(key >= hi) = 0 < target
        # int64: the key span can exceed 2^31.
        while hi.to(tl.int64) - lo.to(tl.int64) > 1:
            span = hi.to(tl.int64) - lo.to(tl.int64)
            pivots = (lo.to(tl.int64) + span * piv_j // (NUM_PIVOTS + 1)).to(tl.int32)
            mass = tl.zeros([BLOCK, NUM_PIVOTS], tl.float32)
            for v0 in range(0, vocab_size, BLOCK):
                x = _load_filtered(row_ptr, v0 + lanes, vocab_size, min_logit)
                ge = _key(x)[:, None] >= pivots[None, :]
                mass += tl.where(ge, tl.exp(x - best)[:, None], 0.0)
            ok = tl.sum(mass, axis=0) >= target
            lo = tl.max(tl.where(ok, pivots, lo), axis=0)
            hi = tl.min(tl.where(ok, hi, pivots), axis=0)
        # Token i is kept iff mass(key > key_i) < target iff key_i + 1 >= hi = lo + 1.
        thresh = lo

    if WRITE_THRESHOLD:
        # _key is its own inverse on int32.
        t = _key(thresh + tl.zeros([1], tl.int32)).to(tl.float32, bitcast=True)
        tl.store(threshold_ptr + row + tl.arange(0, 1), tl.maximum(t, min_logit))

    # -- sample: Gumbel-max over the kept tokens -------------------------------------
    seed = tl.load(seeds_ptr + row)
    offset = tl.load(offsets_ptr + row)
    zeros_u = tl.zeros([BLOCK], tl.uint32)
    off_lo = zeros_u + (offset & 0xFFFFFFFF).to(tl.uint32)
    off_hi = zeros_u + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    best_score = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    choice = best_idx  # fallback (and the greedy answer)
    for v0 in range(0, n_vocab, BLOCK):
        offs = v0 + lanes
        x = _load_filtered(row_ptr, offs, vocab_size, min_logit)
        kept = (_key(x) >= thresh) & (x > float("-inf"))
        r0, _, _, _ = tl.philox(seed, offs.to(tl.uint32), off_lo, off_hi, zeros_u)
        u = tl.uint_to_uniform_float(r0)
        score = tl.where(kept, x - tl.log(-tl.log(u)), float("-inf"))
        tile_max = tl.max(score, axis=0)
        tile_idx = tl.argmax(score, axis=0) + v0
        choice = tl.where(tile_max > best_score, tile_idx, choice)
        best_score = tl.maximum(best_score, tile_max)
    tl.store(out_ptr + row, choice.to(tl.int64))


def apply_penalties_and_temperature(
    logits: torch.Tensor,  # [num_rows, vocab] float32/bf16/fp16
    temperature: torch.Tensor,  # [num_rows] float32; < 1e-5 = greedy (left unscaled)
    output_token_counts: torch.Tensor | None = None,  # [num_rows, vocab] int32
    prompt_token_mask: torch.Tensor | None = None,  # [num_rows, vocab] bool
    repetition_penalty: torch.Tensor | None = None,  # [num_rows] float32; 1 = off
    frequency_penalty: torch.Tensor | None = None,  # [num_rows] float32; 0 = off
    presence_penalty: torch.Tensor | None = None,  # [num_rows] float32; 0 = off
) -> torch.Tensor:  # [num_rows, vocab] float32
    """Penalised, temperature-scaled logits (vLLM order: repetition on prompt-or-output
    tokens, then frequency and presence on output tokens, then ``/ temperature``).
    Penalties apply only when ``output_token_counts`` is given."""
    num_rows, vocab_size = logits.shape
    out = torch.empty((num_rows, vocab_size), dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return out
    assert logits.stride(1) == 1
    has_penalties = output_token_counts is not None
    if has_penalties:
        ones = torch.ones(num_rows, dtype=torch.float32, device=logits.device)
        zeros = torch.zeros_like(ones)
        repetition_penalty = ones if repetition_penalty is None else repetition_penalty
        frequency_penalty = zeros if frequency_penalty is None else frequency_penalty
        presence_penalty = zeros if presence_penalty is None else presence_penalty
    counts = output_token_counts if has_penalties else logits
    prompt = prompt_token_mask if prompt_token_mask is not None else logits
    block = min(2048, triton.next_power_of_2(vocab_size))
    _penalties_kernel[(num_rows, triton.cdiv(vocab_size, block))](
        logits,
        out,
        counts,
        prompt,
        temperature,
        repetition_penalty if has_penalties else temperature,
        frequency_penalty if has_penalties else temperature,
        presence_penalty if has_penalties else temperature,
        vocab_size,
        logits.stride(0),
        counts.stride(0),
        prompt.stride(0),
        HAS_PENALTIES=has_penalties,
        HAS_PROMPT_MASK=has_penalties and prompt_token_mask is not None,
        BLOCK=block,
        num_warps=4,
    )
    return out


def sample(
    logits: torch.Tensor,  # [num_rows, vocab] float32/bf16/fp16
    temperature: torch.Tensor,  # [num_rows] float32; < 1e-5 = greedy
    seeds: torch.Tensor,  # [num_rows] int64: Philox key per row
    offsets: torch.Tensor,  # [num_rows] int64: Philox counter offset per row (e.g. step)
    top_k: torch.Tensor | None = None,  # [num_rows] int32; <= 0 or >= vocab = off
    top_p: torch.Tensor | None = None,  # [num_rows] float32 in (0, 1]; 1 = off
    min_p: torch.Tensor | None = None,  # [num_rows] float32 in [0, 1]; 0 = off
    output_token_counts: torch.Tensor | None = None,  # [num_rows, vocab] int32
    prompt_token_mask: torch.Tensor | None = None,  # [num_rows, vocab] bool
    repetition_penalty: torch.Tensor | None = None,  # [num_rows] float32
    frequency_penalty: torch.Tensor | None = None,  # [num_rows] float32
    presence_penalty: torch.Tensor | None = None,  # [num_rows] float32
    kept_threshold: torch.Tensor | None = None,  # [num_rows] float32, written if given
) -> torch.Tensor:  # [num_rows] int64 token ids
    """Sample one token per row; all inputs are device tensors and nothing syncs. A
    filter passed as ``None`` is compiled out (no per-row cost).

    ``kept_threshold`` (diagnostics and tests) receives, for non-greedy rows, the value
    at or above which a penalised, temperature-scaled logit survived min-p/top-k/top-p."""
    x = apply_penalties_and_temperature(
        logits,
        temperature,
        output_token_counts,
        prompt_token_mask,
        repetition_penalty,
        frequency_penalty,
        presence_penalty,
    )
    num_rows, vocab_size = x.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    block = 1024 if logits.device.type == "cuda" else min(1024, triton.next_power_of_2(vocab_size))
    _sample_kernel[(num_rows,)](
        x,
        out,
        temperature,
        top_k if top_k is not None else temperature,
        top_p if top_p is not None else temperature,
        min_p if min_p is not None else temperature,
        seeds,
        offsets,
        kept_threshold if kept_threshold is not None else temperature,
        vocab_size,
        WRITE_THRESHOLD=kept_threshold is not None,
        USE_TOP_K=top_k is not None,
        USE_TOP_P=top_p is not None,
        USE_MIN_P=min_p is not None,
        BLOCK=block,
        NUM_PIVOTS=_NUM_PIVOTS,
        num_warps=8,
    )
    return out


def output_token_counts_from_ids(
    token_ids: torch.Tensor,  # [num_rows, max_len] int64, padded with any id < 0
    vocab_size: int,
) -> torch.Tensor:  # [num_rows, vocab] int32
    """Dense per-row bin count of output token ids, on the ids' device (no sync)."""
    num_rows = token_ids.shape[0]
    valid = token_ids >= 0
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.int32, device=token_ids.device)
    # Padding goes to an extra last bin that is then dropped.
    idx = torch.where(valid, token_ids, vocab_size)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.int32))
    return counts[:, :vocab_size].contiguous()


# --------------------------------------------------------------------------------------
# Plain-torch reference
# --------------------------------------------------------------------------------------


def apply_penalties_and_temperature_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    output_token_counts: torch.Tensor | None = None,
    prompt_token_mask: torch.Tensor | None = None,
    repetition_penalty: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_rows, vocab] float32
    """vLLM's ``apply_penalties`` then ``apply_temperature``, in float32."""
    x = logits.float().clone()
    if output_token_counts is not None:
        n = x.shape[0]
        ones = torch.ones(n, device=x.device)
        rep = (ones if repetition_penalty is None else repetition_penalty)[:, None]
        freq = (0 * ones if frequency_penalty is None else frequency_penalty)[:, None]
        pres = (0 * ones if presence_penalty is None else presence_penalty)[:, None]
        in_output = output_token_counts > 0
        seen = in_output if prompt_token_mask is None else in_output | prompt_token_mask
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - freq * output_token_counts.float()
        x = x - pres * in_output.float()
    temp = torch.where(temperature < GREEDY_EPS, torch.ones_like(temperature), temperature)
    return x / temp[:, None]


def sampling_probs_ref(
    logits: torch.Tensor,  # [num_rows, vocab]
    temperature: torch.Tensor,  # [num_rows]
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    **penalties: torch.Tensor | None,
) -> torch.Tensor:  # [num_rows, vocab] float64: the distribution each row samples from
    """Float64 reference distribution, vLLM v1's sort-based top-k/top-p; greedy rows
    are one-hot at the (first) argmax."""
    x = apply_penalties_and_temperature_ref(logits, temperature, **penalties).double().cpu()
    num_rows, vocab = x.shape
    probs = torch.zeros_like(x)
    for r in range(num_rows):
        row = x[r].clone()
        if float(temperature[r]) < GREEDY_EPS:
            probs[r, int(torch.argmax(row))] = 1.0
            continue
        if min_p is not None and float(min_p[r]) > 0:
            p = torch.softmax(row, -1)
            row[p < float(min_p[r]) * p.max()] = float("-inf")
        if top_k is not None and 0 < int(top_k[r]) < vocab:
            kth = torch.sort(row, descending=True).values[int(top_k[r]) - 1]
            row[row < kth] = float("-inf")
        if top_p is not None and float(top_p[r]) < 1.0:
            sorted_x, order = torch.sort(row)  # ascending, as vLLM
            cum = torch.softmax(sorted_x, -1).cumsum(-1)
            drop = cum <= 1 - float(top_p[r])
            drop[-1] = False
            row[order[drop]] = float("-inf")
        probs[r] = torch.softmax(row, -1)
    return probs


__all__ = [
    "GREEDY_EPS",
    "apply_penalties_and_temperature",
    "apply_penalties_and_temperature_ref",
    "output_token_counts_from_ids",
    "sample",
    "sampling_probs_ref",
]
