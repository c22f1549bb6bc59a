"""Model-based drafting: a separate small draft model, or the target's own first layers.

``draft_model``: a smaller checkpoint with the target's vocabulary (checked at start-up)
and its own KV cache, laid out on the target's block table (same block ids, its own
tensors), so it needs no allocator of its own. ``self_spec`` (layer skip): the
target's first ``num_layers`` decoder layers, then its final norm and LM head, are the
draft; their KV is the target's own (the first layers of a token compute the same keys
and values whether the rest of the model runs or not), so it needs no memory at all.

After each step a proposer pass first brings the draft's KV up to the request's known
tokens (a varlen pass over the tokens it has not seen: a prefill chunk, the accepted
drafts and the sampled token; for ``self_spec`` only the sampled token) and takes its
first draft from the last position; then ``k - 1`` one-token passes, each feeding the
previous draft. A greedy request drafts the argmax; a random one samples from the
draft's distribution under the request's temperature and filters, and that
distribution goes to verification (``Proposal.draft_probs``). Draft steps write KV at
the positions of the drafts but the last (the scheduler keeps ``k`` lookahead slots).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvasir.config import ModelConfig, SpeculativeConfig
from kvasir.core.kv_cache_spec import KVCacheSpec
from kvasir.spec_decode.proposer import (
    Proposal,
    ProposeInputs,
    Proposer,
    draw,
    stack_probs,
    subset_metadata,
)
from kvasir.worker import kv_cache_sizing
from kvasir.worker.input_buffers import GraphSizes

if TYPE_CHECKING:
    from kvasir.worker.model_runner import ModelRunner
    from kvasir.worker.request_state import CachedRequestState

logger = logging.getLogger(__name__)


class DraftModelProposer(Proposer):
    """Drafts with ``model`` (the target itself for layer skip: ``num_layers`` set)."""

    def __init__(
        self,
        config: SpeculativeConfig,
        runner: ModelRunner,
        model: torch.nn.Module,
        num_layers: int | None,
    ) -> None:
        self.k = config.k
        self.num_lookahead_tokens = config.num_lookahead_tokens
        self.runner = runner
        self.model = model
        self.num_layers = num_layers
        self.shares_kv = num_layers is not None
        self.name = "self_spec" if self.shares_kv else "draft_model"
        self.kv_caches: list[torch.Tensor] = []
        # Request id -> (its runner state, leading tokens whose KV the draft holds).
        self._computed: dict[str, tuple[CachedRequestState, int]] = {}
        # Request id -> (its known tokens when it last drafted, drafts it got).
        self._drafted: dict[str, tuple[int, int]] = {}
        # Decode batch size -> (CUDA graph of a one-token draft pass, its logits).
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_graph_replays = 0

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        if self.shares_kv:
            return []
        r = self.runner
        return kv_cache_sizing.kv_cache_specs(self.model, r.block_size, r.dtype)

    def bind_kv_caches(self, caches: list[torch.Tensor]) -> None:
        self.kv_caches = caches if not self.shares_kv else self.runner.kv_caches

    def _forward(self, num_tokens: int, attn_metadata) -> torch.Tensor:  # type: ignore[no-untyped-def]
        r = self.runner
        caches = r.kv_caches if self.shares_kv else self.kv_caches
        return self.model(  # type: ignore[no-any-return]
            r.input_ids[:num_tokens],
            r.positions[:num_tokens],
            caches,
            attn_metadata,
            None,
            self.num_layers,
        )

    def propose(self, inputs: ProposeInputs) -> Proposal:
        r = self.runner
        ib = r.input_batch
        n_s = len(inputs.states)
        drafts = np.full((n_s, self.k), -1, dtype=np.int64)
        num_drafts = inputs.max_drafts.copy()

        # Pass 1: every request of the step, over the tokens the draft has not seen.
        rows, starts, ends = self._catch_up_batch(inputs)
        if not len(rows):
            return Proposal(drafts, np.zeros(n_s, dtype=np.int64))
        hidden_last = self._run(rows, starts, ends)  # [len(rows), hidden]
        if not self.shares_kv:
            for row, e in zip(rows.tolist(), ends.tolist(), strict=True):
                st = ib.req_states[row]
                assert st is not None
                self._computed[st.req_id] = (st, e)
        # The sampling requests' last positions, in inputs order (one that did not
        # catch up, for lack of KV slots, drafts nothing).
        where = {row: i for i, row in enumerate(rows.tolist())}
        caught_up = np.array(
            [
                row in where and int(ends[where[row]]) == t
                for row, t in zip(inputs.rows.tolist(), inputs.num_tokens.tolist(), strict=True)
            ],
            dtype=bool,
        )
        num_drafts[~caught_up] = 0
        k = int(num_drafts.max()) if len(num_drafts) else 0
        if k == 0:
            return Proposal(drafts, num_drafts)
        pick = [where.get(row, 0) for row in inputs.rows.tolist()]
        hidden = hidden_last.index_select(0, torch.tensor(pick, device=hidden_last.device))
        md = inputs.sampling_metadata
        probs_steps: list[torch.Tensor] = []
        logits = self.model.compute_logits(hidden)  # type: ignore[operator]
        tok, q = draw(logits, md)
        drafts[:, 0] = tok.cpu().numpy()
        if q is not None:
            probs_steps.append(q)
        # Passes 2..k: one token per request that still drafts.
        for j in range(1, k):
            active = np.nonzero(num_drafts > j)[0]
            if not len(active):
                break
            act_rows = inputs.rows[active]
            p = inputs.num_tokens[active] + j - 1  # the previous draft's position
            ib.token_ids[act_rows, p] = drafts[active, j - 1]  # scratch: not known tokens
            logits_a = self._decode_logits(act_rows, p)
            tok_a, q_a = draw(logits_a, subset_metadata(md, active))
            drafts[active, j] = tok_a.cpu().numpy()
            if q is not None:
                full = torch.zeros_like(probs_steps[0])
                if q_a is not None:
                    full[torch.from_numpy(active).to(full.device)] = q_a
                probs_steps.append(full)
        if not self.shares_kv:
            # Draft KV of drafts 1..k-1 is valid once they are accepted: the next
            # step's catch-up starts after the accepted ones (see _catch_up_batch).
            for i, st in enumerate(inputs.states):
                self._drafted[st.req_id] = (int(inputs.num_tokens[i]), int(num_drafts[i]))
        draft_probs = stack_probs(probs_steps, md, self.k)
        return Proposal(drafts, num_drafts, draft_probs)

    # ------------------------------------------------------------------ CUDA graphs
    def capture_graphs(self, sizes: list[int], pool, stream) -> None:  # type: ignore[no-untyped-def]
        """Capture one-token draft passes at the target's decode batch sizes, on the
        runner's buffers (padding rows write the sink block, as the target's graphs
        do); called by the runner's ``CUDAGraphRunner`` inside its capture."""
        r = self.runner
        for size in reversed(sizes):
            meta = r.buffers.prepare_capture(size, mixed=False, max_seq_len=r.max_model_len)
            for _ in range(2):  # warm-up: Triton compilation off-graph
                self.model.compute_logits(self._forward(size, meta))  # type: ignore[operator]
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                logits = self.model.compute_logits(self._forward(size, meta))  # type: ignore[operator]
            self._graphs[size] = (g, logits)

    def _decode_logits(self, rows: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Logits [n, V] of one draft token per row at ``positions`` (the input token
        is in the batch's token_ids): a captured graph when one fits, else eager."""
        r = self.runner
        n = len(rows)
        size = next((s for s in sorted(self._graphs) if s >= n), None)
        if size is None:
            return self.model.compute_logits(self._run(rows, positions, positions + 1))  # type: ignore[operator, no-any-return]
        order = np.argsort(rows, kind="stable")
        b_rows = rows[order]
        r.buffers.wait_for_copies()
        states, req_ids = r._batch_ids(b_rows, False)
        step = r.buffers.prepare(
            r.input_batch, b_rows, np.ones(n, dtype=np.int64), states, req_ids, False,
            GraphSizes([size], []), None, num_computed=positions[order],
        )  # fmt: skip
        assert step.graph_size == size
        graph, logits = self._graphs[size]
        graph.replay()
        self.num_graph_replays += 1
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        return logits[:n].index_select(0, torch.from_numpy(inverse).to(logits.device))

    def _run(self, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> torch.Tensor:
        """Draft forward over positions [starts[i], ends[i]) of each row, in passes of at
        most the runner's token budget (a long range is split over passes: each pass
        writes its KV before the next reads it). Returns the final hidden state at
        ``ends[i] - 1`` for each i, in input order."""
        r = self.runner
        ib = r.input_batch
        budget = r.max_num_tokens
        out: list[torch.Tensor | None] = [None] * len(rows)
        pending = list(zip(range(len(rows)), rows.tolist(), starts.tolist(), ends.tolist()))
        while pending:
            batch, used, rest = [], 0, []
            for i, row, a, b in pending:
                if used >= budget or len(batch) >= r.max_num_reqs:
                    rest.append((i, row, a, b))
                    continue
                take = min(b - a, budget - used)
                batch.append((i, row, a, a + take))
                used += take
                if a + take < b:
                    rest.append((i, row, a + take, b))
            batch.sort(key=lambda x: x[1])  # row order, as the batch builder wants
            b_rows = np.array([x[1] for x in batch], dtype=np.int64)
            b_start = np.array([x[2] for x in batch], dtype=np.int64)
            b_end = np.array([x[3] for x in batch], dtype=np.int64)
            r.buffers.wait_for_copies()
            states, req_ids = r._batch_ids(b_rows, False)
            step = r.buffers.prepare(
                ib, b_rows, b_end - b_start, states, req_ids, False, None, None,
                num_computed=b_start,
            )  # fmt: skip
            hidden = self._forward(step.num_tokens, step.attn_metadata)
            last = torch.from_numpy(step.query_start_loc[1:] - 1).to(hidden.device)
            h_last = hidden.index_select(0, last)
            for slot, (i, _, _, e) in enumerate(batch):
                if e == ends[i]:
                    out[i] = h_last[slot]
            pending = rest
        return torch.stack(out)  # type: ignore[arg-type]

    def _catch_up_batch(self, inputs: ProposeInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows and [start, end) positions of pass 1: the sampling requests up to and
        including their last known token (self_spec: that token alone) and, for a
        draft model, the step's other requests over the chunk the target computed."""
        ib = self.runner.input_batch
        step = inputs.step
        sampling = set(inputs.sample_idx.tolist())
        rows, starts, ends = [], [], []
        for b, st in enumerate(step.states):
            row = int(step.rows[b])
            if b in sampling:
                end = int(ib.num_known_tokens[row])
            elif self.shares_kv:
                continue  # the target wrote this chunk's KV for every layer
            else:
                end = int(step.seq_lens[b])
            if self.shares_kv:
                start = end - 1
            else:
                start = self._draft_start(st, int(step.num_computed[b]), end)
            # Never past the blocks the request holds (the scheduler may have had no
            # room for lookahead slots): a stale block-table entry is someone else's.
            end = min(end, int(ib.num_blocks[row]) * self.runner.block_size)
            if start >= end:
                continue
            rows.append(row)
            starts.append(start)
            ends.append(end)
        return (
            np.asarray(rows, dtype=np.int64),
            np.asarray(starts, dtype=np.int64),
            np.asarray(ends, dtype=np.int64),
        )

    def _draft_start(self, state: CachedRequestState, target_start: int, end: int) -> int:
        """Where the draft's valid KV of this request ends: what it caught up to, plus
        its own draft steps' KV for drafts the target accepted."""
        seen = self._computed.get(state.req_id)
        if seen is None or seen[0] is not state:
            # New to the draft, or resumed after preemption (a new state; its blocks
            # were freed): its KV is the target's prefix hit, which the draft computed
            # along with whoever computed it first.
            self._drafted.pop(state.req_id, None)
            return target_start
        done = seen[1]
        drafted = self._drafted.pop(state.req_id, None)
        if drafted is not None:
            t, nd = drafted
            if done == t:  # the draft's steps wrote drafts 1..nd-1 at t..t+nd-2
                accepted = end - 1 - t  # tokens known now past t, minus the sampled one
                done = t + max(min(accepted, nd - 1), 0)
        return min(done, end - 1)

    def remove(self, req_id: str) -> None:
        self._computed.pop(req_id, None)
        self._drafted.pop(req_id, None)


def build_draft_model_proposer(config: SpeculativeConfig, runner: ModelRunner) -> Proposer:
    arch = runner.arch_config
    if config.method == "self_spec":
        n = config.num_layers or max(arch.num_hidden_layers // 4, 1)
        if n > arch.num_hidden_layers:
            raise ValueError(
                f"speculative_config.num_layers ({n}) must be at most the target's "
                f"{arch.num_hidden_layers} decoder layers"
            )
        if runner.parallel.pp_size > 1:
            raise ValueError("speculative_config.method 'self_spec' needs one pipeline stage")
        logger.info(
            "self-speculation: drafting with the first %d of %d layers", n, arch.num_hidden_layers
        )
        return DraftModelProposer(config, runner, runner.model, n)
    from kvasir.models.loader import load_arch_config, load_model

    assert config.model is not None
    mc = ModelConfig(
        model=config.model, load_format=config.load_format, seed=runner.config.model_config.seed
    )
    try:
        draft_arch = load_arch_config(mc)
    except (OSError, ValueError) as e:
        raise ValueError(f"speculative_config.model {config.model!r}: {e}") from e
    if draft_arch.vocab_size != arch.vocab_size:
        raise ValueError(
            f"speculative_config.model {config.model!r} has a vocabulary of "
            f"{draft_arch.vocab_size} tokens, the target {arch.vocab_size}: a draft model "
            "must share the target's tokenizer"
        )
    if set(draft_arch.eos_token_id) != set(arch.eos_token_id) and draft_arch.eos_token_id:
        raise ValueError(
            f"speculative_config.model {config.model!r} has EOS ids "
            f"{list(draft_arch.eos_token_id)}, the target {list(arch.eos_token_id)}: a draft "
            "model must share the target's tokenizer"
        )
    _check_same_tokenizer(runner.config.model_config, mc)
    model = load_model(
        mc,
        draft_arch,
        runner.attn_backend_cls,
        runner.dtype,
        runner.device,
        runner.config.kernel_config,
        runner.parallel,
        runner.config.parallel_config,
    )
    logger.info(
        "draft model %s: %d layers, hidden %d", config.model, draft_arch.num_hidden_layers,
        draft_arch.hidden_size,
    )  # fmt: skip
    return DraftModelProposer(config, runner, model, None)


def _check_same_tokenizer(target: ModelConfig, draft: ModelConfig) -> None:
    """Both checkpoints' tokenizers map the same strings to the same ids (where both
    have one: dummy configs and bare weight directories have none)."""
    if "dummy" in (target.load_format, draft.load_format):
        return
    from kvasir.models.loader import load_tokenizer

    a, b = load_tokenizer(target), load_tokenizer(draft)
    if a is None or b is None:
        return  # nothing to compare beyond the vocabulary size and EOS ids
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise ValueError(
            f"speculative_config.model {draft.model!r} has another tokenizer than the "
            f"target (e.g. {diff}): a draft model must share the target's tokenizer"
        )
