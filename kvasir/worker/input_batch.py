"""The persistent batch: one row of host arrays per request, kept across steps.

vLLM's ``InputBatch`` idea. A request keeps its row from the step it joins until it
finishes or is preempted, so a steady decode step touches only what changed (one token
per row, a block id every ``block_size`` tokens) instead of rebuilding Python lists.
Rows stay dense: removing one moves the last row into the hole, so a step that runs
every row reads contiguous slices. Sampling settings live here too, as per-row arrays
that become device tensors only when the batch composition changes.
"""

from __future__ import annotations

import numpy as np
import torch

from kvasir.layers.sampler import SamplingMetadata, TokenMasks
from kvasir.worker.request_state import CachedRequestState


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy a small host array to ``device`` without waiting for the device: through
    pinned memory (the caching host allocator keeps it alive until the copy ran)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class InputBatch:
    """Host-side state of the requests the runner holds, one row each.

    Invariants: rows ``0..num_reqs-1`` are occupied; ``token_ids[r, :num_known_tokens[r]]``
    are request ``r``'s known token ids; ``num_tokens[r] - num_known_tokens[r]`` (0 or
    1) more were sampled by the last step and are still only on the device, at index
    ``prev_sample_index[r]`` of that step's sampled-token tensor;
    ``block_table[r, :num_blocks[r]]`` are its KV block ids (a pinned array, the source
    of the device block table; rows from ``num_reqs`` on are free). ``version`` changes whenever a row is added, removed or
    moved, so per-row tensors built from these arrays can be cached against it.
    """

    def __init__(
        self,
        max_num_reqs: int,
        max_model_len: int,
        max_num_blocks_per_req: int,
        vocab_size: int,
        pin_memory: bool,
    ) -> None:
        r, length = max_num_reqs, max_model_len
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.num_reqs = 0
        self.version = 0
        self.req_states: list[CachedRequestState | None] = [None] * r
        self.token_ids = np.zeros((r, length), dtype=np.int32)  # [R, max_model_len]
        self.num_tokens = np.zeros(r, dtype=np.int64)  # known + sampled, not yet copied back
        self.num_known_tokens = np.zeros(r, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(r, dtype=np.int64)
        self.num_computed_tokens = np.zeros(r, dtype=np.int64)
        self.prev_sample_index = np.full(r, -1, dtype=np.int64)
        # One spare row past the last request's: CUDA-graph padding requests are written
        # there when the table is copied to the device as it stands (InputBuffers).
        self.block_table_cpu = torch.zeros(
            (r + 1, max_num_blocks_per_req), dtype=torch.int32, pin_memory=pin_memory
        )
        self.block_table = self.block_table_cpu.numpy()  # [R, max_blocks] view
        self.num_blocks = np.zeros(r, dtype=np.int64)
        # Sampling settings. Greedy rows hold temperature 0; disabled top-k holds vocab.
        self.temperature = np.zeros(r, dtype=np.float32)
        self.top_k = np.full(r, vocab_size, dtype=np.int64)
        self.top_p = np.ones(r, dtype=np.float32)
        self.min_p = np.zeros(r, dtype=np.float32)
        self.presence_penalty = np.zeros(r, dtype=np.float32)
        self.frequency_penalty = np.zeros(r, dtype=np.float32)
        self.repetition_penalty = np.ones(r, dtype=np.float32)
        self.penalized = np.zeros(r, dtype=bool)
        self.min_tokens = np.zeros(r, dtype=np.int64)
        self.num_logprobs = np.full(r, -1, dtype=np.int64)  # -1: no logprobs wanted
        # logit_bias / allowed_token_ids / bad_words; the longest bad word prefix (0: none).
        self.token_masked = np.zeros(r, dtype=bool)
        self.bad_prefix_len = np.zeros(r, dtype=np.int64)
        # Rows using a rare feature; 0 keeps the common step off its code path.
        self.num_penalized = 0
        self.num_min_tokens = 0
        self.num_seeded = 0
        self.num_prompt_logprobs = 0
        self.num_token_masked = 0
        self.num_pooling = 0  # embedding requests (they pool instead of sampling)
        self.num_bad_word_prefixes = 0  # rows whose masks depend on their last tokens
        self._arrays = (
            self.num_tokens, self.num_known_tokens, self.num_prompt_tokens,
            self.num_computed_tokens, self.prev_sample_index, self.num_blocks,
            self.temperature, self.top_k, self.top_p, self.min_p, self.presence_penalty,
            self.frequency_penalty, self.repetition_penalty, self.penalized, self.min_tokens,
            self.num_logprobs, self.token_masked, self.bad_prefix_len,
        )  # fmt: skip

    # ------------------------------------------------------------------ rows
    def add(
        self,
        state: CachedRequestState,
        token_ids: list[int],
        block_ids: list[int],
        num_computed_tokens: int,
    ) -> None:
        """Give ``state`` the next free row, holding ``token_ids`` (all known)."""
        assert state.row < 0 and self.num_reqs < self.max_num_reqs
        row = self.num_reqs
        self.num_reqs += 1
        self.version += 1
        state.row = row
        self.req_states[row] = state
        n = len(token_ids)
        self.token_ids[row, :n] = token_ids
        self.num_tokens[row] = self.num_known_tokens[row] = n
        self.num_prompt_tokens[row] = state.num_prompt_tokens
        self.num_computed_tokens[row] = num_computed_tokens
        self.prev_sample_index[row] = -1
        nb = len(block_ids)
        self.block_table[row, :nb] = block_ids
        self.num_blocks[row] = nb
        sp = state.sampling_params
        self.temperature[row] = 0.0 if sp.is_greedy else sp.temperature
        self.top_k[row] = min(sp.top_k, self.vocab_size) if sp.top_k > 0 else self.vocab_size
        self.top_p[row] = sp.top_p
        self.min_p[row] = sp.min_p
        self.presence_penalty[row] = sp.presence_penalty
        self.frequency_penalty[row] = sp.frequency_penalty
        self.repetition_penalty[row] = sp.repetition_penalty
        penalized = (
            sp.presence_penalty != 0.0
            or sp.frequency_penalty != 0.0
            or sp.repetition_penalty != 1.0
        )
        self.penalized[row] = penalized
        has_min_tokens = bool(sp.min_tokens and state.min_tokens_stop_ids)
        self.min_tokens[row] = sp.min_tokens if has_min_tokens else 0
        self.num_logprobs[row] = -1 if sp.logprobs is None else sp.logprobs
        self.token_masked[row] = sp.has_token_masks
        words = sp.bad_words_token_ids or []
        self.bad_prefix_len[row] = max((len(w) - 1 for w in words), default=0)
        self._count(state, penalized, has_min_tokens, +1)

    def _count(self, state: CachedRequestState, penalized: bool, min_tok: bool, d: int) -> None:
        sp = state.sampling_params
        self.num_pooling += d * (state.pooling_params is not None)
        self.num_token_masked += d * sp.has_token_masks
        self.num_bad_word_prefixes += d * any(len(w) > 1 for w in sp.bad_words_token_ids or [])
        self.num_penalized += d * penalized
        self.num_min_tokens += d * min_tok
        self.num_seeded += d * (state.generator is not None)
        self.num_prompt_logprobs += d * (state.sampling_params.prompt_logprobs is not None)

    def remove(self, state: CachedRequestState) -> None:
        """Free ``state``'s row; the last row moves into it."""
        row, last = state.row, self.num_reqs - 1
        assert 0 <= row <= last and self.req_states[row] is state
        self._count(state, bool(self.penalized[row]), bool(self.min_tokens[row]), -1)
        state.row = -1
        if row != last:
            moved = self.req_states[last]
            assert moved is not None
            moved.row = row
            self.req_states[row] = moved
            n = int(self.num_known_tokens[last])
            self.token_ids[row, :n] = self.token_ids[last, :n]
            nb = int(self.num_blocks[last])
            self.block_table[row, :nb] = self.block_table[last, :nb]
            for a in self._arrays:
                a[row] = a[last]
        self.req_states[last] = None
        self.num_reqs -= 1
        self.version += 1

    def append_block_ids(self, row: int, block_ids: list[int]) -> None:
        nb = int(self.num_blocks[row])
        self.block_table[row, nb : nb + len(block_ids)] = block_ids
        self.num_blocks[row] = nb + len(block_ids)

    def record_sampled(self, states: list[CachedRequestState], token_ids: np.ndarray) -> None:
        """Token ids a step sampled for ``states`` (in order) reached the host: append
        each to its request's known tokens. States no longer in the batch (finished,
        preempted) are skipped."""
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=len(states))
        keep = rows >= 0
        if not keep.all():
            rows, token_ids = rows[keep], token_ids[keep]
        pos = self.num_known_tokens[rows]
        # A token sampled past max_model_len is never used (the request has finished).
        ok = pos < self.max_model_len
        self.token_ids[rows[ok], pos[ok]] = token_ids[ok]
        self.num_known_tokens[rows] += 1

    def set_known_tokens(self, row: int, start: int, token_ids: list[int]) -> None:
        """Tokens sampled elsewhere (the last pipeline stage), sent by the scheduler:
        they are this request's tokens from position ``start`` on. Idempotent for
        tokens this row already has."""
        end = min(start + len(token_ids), self.max_model_len)
        self.token_ids[row, start:end] = token_ids[: end - start]
        if end > self.num_known_tokens[row]:
            self.num_known_tokens[row] = end
        if end > self.num_tokens[row]:
            self.num_tokens[row] = end

    # ------------------------------------------------------------------ sampling
    def make_sampling_metadata(
        self, rows: np.ndarray, device: torch.device, empty: torch.Tensor
    ) -> SamplingMetadata:
        """Sampling settings of ``rows`` (one sampled token each, in order) as device
        tensors; features nobody in ``rows`` uses stay ``None`` / ``empty``. Penalised
        rows must have all their tokens on the host. ``min_tokens_stop_ids`` is left
        empty: it changes every step (see ``min_tokens_stop_ids``)."""
        temps = self.temperature[rows]
        greedy = temps == 0.0
        all_greedy, all_random = bool(greedy.all()), not bool(greedy.any())
        top_k, top_p, min_p = self.top_k[rows], self.top_p[rows], self.min_p[rows]
        use_top_k = bool((top_k < self.vocab_size).any())
        use_top_p = bool((top_p < 1.0).any())
        use_min_p = bool((min_p > 0.0).any())
        no_pen = not bool(self.penalized[rows].any())
        generators: dict[int, torch.Generator] = {}
        if self.num_seeded:
            for i, r in enumerate(rows.tolist()):
                st = self.req_states[r]
                if st is not None and st.generator is not None:
                    generators[i] = st.generator
        lp = self.num_logprobs[rows]
        max_lp = int(lp.max()) if len(lp) else -1
        prompt_ids, output_ids = None, []
        pres = freq = rep = empty
        if not no_pen:
            pres = to_device(self.presence_penalty[rows], device)
            freq = to_device(self.frequency_penalty[rows], device)
            rep = to_device(self.repetition_penalty[rows], device)
            num_prompt = self.num_prompt_tokens[rows]
            width = int(num_prompt.max())
            prompt_np = np.full((len(rows), width), self.vocab_size, dtype=np.int64)
            for i, r in enumerate(rows.tolist()):
                n, known = int(num_prompt[i]), int(self.num_known_tokens[r])
                assert known == self.num_tokens[r], "penalties need every token on the host"
                prompt_np[i, :n] = self.token_ids[r, :n]
                output_ids.append(self.token_ids[r, n:known].tolist())
            prompt_ids = to_device(prompt_np, device)
        return SamplingMetadata(
            temperature=empty if all_greedy else to_device(temps, device),
            all_greedy=all_greedy,
            all_random=all_random,
            top_k=to_device(top_k, device) if use_top_k else None,
            top_p=to_device(top_p, device) if use_top_p else None,
            min_p=to_device(min_p, device) if use_min_p else None,
            generators=generators,
            no_penalties=no_pen,
            presence_penalties=pres,
            frequency_penalties=freq,
            repetition_penalties=rep,
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            min_tokens_stop_ids={},
            max_num_logprobs=max_lp if max_lp >= 0 else None,
            token_masks=self._token_masks(rows, device) if self.num_token_masked else None,
        )

    def _token_masks(self, rows: np.ndarray, device: torch.device) -> TokenMasks | None:
        """logit_bias, allowed_token_ids and bad_words of ``rows`` as flat index tensors
        (Python over the masked rows only, when the batch changes)."""
        masked = np.nonzero(self.token_masked[rows])[0]
        if not len(masked):
            return None
        b_rows: list[int] = []
        b_ids: list[int] = []
        b_vals: list[float] = []
        a_rows: list[int] = []
        a_idx: list[int] = []
        a_ids: list[int] = []
        w_rows: list[int] = []
        words: list[list[int]] = []
        for i in masked.tolist():
            st = self.req_states[int(rows[i])]
            assert st is not None
            sp = st.sampling_params
            if sp.logit_bias:
                b_rows += [i] * len(sp.logit_bias)
                b_ids += list(sp.logit_bias)
                b_vals += list(sp.logit_bias.values())
            if sp.allowed_token_ids:
                a_idx += [len(a_rows)] * len(sp.allowed_token_ids)
                a_ids += sp.allowed_token_ids
                a_rows.append(i)
            for w in sp.bad_words_token_ids or []:
                w_rows.append(i)
                words.append(w)
        width = max((len(w) - 1 for w in words), default=0)
        prefix = np.full((len(words), width), -1, dtype=np.int64)
        for j, w in enumerate(words):
            if len(w) > 1:
                prefix[j, width - len(w) + 1 :] = w[:-1]

        def dev(x: list, dtype: type = np.int64) -> torch.Tensor | None:
            return to_device(np.asarray(x, dtype=dtype), device) if x else None

        return TokenMasks(
            bias_rows=dev(b_rows),
            bias_token_ids=dev(b_ids),
            bias_values=dev(b_vals, np.float32),
            allowed_rows=dev(a_rows),
            allowed_index=to_device(np.asarray([a_idx, a_ids], dtype=np.int64), device)
            if a_rows
            else None,
            bad_rows=dev(w_rows),
            bad_prefix=to_device(prefix, device) if words else None,
            bad_last=dev([w[-1] for w in words]),
            max_bad_prefix=width,
        )

    def recent_output_ids(
        self, rows: np.ndarray, ends: np.ndarray, width: int, device: torch.device
    ) -> torch.Tensor:
        """[len(rows), width] int64: output tokens ``ends - width .. ends - 1`` of each
        row (its tokens before position ``ends``), -1 where that is inside the prompt.
        bad_words compares them with its words' prefixes."""
        pos = ends[:, None] - width + np.arange(width)[None, :]  # [B, width]
        ok = pos >= self.num_prompt_tokens[rows][:, None]
        ids = self.token_ids[rows[:, None], np.clip(pos, 0, None)].astype(np.int64)
        return to_device(np.where(ok, ids, -1), device)

    def min_tokens_stop_ids(self, rows: np.ndarray) -> dict[int, list[int]]:
        """Sample index -> token ids to forbid, for rows that have produced fewer than
        min_tokens tokens (pending ones included)."""
        num_out = self.num_tokens[rows] - self.num_prompt_tokens[rows]
        out: dict[int, list[int]] = {}
        for i in np.nonzero(self.min_tokens[rows] > num_out)[0].tolist():
            st = self.req_states[int(rows[i])]
            assert st is not None
            out[i] = st.min_tokens_stop_ids
        return out
