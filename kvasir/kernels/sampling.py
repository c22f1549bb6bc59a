"""Token sampling on the GPU with no host synchronisation (vLLM v1 semantics).

Per row, in order: repetition / frequency / presence penalties -> temperature ->
min-p -> top-k -> top-p (over the top-k survivors, renormalised) -> sample. Rows with
``temperature < 1e-5`` are greedy: the argmax of the penalised logits (first index on
ties, like ``torch.argmax``), ignoring the filters.

Every row is spread over vocabulary tiles, so even one row fills the GPU, and the
number of launches is fixed by which filters are on (never by the data):
  1. prepare (rows x tiles): penalties and temperature into a float32 scratch row, plus
     each tile's max and first argmax (the row max, for greedy rows and min-p).
  2. only with top-k / top-p: an exact threshold search over a monotone int32 key of the
     float. Each round, a (rows x tiles) kernel counts the tokens (top-k) or the
     probability mass (top-p) at or above 16 pivots of the row's open key interval and a
     (rows,) kernel shrinks the interval 17-fold; 8 rounds close any interval of 2^32
     keys. Converged or inactive rows return at once.
  3. sample (rows x tiles): Gumbel-max, ``argmax(x_i - log(-log(u_i)))`` over the kept
     tokens, needing neither a normalisation nor a cumulative sum; then (rows,) picks the
     best tile.

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
_SEARCH_ROUNDS = 8  # 17**8 > 2**32: any key interval closes within 8 rounds
_KEY_NEG_INF = -2139095041  # _key(-inf)


@triton.jit
def _key(x):
    """float32 -> int32 with the same order (negative floats: flip the magnitude bits);
    its own inverse on int32."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _row_max(tile_max_ptr, row, num_tiles, TILES_PAD: tl.constexpr):
    t = tl.arange(0, TILES_PAD)
    tm = tl.load(tile_max_ptr + row * num_tiles + t, mask=t < num_tiles, other=float("-inf"))
    return tl.max(tm, axis=0)


@triton.jit
def _min_logit(tile_max_ptr, min_p_ptr, row, num_tiles, USE_MIN_P: tl.constexpr,
               TILES_PAD: tl.constexpr):  # fmt: skip
    # p_i >= min_p * p_max  <=>  x_i >= max + log(min_p); min_p = 0 gives -inf.
    m = _row_max(tile_max_ptr, row, num_tiles, TILES_PAD)
    if USE_MIN_P:
        return m, m + tl.log(tl.load(min_p_ptr + row))
    return m, tl.max(tl.full([1], float("-inf"), tl.float32), axis=0)


