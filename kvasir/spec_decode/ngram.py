"""N-gram (prompt lookup) draft proposer, vectorised over the batch.

vLLM's ``--speculative-config '{"method": "ngram", ...}'``: a request whose last n tokens
occurred earlier in its own sequence (prompt + output) is guessed to copy on from there,
so the tokens that followed that earlier occurrence become its drafts. It needs no model
and no device: it reads the persistent batch's host ``token_ids``.

The search is numpy over the whole batch at once, with a loop over n only. Occurrences
are indexed by the position of their *last* token, which makes the match masks of
successive n nest: an n-gram ending at ``e`` matches iff the (n-1)-gram ending at ``e``
does and ``token[e - n + 1] == token[N - n]``. Each n therefore costs one comparison and
one AND over the searched window, plus one arg-max to find its latest match. The window
is gathered reversed (newest token first) so that this arg-max runs forwards, stopping at
the first hit.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MAX_LOOKBACK = 4096


class NgramProposer:
    """Proposes up to ``num_speculative_tokens`` drafts per request by prompt lookup.

    For each request with known tokens ``s[0:N]``: take the largest n in
    ``[prompt_lookup_min, prompt_lookup_max]`` such that the suffix ``s[N-n:N]`` also
    occurs at some earlier start ``j < N - n`` (occurrences may overlap the suffix); of
    those occurrences take the most recent (largest ``j``); the drafts are
    ``s[j+n : j+n+k]``, cut short where the sequence ends. No n matching: no drafts.

    Most recent, not first: vLLM takes the earliest occurrence. We take the latest
    because (a) it is the most local context, so when the text was edited or has moved
    on since an early occurrence (a renamed variable, the current loop iteration, the
    latest turn of a chat), the latest copy predicts what comes next better; and (b) the
    answer then does not depend on how far back we search: bounding the search to the
    last ``max_lookback`` tokens only loses matches no other occurrence could have given,
    whereas "first in the window" changes as the window slides. The cost: in a tail that
    repeats with period p < k the latest occurrence ends p tokens before the end, so it
    yields p drafts where the first occurrence could yield k.

    Bounds: only the last ``max_lookback`` tokens of a request are searched (both the
    suffix and the occurrence must lie in them; ``None`` searches the whole sequence),
    which bounds a step's work at ``B * max_lookback`` per n. A request never gets more
    drafts than ``max_drafts`` (if given), nor than fit its row of ``token_ids`` (the
    drafts' positions ``N .. N+d-1`` must be ``< token_ids.shape[1]``, the model length).
    """

    def __init__(
        self,
        num_speculative_tokens: int,
        prompt_lookup_min: int,
        prompt_lookup_max: int,
        max_lookback: int | None = DEFAULT_MAX_LOOKBACK,
    ) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(
                "speculative_config.num_speculative_tokens must be >= 1, "
                f"got {num_speculative_tokens}"
            )
        if prompt_lookup_min < 1:
            raise ValueError(
                f"speculative_config.prompt_lookup_min must be >= 1, got {prompt_lookup_min}"
            )
        if prompt_lookup_max < prompt_lookup_min:
            raise ValueError(
                "speculative_config.prompt_lookup_max must be >= prompt_lookup_min "
                f"({prompt_lookup_min}), got {prompt_lookup_max}"
            )
        if max_lookback is not None and max_lookback <= prompt_lookup_max:
            # A match needs the n-gram, one earlier occurrence and a token after it.
            raise ValueError(
                "speculative_config.max_lookback must be > prompt_lookup_max "
                f"({prompt_lookup_max}), got {max_lookback}"
            )
        self.num_speculative_tokens = num_speculative_tokens
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max
        self.max_lookback = max_lookback

    def propose(
        self,
        token_ids: np.ndarray,
        num_tokens: np.ndarray,
        rows: np.ndarray,
        max_drafts: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Drafts for the requests in ``rows``.

        token_ids: [R, L] int32, the InputBatch array; row ``rows[b]`` holds request b's
        known tokens in ``token_ids[rows[b], :num_tokens[b]]``.
        num_tokens: [B] int64, known tokens of each proposing request.
        rows: [B] int64, their rows in ``token_ids`` (any order).
        max_drafts: [B] optional per-request cap (<= k; 0 = do not propose).
        Returns (drafts [B, k] int32 padded with -1, num_drafts [B] int64); request b's
        drafts are ``drafts[b, :num_drafts[b]]``.
        """
        k = self.num_speculative_tokens
        num_reqs = len(rows)
        drafts = np.full((num_reqs, k), -1, dtype=np.int32)  # [B, k]
        num_drafts = np.zeros(num_reqs, dtype=np.int64)  # [B]
        if num_reqs == 0:
            return drafts, num_drafts
        num_tokens = np.asarray(num_tokens, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        model_len = token_ids.shape[1]

        # Drafts each request may take; 0 takes it out of the search.
        cap = np.minimum(model_len - num_tokens, k)  # [B]
        if max_drafts is not None:
            cap = np.minimum(cap, max_drafts)
        span = num_tokens  # [B] tokens searched
        if self.max_lookback is not None:
            span = np.minimum(span, self.max_lookback)
        active = (cap > 0) & (span > self.prompt_lookup_min)
        if not active.all():
            (idx,) = np.nonzero(active)
            if len(idx) == 0:
                return drafts, num_drafts
            d, nd = self._search(token_ids, num_tokens[idx], rows[idx], span[idx], cap[idx])
            drafts[idx], num_drafts[idx] = d, nd
            return drafts, num_drafts
        return self._search(token_ids, num_tokens, rows, span, cap)

    def _search(
        self,
        token_ids: np.ndarray,
        num_tokens: np.ndarray,
        rows: np.ndarray,
        span: np.ndarray,
        cap: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``propose`` for requests that all may draft and have ``span > min`` tokens
        to search; ``span[b]`` is how many of request b's last tokens are searched."""
        k = self.num_speculative_tokens
        num_reqs, model_len = len(rows), token_ids.shape[1]
        width = int(span.max())
        # Each request's last `width` tokens, reversed: column c holds s[N-1-c], so the
        # suffix is columns 0..n-1 for every request and a forward arg-max finds the most
        # recent match. Columns past a request's span hold -1, which no token id equals.
        reversed_flat = token_ids.reshape(-1)[::-1]  # a view: the batch array is contiguous
        windows = np.lib.stride_tricks.sliding_window_view(reversed_flat, width)
        last = reversed_flat.size - rows * model_len - num_tokens  # [B] where s[N-1] is
        short = last > len(windows) - 1  # row 0 with fewer than `width` tokens
        window = windows[np.minimum(last, len(windows) - 1)]  # [B, W] gathered copy
        for b in np.flatnonzero(short):  # at most one request (row 0)
            window[b, : num_tokens[b]] = token_ids[0, num_tokens[b] - 1 :: -1]
        window[np.arange(width) >= span[:, None]] = -1

        # match[b, q]: the current n-gram's occurrence whose last token is column q + 1
        # (sequence position N - 2 - q) equals the suffix. Grown one n at a time.
        match = np.ones((num_reqs, width - 1), dtype=bool)  # [B, W-1]
        best = np.full(num_reqs, -1, dtype=np.int64)  # [B] q of the chosen match
        arange_reqs = np.arange(num_reqs)
        max_n = min(self.prompt_lookup_max, width - 1)
        for n in range(1, max_n + 1):
            i = n - 1  # compare sequence token N-1-q-1-i with suffix token N-1-i
            match[:, : width - 1 - i] &= window[:, 1 + i :] == window[:, i, None]
            match[:, width - 1 - i :] = False
            if n < self.prompt_lookup_min:
                continue
            q = match.argmax(axis=1)  # [B] most recent match (or 0 when none)
            found = match[arange_reqs, q] & (span > n)
            if not found.any():
                break  # masks nest: no longer n can match either
            best[found] = q[found]

        # The drafts are s[N-1-q ...], i.e. columns q, q-1, ..., 0 of the window.
        num_drafts = np.where(best >= 0, np.minimum(cap, best + 1), 0)  # [B]
        offsets = np.arange(k)
        take = np.maximum(best[:, None] - offsets, 0)  # [B, k]
        drafts = np.take_along_axis(window, take, axis=1)  # [B, k]
        drafts[offsets >= num_drafts[:, None]] = -1
        return drafts.astype(np.int32, copy=False), num_drafts
