"""The one place the model runner calls for speculative decoding.

``SpecDecoder.sample`` replaces the runner's single-token sampling for a step: requests
that carry drafts (``SchedulerOutput.scheduled_spec_decode_tokens``) have the target's
logits taken at all of their ``1 + k`` last positions, in the same flat varlen batch
as everyone else, and verified by rejection sampling (greedy requests: the longest
prefix that matches the target's argmax, then the target's own token); requests
without drafts sample one token exactly as without speculation. The tokens reach the
host at once (the accepted count decides the next step's positions), join the
persistent batch, and the proposer drafts each request's next tokens.

Per-position sampling settings are those of the request as if the drafts before that
position were already output: penalties count them, ``min_tokens`` counts them, and
logprobs are the raw target distribution at the position of each token produced.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvasir.config import SpeculativeConfig
from kvasir.core.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from kvasir.layers.sampler import (
    apply_min_tokens_mask,
    apply_penalties,
    apply_token_masks,
    argmax_rows,
    compute_probs,
    gather_logprobs,
)
from kvasir.spec_decode.adaptive import AdaptiveSpeculation
from kvasir.spec_decode.proposer import Proposal, ProposeInputs, Proposer
from kvasir.spec_decode.rejection_sampler import rejection_noise, rejection_sample
from kvasir.worker.async_output import logprobs_to_lists
from kvasir.worker.input_batch import to_device

if TYPE_CHECKING:
    from kvasir.worker.input_buffers import StepInputs
    from kvasir.worker.model_runner import ModelRunner
    from kvasir.worker.request_state import CachedRequestState

logger = logging.getLogger(__name__)


class SpecDecoder:
    """Verification plus a proposer, for one runner."""

    def __init__(self, config: SpeculativeConfig, runner: ModelRunner) -> None:
        from kvasir.spec_decode.factory import build_proposer

        self.config = config
        self.k = config.k
        self.proposer: Proposer = build_proposer(config, runner)
        # Request id -> [k_i, V] distribution its pending drafts were sampled from.
        self._draft_probs: dict[str, torch.Tensor] = {}
        self.adaptive: AdaptiveSpeculation | None = None
        if config.adaptive:
            self.adaptive = AdaptiveSpeculation(self.k)

    def calibrate(self, runner: ModelRunner) -> None:
        """Adaptive speculation: measure the step-cost model on this device (once the
        KV cache exists)."""
        if self.adaptive is None:
            return
        from kvasir.spec_decode.adaptive import calibrate

        cost, draft = calibrate(runner, self.proposer)
        self.adaptive.cost, self.adaptive.draft_cost = cost, draft
        logger.info(
            "adaptive speculation: target step %.2f ms + %.3f ms/token%s",
            cost.base * 1e3,
            cost.per_token * 1e3,
            ""
            if draft is None
            else f"; draft pass {draft.base * 1e3:.2f} ms + {draft.per_token * 1e3:.3f} ms/request",
        )

    @property
    def num_lookahead_tokens(self) -> int:
        return self.config.num_lookahead_tokens

    def remove(self, req_id: str) -> None:
        self._draft_probs.pop(req_id, None)
        self.proposer.remove(req_id)
        if self.adaptive is not None:
            self.adaptive.remove(req_id)

    # ------------------------------------------------------------------ step
    def sample(
        self,
        runner: ModelRunner,
        so: SchedulerOutput,
        step: StepInputs,
        hidden: torch.Tensor | None,
        all_logits: torch.Tensor | None,
        sample_idx: np.ndarray,
        prompt_logprobs: dict[str, list[TokenLogprobs]],
    ) -> ModelRunnerOutput:
        """Sample (or verify) the step's requests in ``sample_idx``, record their tokens
        in the persistent batch, propose their next drafts; returns the step's output."""
        ib = runner.input_batch
        n = len(step.rows)
        rows_s = step.rows[sample_idx]
        states = [step.states[i] for i in sample_idx.tolist()]
        spec = so.scheduled_spec_decode_tokens
        num_drafts = np.fromiter(
            (len(spec.get(st.req_id, ())) for st in states), dtype=np.int64, count=len(states)
        )
        if num_drafts.any():
            assert hidden is not None  # a verifying step is never a decode-only graph
            tokens, num_accepted, lp_lists = self._verify(
                runner, so, step, hidden, sample_idx, states, num_drafts, spec
            )
        else:
            tokens, lp_lists = self._sample_one(runner, so, step, hidden, all_logits, sample_idx)
            num_accepted = np.zeros(len(states), dtype=np.int64)
        lengths = num_accepted + 1
        # Into the persistent batch: known tokens and the KV the target keeps.
        for i, row in enumerate(rows_s.tolist()):
            nk = int(ib.num_known_tokens[row])
            assert nk == ib.num_tokens[row], "speculative decoding runs without async scheduling"
            end = min(nk + int(lengths[i]), ib.max_model_len)
            ib.token_ids[row, nk:end] = tokens[i, : end - nk]
        ib.num_known_tokens[rows_s] += lengths
        ib.num_tokens[rows_s] += lengths
        ib.num_computed_tokens[rows_s] -= num_drafts - num_accepted
        if self.adaptive is not None:
            self.adaptive.record(states, num_drafts, num_accepted)

        proposal = self._propose(runner, step, hidden, sample_idx, states, rows_s, lengths)
        sampled: list[list[int]] = [[] for _ in range(n)]
        logprobs: dict[str, list[TokenLogprobs]] = {}
        spec_out: dict[str, list[int]] = {}
        for i, st in enumerate(states):
            length = int(lengths[i])
            sampled[int(sample_idx[i])] = tokens[i, :length].tolist()
            k = st.sampling_params.logprobs
            if k is not None and lp_lists is not None:
                logprobs[st.req_id] = [e[: k + 1] for e in lp_lists[i][:length]]
            nd = int(proposal.num_drafts[i]) if proposal is not None else 0
            if nd:
                spec_out[st.req_id] = proposal.drafts[i, :nd].tolist()  # type: ignore[union-attr]
            self._draft_probs.pop(st.req_id, None)
            if nd and proposal.draft_probs is not None and st.sampling_params.temperature > 0:  # type: ignore[union-attr]
                self._draft_probs[st.req_id] = proposal.draft_probs[i, :nd]  # type: ignore[union-attr]
        return ModelRunnerOutput(
            req_ids=step.req_ids,
            sampled_token_ids=sampled,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            spec_token_ids=spec_out,
        )

    def _sample_one(
        self,
        runner: ModelRunner,
        so: SchedulerOutput,
        step: StepInputs,
        hidden: torch.Tensor | None,
        all_logits: torch.Tensor | None,
        sample_idx: np.ndarray,
    ) -> tuple[np.ndarray, list[list[TokenLogprobs]] | None]:
        """No drafts in the step: one token per request, as without speculation."""
        d = runner.device
        rows_s = step.rows[sample_idx]
        if all_logits is not None:  # a decode CUDA graph computed every row's logits
            logits = all_logits
            if len(sample_idx) < len(step.rows):
                logits = all_logits.index_select(0, to_device(sample_idx, d))
        else:
            assert hidden is not None
            idx = to_device(step.query_start_loc[1:][sample_idx] - 1, d)
            logits = runner.model.compute_logits(hidden.index_select(0, idx))  # [S, vocab]
        md = runner._sampling_metadata(rows_s, step.dense and len(sample_idx) == len(step.rows))
        if so.structured_output_request_ids:
            md = runner._with_grammar_bitmask(md, so, step, sample_idx)
        if runner.watermark is not None:
            logits = runner._watermarked(logits, rows_s, step.query_start_loc[1:][sample_idx] - 1)
        out = runner.sampler(logits, md)
        tokens = out.sampled_token_ids.cpu().numpy().reshape(-1, 1)
        lp = None
        if out.logprobs_tensors is not None:
            lp = [[e] for e in logprobs_to_lists(out.logprobs_tensors)]
        return tokens, lp

    def _verify(
        self,
        runner: ModelRunner,
        so: SchedulerOutput,
        step: StepInputs,
        hidden: torch.Tensor,
        sample_idx: np.ndarray,
        states: list[CachedRequestState],
        num_drafts: np.ndarray,
        spec: dict[str, list[int]],
    ) -> tuple[np.ndarray, np.ndarray, list[list[TokenLogprobs]] | None]:
        """Target logits at every request's last ``1 + k`` positions, then rejection
        sampling. Returns tokens [S, k_max + 1] (accepted drafts, then one token),
        num_accepted [S] and per-request logprobs of each output position."""
        ib, d = runner.input_batch, runner.device
        num_s = len(states)
        rows_s = step.rows[sample_idx]
        per_req = num_drafts + 1
        # Expanded rows: request i's positions j = 0..k_i (row e = cu[i] + i + j).
        req_e = np.repeat(np.arange(num_s), per_req)
        starts = np.zeros(num_s + 1, dtype=np.int64)
        np.cumsum(per_req, out=starts[1:])
        pos_e = np.arange(int(starts[-1])) - starts[:-1][req_e]
        last = step.query_start_loc[1:][sample_idx] - 1  # [S] the last query token
        tok_e = (last - num_drafts)[req_e] + pos_e
        logits = runner.model.compute_logits(hidden.index_select(0, to_device(tok_e, d)))
        logits = logits.float()  # [T, V]
        rows_e = rows_s[req_e]
        md = ib.make_sampling_metadata(rows_e, d, runner._empty)
        drafts_np = [
            np.asarray(spec[st.req_id], dtype=np.int64) if k else np.zeros(0, np.int64)
            for st, k in zip(states, num_drafts.tolist(), strict=True)
        ]
        if not md.no_penalties:  # position j has drafts 0..j-1 as output already
            for e, (i, j) in enumerate(zip(req_e.tolist(), pos_e.tolist(), strict=True)):
                if j:
                    md.output_token_ids[e] = md.output_token_ids[e] + drafts_np[i][:j].tolist()
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if so.structured_output_request_ids:
            # Row e's mask is the grammar's after drafts 0..j-1 (kvasir.structured_output).
            from kvasir.structured_output.bitmask import apply_token_bitmask, rows_bitmask

            req_ids_e = [states[i].req_id for i in req_e.tolist()]
            mask = rows_bitmask(so, req_ids_e, logits.shape[1], d, pos_e.tolist())
            if mask is not None:
                logits = apply_token_bitmask(logits, mask)
        if ib.num_min_tokens:
            num_out = ib.num_tokens[rows_e] - ib.num_prompt_tokens[rows_e] + pos_e
            stop = {}
            for e in np.nonzero(ib.min_tokens[rows_e] > num_out)[0].tolist():
                st = states[int(req_e[e])]
                stop[e] = st.min_tokens_stop_ids
            logits = apply_min_tokens_mask(logits, stop)
        if md.token_masks is not None:
            masks, recent = md.token_masks, None
            if masks.max_bad_prefix:  # position j follows drafts 0..j-1 (in token_ids)
                ends = ib.num_known_tokens[rows_e] + pos_e
                recent = ib.recent_output_ids(rows_e, ends, masks.max_bad_prefix, d)
            logits = apply_token_masks(logits, masks, recent)
        if not md.no_penalties:
            logits = apply_penalties(logits, md)
        if runner.watermark is not None:  # position j's context ends with drafts 0..j-1
            from kvasir.security.watermark import rows_context

            ends = ib.num_known_tokens[rows_e] + pos_e
            ctx = rows_context(ib.token_ids, rows_e, ends, runner.watermark.params.context)
            logits = runner.watermark.apply(logits, to_device(ctx, d))
        target_argmax = argmax_rows(logits)  # [T]
        target_probs = None if md.all_greedy else compute_probs(logits, md)

        cu = np.zeros(num_s + 1, dtype=np.int64)
        np.cumsum(num_drafts, out=cu[1:])
        draft_ids = torch.from_numpy(np.concatenate(drafts_np)).to(d)
        greedy = ib.temperature[rows_s] == 0.0
        generators = {i: st.generator for i, st in enumerate(states) if st.generator is not None}
        any_random = not bool(greedy.all())
        uniform, exp_noise = rejection_noise(cu, logits.shape[1], generators, any_random, d)
        draft_probs = self._stacked_draft_probs(states, num_drafts, greedy, logits.shape[1], d)
        out, num_acc = rejection_sample(
            draft_ids,
            to_device(cu, d),
            draft_probs,
            target_probs,
            target_argmax,
            to_device(greedy, d),
            uniform,
            exp_noise,
            int(num_drafts.max()),
        )
        tokens = out.cpu().numpy()
        num_accepted = num_acc.cpu().numpy().astype(np.int64)
        lp_lists = None
        if raw_logprobs is not None:
            assert md.max_num_logprobs is not None
            tok_rows = torch.from_numpy(out.cpu().numpy()[req_e, pos_e]).clamp_(min=0)
            lp = gather_logprobs(raw_logprobs, tok_rows.to(d), md.max_num_logprobs)
            flat = logprobs_to_lists(lp)
            lp_lists = [flat[int(starts[i]) : int(starts[i + 1])] for i in range(num_s)]
        return tokens, num_accepted, lp_lists

    def _stacked_draft_probs(
        self,
        states: list[CachedRequestState],
        num_drafts: np.ndarray,
        greedy: np.ndarray,
        vocab: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        """[D, V] q of every draft in the step, or None when no random request's drafts
        came from a distribution (point masses: n-gram drafts or greedy requests)."""
        stored = [self._draft_probs.get(st.req_id) for st in states]
        if not any(q is not None and not g for q, g in zip(stored, greedy.tolist(), strict=True)):
            return None
        parts = []
        for q, k in zip(stored, num_drafts.tolist(), strict=True):
            if not k:
                continue
            if q is None:  # a greedy request: its rows are never read
                parts.append(torch.zeros(k, vocab, dtype=torch.float32, device=device))
            else:
                parts.append(q[:k].float())
        return torch.cat(parts)

    def _propose(
        self,
        runner: ModelRunner,
        step: StepInputs,
        hidden: torch.Tensor | None,
        sample_idx: np.ndarray,
        states: list[CachedRequestState],
        rows_s: np.ndarray,
        lengths: np.ndarray,
    ) -> Proposal | None:
        ib = runner.input_batch
        num_tokens = ib.num_known_tokens[rows_s].copy()
        # Drafts sit at positions num_tokens..; their KV (and a draft model's steps)
        # must stay inside max_model_len and the blocks the request holds.
        room = ib.max_model_len - num_tokens
        if self.num_lookahead_tokens:  # draft steps write KV at num_tokens - 1 + j, j < k
            room = np.minimum(room, ib.num_blocks[rows_s] * runner.block_size - num_tokens + 1)
        cap = np.full(len(states), self.k, dtype=np.int64)
        if self.adaptive is not None:
            cap = self.adaptive.choose(states, len(step.rows))
        remaining = np.array(
            [
                (st.sampling_params.max_tokens or 1 << 30) - (int(t) - st.num_prompt_tokens) - 1
                for st, t in zip(states, num_tokens.tolist(), strict=True)
            ],
            dtype=np.int64,
        )
        max_drafts = np.maximum(np.minimum(np.minimum(cap, room), remaining), 0)
        if not max_drafts.any():
            return None
        md = runner._sampling_metadata(rows_s, False)
        inputs = ProposeInputs(
            runner=runner,
            step=step,
            hidden_states=hidden,
            sample_idx=sample_idx,
            states=states,
            rows=rows_s,
            num_tokens=num_tokens,
            num_new_tokens=lengths,
            max_drafts=max_drafts,
            sampling_metadata=md,
        )
        proposal = self.proposer.propose(inputs)
        proposal.num_drafts = np.minimum(proposal.num_drafts, max_drafts)
        return proposal