@triton.jit
def _pivots(lo, hi, NUM_PIVOTS: tl.constexpr):
    # NUM_PIVOTS points splitting (lo, hi) into NUM_PIVOTS + 1 near-equal parts; int64
    # since the span can exceed 2^31.
    j = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
    span = hi.to(tl.int64) - lo.to(tl.int64)
    return (lo.to(tl.int64) + span * j // (NUM_PIVOTS + 1)).to(tl.int32)


@triton.jit
def _prepare_kernel(
    logits_ptr,  # [num_rows, vocab]
    x_ptr,  # [num_rows, vocab] float32 out: penalised, temperature-scaled
    tile_max_ptr,  # [num_rows, num_tiles] float32 out
    tile_arg_ptr,  # [num_rows, num_tiles] int32 out: first argmax of the tile
    counts_ptr,  # [num_rows, vocab] int32: output-token counts (HAS_PENALTIES)
    prompt_mask_ptr,  # [num_rows, vocab] bool: token is in the prompt (HAS_PROMPT_MASK)
    temperature_ptr,  # [num_rows] float32
    repetition_ptr,  # [num_rows] float32
    frequency_ptr,  # [num_rows] float32
    presence_ptr,  # [num_rows] float32
    vocab_size,
    num_tiles,
    stride_l,
    stride_c,
    stride_p,
    HAS_PENALTIES: tl.constexpr,
    HAS_PROMPT_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
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
    tl.store(x_ptr + row * vocab_size + offs, x, mask=mask)
    x = tl.where(mask, x, float("-inf"))
    tl.store(tile_max_ptr + row * num_tiles + tile, tl.max(x, axis=0))
    tl.store(tile_arg_ptr + row * num_tiles + tile, tl.argmax(x, axis=0) + tile * BLOCK)


@triton.jit
def _search_init_kernel(
    tile_max_ptr,  # [num_rows, num_tiles] float32
    temperature_ptr,  # [num_rows] float32
    param_ptr,  # [num_rows]: top_k int32 (IS_TOP_K) or top_p float32
    lo_ptr,  # [num_rows] int32 in/out: keep keys >= lo
    hi_ptr,  # [num_rows] int32 out: open bound; hi <= lo + 1 means done
    target_ptr,  # [num_rows] float32 out (top-k: k; top-p: set by the first update)
    vocab_size,
    num_tiles,
    IS_TOP_K: tl.constexpr,
    FRESH: tl.constexpr,  # start from "keep everything" (else continue from lo)
    TILES_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m = _row_max(tile_max_ptr, row, num_tiles, TILES_PAD)
    active = tl.load(temperature_ptr + row) >= 1e-5
    if IS_TOP_K:
        k = tl.load(param_ptr + row)
        active = active & (k > 0) & (k < vocab_size)
        tl.store(target_ptr + row, k.to(tl.float32))
    else:
        active = active & (tl.load(param_ptr + row) < 1.0)
    if FRESH:
        lo = tl.max(_key(tl.full([1], float("-inf"), tl.float32)), axis=0)
    else:
        lo = tl.load(lo_ptr + row)
    # Invariants: measure(lo) >= target (lo keeps everything kept so far) and
    # measure(hi) < target (nothing lies above the row max).
    hi = tl.where(active, _key(m) + 1, lo + 1)
    tl.store(lo_ptr + row, lo)
    tl.store(hi_ptr + row, hi)


@triton.jit
def _search_count_kernel(
    x_ptr,  # [num_rows, vocab] float32
    tile_max_ptr,  # [num_rows, num_tiles] float32
    min_p_ptr,  # [num_rows] float32 (USE_MIN_P)
    lo_ptr,  # [num_rows] int32
    hi_ptr,  # [num_rows] int32
    partial_ptr,  # [num_rows, num_tiles, NUM_PIVOTS] float32 out
    partial_z_ptr,  # [num_rows, num_tiles] float32 out (MASS): mass at or above lo
    vocab_size,
    num_tiles,
    MASS: tl.constexpr,  # top-p: probability mass (unnormalised); top-k: token count
    USE_MIN_P: tl.constexpr,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,  # BLOCK is walked in SUB-sized pieces to bound registers
    NUM_PIVOTS: tl.constexpr,
    TILES_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    lo = tl.load(lo_ptr + row)
    hi = tl.load(hi_ptr + row)
    if hi.to(tl.int64) - lo.to(tl.int64) > 1:
        m, min_logit = _min_logit(tile_max_ptr, min_p_ptr, row, num_tiles, USE_MIN_P, TILES_PAD)
        pivots = _pivots(lo, hi, NUM_PIVOTS)
        acc = tl.zeros([NUM_PIVOTS], tl.float32)
        z = tl.sum(tl.zeros([SUB], tl.float32), axis=0)
        for c in tl.static_range(BLOCK // SUB):
            offs = tile * BLOCK + c * SUB + tl.arange(0, SUB)
            valid = offs < vocab_size
            x = tl.load(x_ptr + row * vocab_size + offs, mask=valid, other=float("-inf"))
            # Min-p runs first (vLLM v1): tokens under it are -inf for every later filter.
            x = tl.where(x >= min_logit, x, float("-inf"))
            ge = _key(x)[:, None] >= pivots[None, :]  # [SUB, NUM_PIVOTS]
            if MASS:
                w = tl.exp(x - m)  # 0 for -inf
                acc += tl.sum(tl.where(ge, w[:, None], 0.0), axis=0)
                z += tl.sum(tl.where(_key(x) >= lo, w, 0.0), axis=0)
            else:
                acc += tl.sum((ge & valid[:, None]).to(tl.float32), axis=0)
        base = row * num_tiles + tile
        tl.store(partial_ptr + base * NUM_PIVOTS + tl.arange(0, NUM_PIVOTS), acc)
        if MASS:
            tl.store(partial_z_ptr + base, z)


@triton.jit
def _search_update_kernel(
    partial_ptr,  # [num_rows, num_tiles, NUM_PIVOTS] float32
    partial_z_ptr,  # [num_rows, num_tiles] float32
    top_p_ptr,  # [num_rows] float32 (FIRST_MASS_ROUND)
    lo_ptr,  # [num_rows] int32 in/out
    hi_ptr,  # [num_rows] int32 in/out
    target_ptr,  # [num_rows] float32 in (out on FIRST_MASS_ROUND)
    num_tiles,
    FIRST_MASS_ROUND: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    TILES_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lo = tl.load(lo_ptr + row)
    hi = tl.load(hi_ptr + row)
    if hi.to(tl.int64) - lo.to(tl.int64) > 1:
        t = tl.arange(0, TILES_PAD)
        j = tl.arange(0, NUM_PIVOTS)
        part = tl.load(
            partial_ptr + (row * num_tiles + t[:, None]) * NUM_PIVOTS + j[None, :],
            mask=t[:, None] < num_tiles,
            other=0.0,
        )
        measure = tl.sum(part, axis=0)  # [NUM_PIVOTS], non-increasing
        if FIRST_MASS_ROUND:
            # Top-p keeps token i iff the mass strictly above it is < p * (top-k mass).
            z = tl.load(partial_z_ptr + row * num_tiles + t, mask=t < num_tiles, other=0.0)
            target = tl.load(top_p_ptr + row) * tl.sum(z, axis=0)
            tl.store(target_ptr + row, target)
        else:
            target = tl.load(target_ptr + row)
        pivots = _pivots(lo, hi, NUM_PIVOTS)
        ok = measure >= target
        tl.store(lo_ptr + row, tl.max(tl.where(ok, pivots, lo), axis=0))
        tl.store(hi_ptr + row, tl.min(tl.where(ok, hi, pivots), axis=0))


@triton.jit
def _gumbel_kernel(
    x_ptr,  # [num_rows, vocab] float32
    tile_max_ptr,  # [num_rows, num_tiles] float32
    temperature_ptr,  # [num_rows] float32
    min_p_ptr,  # [num_rows] float32 (USE_MIN_P)
    lo_ptr,  # [num_rows] int32 (HAS_THRESHOLD): keep keys >= lo
    seeds_ptr,  # [num_rows] int64
    offsets_ptr,  # [num_rows] int64
    best_score_ptr,  # [num_rows, num_tiles] float32 out
    best_idx_ptr,  # [num_rows, num_tiles] int32 out
    vocab_size,
    num_tiles,
    HAS_THRESHOLD: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    if tl.load(temperature_ptr + row) >= 1e-5:  # greedy rows need no draw
        _, min_logit = _min_logit(tile_max_ptr, min_p_ptr, row, num_tiles, USE_MIN_P, TILES_PAD)
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * vocab_size + offs, mask=offs < vocab_size, other=float("-inf"))
        x = tl.where(x >= min_logit, x, float("-inf"))
        kept = x > float("-inf")
        if HAS_THRESHOLD:
            kept = kept & (_key(x) >= tl.load(lo_ptr + row))
        seed = tl.load(seeds_ptr + row)
        offset = tl.load(offsets_ptr + row)
        zeros_u = tl.zeros([BLOCK], tl.uint32)
        off_lo = zeros_u + (offset & 0xFFFFFFFF).to(tl.uint32)
        off_hi = zeros_u + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
        r0, _, _, _ = tl.philox(seed, offs.to(tl.uint32), off_lo, off_hi, zeros_u)
        u = tl.uint_to_uniform_float(r0)
        score = tl.where(kept, x - tl.log(-tl.log(u)), float("-inf"))
        tl.store(best_score_ptr + row * num_tiles + tile, tl.max(score, axis=0))
        tl.store(best_idx_ptr + row * num_tiles + tile, tl.argmax(score, axis=0) + tile * BLOCK)


@triton.jit
def _pick_kernel(
    best_score_ptr,  # [num_rows, num_tiles] float32
    best_idx_ptr,  # [num_rows, num_tiles] int32
    tile_max_ptr,  # [num_rows, num_tiles] float32
    tile_arg_ptr,  # [num_rows, num_tiles] int32
    temperature_ptr,  # [num_rows] float32
    min_p_ptr,  # [num_rows] float32 (USE_MIN_P)
    lo_ptr,  # [num_rows] int32 (HAS_THRESHOLD)
    out_ptr,  # [num_rows] int64 out: token ids
    threshold_ptr,  # [num_rows] float32 out (WRITE_THRESHOLD)
    num_tiles,
    HAS_THRESHOLD: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    WRITE_THRESHOLD: tl.constexpr,
    TILES_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, TILES_PAD)
    t_mask = t < num_tiles
    tm = tl.load(tile_max_ptr + row * num_tiles + t, mask=t_mask, other=float("-inf"))
    # First tile holding the max, then its first index: torch.argmax's tie rule.
    greedy = tl.load(tile_arg_ptr + row * num_tiles + tl.argmax(tm, axis=0))
    token = greedy
    if tl.load(temperature_ptr + row) >= 1e-5:
        bs = tl.load(best_score_ptr + row * num_tiles + t, mask=t_mask, other=float("-inf"))
        drawn = tl.load(best_idx_ptr + row * num_tiles + tl.argmax(bs, axis=0))
        # All scores -inf only if u == 0 hit every kept token: fall back to the max.
        token = tl.where(tl.max(bs, axis=0) > float("-inf"), drawn, greedy)
    tl.store(out_ptr + row, token.to(tl.int64))
    if WRITE_THRESHOLD:
        _, min_logit = _min_logit(tile_max_ptr, min_p_ptr, row, num_tiles, USE_MIN_P, TILES_PAD)
        thresh = tl.full([1], float("-inf"), tl.float32)
        if HAS_THRESHOLD:
            thresh = _key(tl.load(lo_ptr + row) + tl.zeros([1], tl.int32)).to(
                tl.float32, bitcast=True
            )
        tl.store(threshold_ptr + row + tl.arange(0, 1), tl.maximum(thresh, min_logit))


def _default_block(vocab_size: int, device: torch.device) -> int:
    # 1024 keeps one row spread over ~128 programs at a 128k vocabulary.
    return 1024 if device.type == "cuda" else min(1024, triton.next_power_of_2(vocab_size))


def _prepare(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    output_token_counts: torch.Tensor | None,
    prompt_token_mask: torch.Tensor | None,
    repetition_penalty: torch.Tensor | None,
    frequency_penalty: torch.Tensor | None,
    presence_penalty: torch.Tensor | None,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows, vocab_size = logits.shape
    num_tiles = triton.cdiv(vocab_size, block)
    dev = logits.device
    x = torch.empty((num_rows, vocab_size), dtype=torch.float32, device=dev)
    tile_max = torch.empty((num_rows, num_tiles), dtype=torch.float32, device=dev)
    tile_arg = torch.empty((num_rows, num_tiles), dtype=torch.int32, device=dev)
    if num_rows == 0:
        return x, tile_max, tile_arg
    assert logits.stride(1) == 1
    has_penalties = output_token_counts is not None
    if has_penalties:
        ones = torch.ones(num_rows, dtype=torch.float32, device=dev)
        repetition_penalty = ones if repetition_penalty is None else repetition_penalty
        frequency_penalty = ones * 0 if frequency_penalty is None else frequency_penalty
        presence_penalty = ones * 0 if presence_penalty is None else presence_penalty
    counts = output_token_counts if has_penalties else logits
    prompt = prompt_token_mask if prompt_token_mask is not None else logits
    _prepare_kernel[(num_rows, num_tiles)](
        logits,
        x,
        tile_max,
        tile_arg,
        counts,
        prompt,
        temperature,
        repetition_penalty if has_penalties else temperature,
        frequency_penalty if has_penalties else temperature,
        presence_penalty if has_penalties else temperature,
        vocab_size,
        num_tiles,
        logits.stride(0),
        counts.stride(0),
        prompt.stride(0),
        HAS_PENALTIES=has_penalties,
        HAS_PROMPT_MASK=has_penalties and prompt_token_mask is not None,
        BLOCK=block,
        num_warps=4,
    )
    return x, tile_max, tile_arg


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
    block = _default_block(logits.shape[1], logits.device)
    x, _, _ = _prepare(
        logits,
        temperature,
        output_token_counts,
        prompt_token_mask,
        repetition_penalty,
        frequency_penalty,
        presence_penalty,
        block,
    )
    return x


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
    block_v: int | None = None,  # vocabulary tile (power of two); None = default
) -> torch.Tensor:  # [num_rows] int64 token ids
    """Sample one token per row; all inputs are device tensors and nothing syncs. A
    filter passed as ``None`` is compiled out (no per-row cost, no launches).

    ``kept_threshold`` (diagnostics and tests) receives, for non-greedy rows, the value
    at or above which a penalised, temperature-scaled logit survived min-p/top-k/top-p."""
    num_rows, vocab_size = logits.shape
    dev = logits.device
    block = block_v or _default_block(vocab_size, dev)
    x, tile_max, tile_arg = _prepare(
        logits,
        temperature,
        output_token_counts,
        prompt_token_mask,
        repetition_penalty,
        frequency_penalty,
        presence_penalty,
        block,
    )
    out = torch.empty(num_rows, dtype=torch.int64, device=dev)
    if num_rows == 0:
        return out
    num_tiles = tile_max.shape[1]
    tiles_pad = triton.next_power_of_2(num_tiles)
    grid = (num_rows, num_tiles)
    use_min_p = min_p is not None
    min_p_arg = min_p if use_min_p else temperature
    has_threshold = top_k is not None or top_p is not None
    lo = torch.empty(num_rows, dtype=torch.int32, device=dev)
    if has_threshold:
        hi = torch.empty_like(lo)
        target = torch.empty(num_rows, dtype=torch.float32, device=dev)
        partial = torch.empty((num_rows, num_tiles, _NUM_PIVOTS), dtype=torch.float32, device=dev)
        partial_z = torch.empty((num_rows, num_tiles), dtype=torch.float32, device=dev)
        sub = min(256, block)
        for is_top_k, param in ((True, top_k), (False, top_p)):
            if param is None:
                continue
            _search_init_kernel[(num_rows,)](
                tile_max, temperature, param, lo, hi, target, vocab_size, num_tiles,
                IS_TOP_K=is_top_k, FRESH=is_top_k or top_k is None, TILES_PAD=tiles_pad,
            )  # fmt: skip
            for r in range(_SEARCH_ROUNDS):
                _search_count_kernel[grid](
                    x, tile_max, min_p_arg, lo, hi, partial, partial_z, vocab_size, num_tiles,
                    MASS=not is_top_k, USE_MIN_P=use_min_p, BLOCK=block, SUB=sub,
                    NUM_PIVOTS=_NUM_PIVOTS, TILES_PAD=tiles_pad, num_warps=4,
                )  # fmt: skip
                _search_update_kernel[(num_rows,)](
                    partial, partial_z, param, lo, hi, target, num_tiles,
                    FIRST_MASS_ROUND=not is_top_k and r == 0, NUM_PIVOTS=_NUM_PIVOTS,
                    TILES_PAD=tiles_pad, num_warps=4,
                )  # fmt: skip
    best_score = torch.empty((num_rows, num_tiles), dtype=torch.float32, device=dev)
    best_idx = torch.empty((num_rows, num_tiles), dtype=torch.int32, device=dev)
    _gumbel_kernel[grid](
        x, tile_max, temperature, min_p_arg, lo, seeds, offsets, best_score, best_idx,
        vocab_size, num_tiles, HAS_THRESHOLD=has_threshold, USE_MIN_P=use_min_p,
        BLOCK=block, TILES_PAD=tiles_pad, num_warps=4,
    )  # fmt: skip
    _pick_kernel[(num_rows,)](
        best_score, best_idx, tile_max, tile_arg, temperature, min_p_arg, lo, out,
        kept_threshold if kept_threshold is not None else temperature, num_tiles,
        HAS_THRESHOLD=has_threshold, USE_MIN_P=use_min_p,
        WRITE_THRESHOLD=kept_threshold is not None, TILES_PAD=tiles_pad, num_warps=4,
    )  # fmt: skip
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
