"""Token sampling for one step: penalties, temperature, top-k / top-p / min-p, and logprobs.

vLLM v1 semantics: logprobs describe the *raw* model distribution (log_softmax of the
logits before any penalty, temperature or filter). Sampling uses the exponential race
(``argmax(probs / q)`` with ``q ~ Exp(1)``), which needs no cumulative sum and lets a
seeded request draw its noise from its own generator, so its tokens do not depend on
what else is in the batch. Everything is vectorised over the batch; the only per-row
Python work is the seeded rows' noise draw, and nothing waits on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

# Temperatures below this are greedy (SamplingParams.is_greedy uses the same bound).
_GREEDY_EPS = 1e-5


@dataclass
class SamplingMetadata:
    """Per-row sampling settings for one batch of ``B`` rows (one row per sampled token).

    Optional tensors are ``None`` when no row uses the feature, so the common case skips
    the work entirely.
    """

    temperature: torch.Tensor  # [B] float32; 0 for greedy rows
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None  # [B] int64; disabled rows hold vocab_size
    top_p: torch.Tensor | None  # [B] float32; disabled rows hold 1.0
    min_p: torch.Tensor | None  # [B] float32; disabled rows hold 0.0
    generators: dict[int, torch.Generator]  # row -> per-request generator (seeded rows)
    no_penalties: bool
    presence_penalties: torch.Tensor  # [B] float32
    frequency_penalties: torch.Tensor  # [B] float32
    repetition_penalties: torch.Tensor  # [B] float32
    prompt_token_ids: torch.Tensor | None  # [B, max_prompt_len] int64, padded with vocab_size
    output_token_ids: list[list[int]]  # per row, tokens generated so far
    min_tokens_stop_ids: dict[int, list[int]]  # row -> ids forbidden while output < min_tokens
    max_num_logprobs: int | None  # largest `logprobs` in the batch; None: nobody wants them
    # Token masks (logit_bias, allowed_token_ids, bad_words); None: no row uses them.
    token_masks: TokenMasks | None = None
    # bad_words: the last L-1 tokens of each row's output ([B, L-1] int64, right-aligned,
    # -1 where the output is shorter); rebuilt every step (see InputBatch).
    recent_output_ids: torch.Tensor | None = None
    # Structured outputs: [B, ceil(V / 32)] int32, bit set = allowed (-1: unconstrained).
    token_bitmask: torch.Tensor | None = None


class TokenMasks(NamedTuple):
    """Per-token masks of a batch as flat index tensors (built when the batch changes;
    applied in one batched op each). Row indices are sample indices into the batch."""

    bias_rows: torch.Tensor | None  # [N] int64
    bias_token_ids: torch.Tensor | None  # [N] int64
    bias_values: torch.Tensor | None  # [N] float32
    allowed_rows: torch.Tensor | None  # [R] int64: the rows restricted to a whitelist
    allowed_index: torch.Tensor | None  # [2, M] int64: (index into allowed_rows, token id)
    bad_rows: torch.Tensor | None  # [W] int64: the row each bad word belongs to
    bad_prefix: torch.Tensor | None  # [W, L-1] int64, right-aligned, -1 padded
    bad_last: torch.Tensor | None  # [W] int64: the token banned once the prefix is out
    max_bad_prefix: int  # L-1


class LogprobsTensors(NamedTuple):
    """Logprobs of ``N`` positions: column 0 is the sampled (or actual) token, then the
    top-K tokens in descending order."""

    logprob_token_ids: torch.Tensor  # [N, K + 1] int64
    logprobs: torch.Tensor  # [N, K + 1] float32
    selected_token_ranks: torch.Tensor  # [N] int64, rank of column 0 (1 = most likely)


class SamplerOutput(NamedTuple):
    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs_tensors: LogprobsTensors | None


class Sampler(nn.Module):
    """Samples one token per row of ``logits`` ([B, V] float32).

    Order (vLLM v1): raw logprobs -> grammar bitmask (structured outputs) ->
    allowed_token_ids / bad_words / logit_bias -> min_tokens mask -> penalties -> greedy argmax /
    (temperature -> top-k -> top-p -> min-p -> exponential race). Does not modify the
    caller's ``logits``.
    """

    def forward(self, logits: torch.Tensor, sampling_metadata: SamplingMetadata) -> SamplerOutput:
        md = sampling_metadata
        logits = logits.float()  # [B, V]
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]

        if md.token_bitmask is not None:
            from kvasir.structured_output.bitmask import apply_token_bitmask

            logits = apply_token_bitmask(logits, md.token_bitmask)
        if md.token_masks is not None:
            logits = apply_token_masks(logits, md.token_masks, md.recent_output_ids)
        if md.min_tokens_stop_ids:
            logits = apply_min_tokens_mask(logits, md.min_tokens_stop_ids)
        if not md.no_penalties:
            logits = apply_penalties(logits, md)

        sampled = sample(logits, md)  # [B]

        logprobs_tensors = None
        if raw_logprobs is not None:
            assert md.max_num_logprobs is not None
            logprobs_tensors = gather_logprobs(raw_logprobs, sampled, md.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=logprobs_tensors)


def sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Greedy rows take the argmax of ``logits``; random rows go through temperature,
    filters and the exponential race. Returns [B] int64."""
    greedy = None
    if not md.all_random:
        greedy = argmax_rows(logits)  # [B]
        if md.all_greedy:
            return greedy
    probs = compute_probs(logits, md)  # [B, V]
    random = exponential_race(probs, md.generators)  # [B]
    if greedy is None:
        return random
    return torch.where(md.temperature < _GREEDY_EPS, greedy, random)


def compute_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """The distribution random rows sample from: softmax of the filtered, tempered
    logits. Greedy rows are computed with temperature 1 (their result is unused)."""
    # Greedy rows hold temperature 0: divide them by 1 instead to keep the batch finite.
    temperature = torch.where(
        md.temperature < _GREEDY_EPS, torch.ones_like(md.temperature), md.temperature
    )
    logits = logits / temperature.unsqueeze(1)  # [B, V]
    if md.top_k is not None or md.top_p is not None:
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
    if md.min_p is not None:
        logits = apply_min_p(logits, md.min_p)
    return torch.softmax(logits, dim=-1)  # [B, V]


def apply_min_tokens_mask(logits: torch.Tensor, stop_ids: dict[int, list[int]]) -> torch.Tensor:
    """Forbid EOS / stop token ids on rows that have not yet produced min_tokens."""
    rows: list[int] = []
    cols: list[int] = []
    for row, ids in stop_ids.items():
        rows.extend([row] * len(ids))
        cols.extend(ids)
    if not rows:
        return logits
    index = torch.tensor([rows, cols], dtype=torch.int64).to(logits.device, non_blocking=True)
    logits = logits.clone()
    logits[index[0], index[1]] = float("-inf")
    return logits


def apply_token_masks(
    logits: torch.Tensor, masks: TokenMasks, recent_output_ids: torch.Tensor | None
) -> torch.Tensor:
    """Whitelists (allowed_token_ids), then bad words, then logit_bias, each as one
    batched op over the rows that use it. Returns a new tensor."""
    logits = logits.clone()
    neg_inf = float("-inf")
    if masks.allowed_rows is not None:
        assert masks.allowed_index is not None
        keep = torch.zeros(
            len(masks.allowed_rows), logits.shape[1], dtype=torch.bool, device=logits.device
        )  # [R, V]
        keep[masks.allowed_index[0], masks.allowed_index[1]] = True
        sub = logits.index_select(0, masks.allowed_rows).masked_fill_(~keep, neg_inf)
        logits.index_copy_(0, masks.allowed_rows, sub)
    if masks.bad_rows is not None:
        assert masks.bad_prefix is not None and masks.bad_last is not None
        banned = masks.bad_last
        if masks.max_bad_prefix:
            assert recent_output_ids is not None
            recent = recent_output_ids.index_select(0, masks.bad_rows)  # [W, L-1]
            # A word whose prefix is padding there matches anything; a real prefix token
            # must equal the output token at its (right-aligned) position.
            match = (masks.bad_prefix < 0) | (masks.bad_prefix == recent)
            banned = torch.where(match.all(dim=1), banned, logits.shape[1])
        # Unbanned words point at a scratch column past the vocabulary.
        pad = torch.zeros(logits.shape[0], 1, dtype=logits.dtype, device=logits.device)
        wide = torch.cat([logits, pad], dim=1)  # [B, V + 1]
        wide[masks.bad_rows, banned] = neg_inf
        logits = wide[:, :-1]
    if masks.bias_rows is not None:
        assert masks.bias_token_ids is not None and masks.bias_values is not None
        logits.index_put_(
            (masks.bias_rows, masks.bias_token_ids), masks.bias_values, accumulate=True
        )
    return logits


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output tokens), frequency and presence (output tokens only)
    penalties, as in vLLM / the OpenAI API."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    # [B, max_output_len] padded with vocab_size, which lands in a scratch column.
    max_len = max((len(ids) for ids in md.output_token_ids), default=0)
    padded = [ids + [vocab_size] * (max_len - len(ids)) for ids in md.output_token_ids]
    output_ids = torch.tensor(padded, dtype=torch.int64).reshape(num_rows, max_len)
    output_ids = output_ids.to(device, non_blocking=True)
    output_counts = torch.zeros(num_rows, vocab_size + 1, dtype=logits.dtype, device=device)
    output_counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    output_counts = output_counts[:, :vocab_size]  # [B, V]
    output_mask = output_counts > 0  # [B, V]

    seen = output_mask
    if md.prompt_token_ids is not None:
        prompt_mask = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=device)
        prompt_mask.scatter_(1, md.prompt_token_ids, True)
        seen = seen | prompt_mask[:, :vocab_size]

    # Repetition: shrink positive logits and grow negative ones of tokens already seen.
    rep = md.repetition_penalties.unsqueeze(1).expand(-1, vocab_size)  # [B, V]
    rep = torch.where(seen, rep, torch.ones_like(rep))
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - md.frequency_penalties.unsqueeze(1) * output_counts
    logits = logits - md.presence_penalties.unsqueeze(1) * output_mask.to(logits.dtype)
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (with -inf) the tokens outside the top-k, then outside the smallest set whose
    probability reaches top_p (of the top-k-renormalised distribution). Ties at the k-th
    value are all kept. At least one token always survives."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)  # [B, V] ascending
    vocab_size = logits.shape[-1]
    if top_k is not None:
        # Position of the k-th largest value in ascending order.
        kth = (vocab_size - top_k.clamp(1, vocab_size)).unsqueeze(1)  # [B, 1]
        threshold = logits_sort.gather(1, kth)  # [B, 1]
        logits_sort = logits_sort.masked_fill(logits_sort < threshold, float("-inf"))
    if top_p is not None:
        probs_sort = logits_sort.softmax(dim=-1)
        # Ascending cumsum: drop a token when everything at or below it adds up to at
        # most 1 - p, i.e. when the more likely tokens already reach p.
        probs_sum = probs_sort.cumsum(dim=-1)  # [B, V]
        drop = probs_sum <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always stays
        logits_sort = logits_sort.masked_fill(drop, float("-inf"))
    return logits_sort.scatter(1, logits_idx, logits_sort)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with prob < min_p * max_prob. In logit space that is
    ``logit < max_logit + log(min_p)``, which needs no softmax (log(0) = -inf keeps all)."""
    max_logit = logits.amax(dim=-1, keepdim=True)  # [B, 1]
    threshold = max_logit + torch.log(min_p).unsqueeze(1)  # [B, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """``argmax(probs / q)`` with ``q ~ Exp(1)`` per token: an exact sample from each row
    of ``probs`` ([B, V]). Seeded rows draw ``q`` from their own generator."""
    q = torch.empty_like(probs)  # [B, V]
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    return argmax_rows(probs.div(q))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B] int64
    """``x.argmax(dim=-1)``. On a GPU, a few rows over a large vocabulary go in two
    stages (the maximum of each of 64 chunks, then the best chunk): torch reduces one row
    in one thread block, slow for one large-vocabulary row (figures: benchmarks/RESULTS.md, "Measurements that used to live in docstrings")."""
    if not x.is_cuda or x.shape[0] > 32 or x.shape[1] < 16384 or x.stride(1) != 1:
        return x.argmax(dim=-1)
    return argmax_two_stage(x, 64)


def argmax_two_stage(x: torch.Tensor, chunks: int) -> torch.Tensor:  # [B, V] -> [B]
    """Same result as ``x.argmax(dim=-1)`` (the first index of the maximum, NaN counting
    as the maximum): the first chunk holding the maximum, then its first index."""
    num_rows, vocab = x.shape
    width = vocab // chunks
    vals, idx = x[:, : chunks * width].view(num_rows, chunks, width).max(dim=-1)  # [B, C]
    idx = idx + torch.arange(0, chunks * width, width, device=x.device)
    if chunks * width < vocab:  # the remainder as one more chunk, last in order
        tail_val, tail_idx = x[:, chunks * width :].max(dim=-1, keepdim=True)
        vals = torch.cat([vals, tail_val], dim=1)
        idx = torch.cat([idx, tail_idx + chunks * width], dim=1)
    best = vals.argmax(dim=-1, keepdim=True)  # [B, 1]: the first chunk with the maximum
    return idx.gather(1, best).squeeze(1)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Column 0: the logprob and rank of ``token_ids`` ([N]); then the top ``num_logprobs``
    of ``logprobs`` ([N, V], already log-softmaxed) in descending order."""
    token_ids = token_ids.to(torch.int64).unsqueeze(1)  # [N, 1]
    token_logprobs = logprobs.gather(1, token_ids)  # [N, 1]
    # Rank = 1 + number of strictly more likely tokens.
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1  # [N]
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)  # [N, K] descending
    return LogprobsTensors(
        logprob_token_ids=torch.cat([token_ids, top_ids], dim=1),
        logprobs=torch.cat([token_logprobs, top_logprobs], dim=1),
        selected_token_ranks=ranks.to(torch.int64),
    )


def compute_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Logprobs of ``token_ids`` ([N]) under ``logits`` ([N, V]) plus the top
    ``num_logprobs`` per row; used for prompt logprobs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    return gather_logprobs(logprobs, token_ids, num_logprobs)
