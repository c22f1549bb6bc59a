"""The engine core's side of structured outputs: compilation off the hot loop, one
matcher per request, and the step's token bitmask.

Contract with the scheduler (``kvasir.core.scheduler``; it sees only the duck-typed
``GrammarState`` methods, never xgrammar or torch):

- a waiting request whose ``structured_output.is_ready()`` is False is skipped (it stays
  at its place in the queue; everyone else is scheduled as usual);
- ``accept_tokens`` advances the matcher by the tokens a step produced (accepted drafts
  plus one), so the matcher always sits at the end of the request's known tokens;
- ``validate_tokens`` cuts a request's proposed drafts at the first one the grammar
  refuses (nothing is advanced);
- ``is_terminated()``: the grammar is complete and its stop token accepted.

``fill_bitmask`` runs once per step after ``schedule()``: for every constrained request
that samples it writes ``1 + len(drafts)`` rows, row ``j`` being the mask after drafts
``0..j-1`` (the matcher advances over the drafts and rolls back after), in
``SchedulerOutput.num_scheduled_tokens`` order, and records each request's first row in
``SchedulerOutput.structured_output_request_ids``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from kvasir.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from kvasir.core.outputs import SchedulerOutput
    from kvasir.core.request import Request
    from kvasir.structured_output.backend import XgrammarBackend

logger = logging.getLogger(__name__)


class GrammarState:
    """One request's grammar: the compile future, then its matcher."""

    def __init__(self, future: Future, submitted: float) -> None:
        self._future = future
        self._matcher: Any = None
        self.error: str | None = None
        self.submitted = submitted
        self.compile_wait_s: float | None = None  # submit -> ready, set when first ready

    def is_ready(self) -> bool:
        if self._matcher is not None or self.error is not None:
            return True
        if not self._future.done():
            return False
        self.compile_wait_s = time.perf_counter() - self.submitted
        try:
            compiled, backend = self._future.result()
            self._matcher = backend.matcher(compiled)
        except Exception as e:  # validated at the edge: a backend limit, not bad input
            self.error = f"{type(e).__name__}: {e}"
        return True

    @property
    def matcher(self) -> Any:
        return self._matcher

    def accept_tokens(self, token_ids: list[int]) -> None:
        m = self._matcher
        if m is None:
            return
        for t in token_ids:
            if m.is_terminated():
                return  # ignore_eos past the end: nothing more to constrain
            if not m.accept_token(t):
                # Only a token the mask allowed is ever sampled; log rather than crash.
                logger.warning("structured output: token %d refused by the grammar", t)
                return

    def validate_tokens(self, token_ids: list[int]) -> list[int]:
        m = self._matcher
        if m is None or not token_ids:
            return [] if m is None else token_ids
        num_ok = 0
        for t in token_ids:
            if m.is_terminated() or not m.accept_token(t):
                break
            num_ok += 1
        if num_ok:
            m.rollback(num_ok)
        return token_ids[:num_ok]

    def is_terminated(self) -> bool:
        return self._matcher is not None and bool(self._matcher.is_terminated())


class StructuredOutputManager:
    """Compiles grammars on one worker thread and fills each step's bitmask.

    The backend (tokenizer info, compiler) is built on that thread too, at the first
    constrained request: engines that never see one pay nothing.
    """

    def __init__(self, make_backend: Any, vocab_size: int) -> None:
        self._make_backend = make_backend
        self._backend: XgrammarBackend | None = None
        self.vocab_size = vocab_size
        self.num_words = (vocab_size + 31) // 32
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvasir-grammar")
        self._futures: dict[tuple[str, str], Future] = {}
        self._states: dict[str, GrammarState] = {}  # request id -> state
        self._bitmask = np.zeros((0, self.num_words), dtype=np.int32)
        self._last_state: GrammarState | None = None
        self._batch_matcher: Any = None  # xgrammar.BatchGrammarMatcher, at the first fill

    def _compile(self, params: StructuredOutputsParams) -> tuple[Any, XgrammarBackend]:
        if self._backend is None:
            self._backend = self._make_backend()
        assert self._backend is not None
        return self._backend.compile(params), self._backend

    def add_request(self, request_id: str, params: StructuredOutputsParams) -> GrammarState:
        import json

        key = (params.kind, json.dumps(params.spec, sort_keys=True))
        future = self._futures.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._executor.submit(self._compile, params)
            self._futures[key] = future
        state = GrammarState(future, time.perf_counter())
        self._states[request_id] = state
        self._last_state = state  # benchmarks read its compile_wait_s
        return state

    def remove_finished(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._states.pop(rid, None)

    @property
    def num_active(self) -> int:
        return len(self._states)

    def take_failed(self) -> list[tuple[str, str]]:
        """(request id, error) of requests whose grammar failed to compile."""
        failed = [(rid, st.error) for rid, st in self._states.items() if st.error is not None]
        for rid, _ in failed:
            del self._states[rid]
        return failed  # type: ignore[return-value]

    def fill_bitmask(self, so: SchedulerOutput, requests: dict[str, Request]) -> None:
        import torch

        rows: dict[str, int] = {}
        num_rows = 0
        spec = so.scheduled_spec_decode_tokens
        for rid in so.num_scheduled_tokens:
            req = requests.get(rid)
            st = self._states.get(rid)
            if req is None or st is None or st.matcher is None:
                continue
            drafts = spec.get(rid, [])
            if req.num_computed_tokens - len(drafts) < req.num_tokens:
                continue  # a prefill chunk short of the end samples nothing
            rows[rid] = num_rows
            num_rows += 1 + len(drafts)
        if not rows:
            return
        if self._bitmask.shape[0] < num_rows:
            self._bitmask = np.zeros(
                (max(num_rows, 2 * self._bitmask.shape[0]), self.num_words), dtype=np.int32
            )
        bitmask = torch.from_numpy(self._bitmask)  # shares memory: xgrammar fills in place
        # Requests without drafts (every one, without speculation): one batched fill,
        # which xgrammar spreads over its threads; terminated ones are unconstrained.
        batch, batch_rows = [], []
        for rid, row in rows.items():
            if spec.get(rid):
                continue
            matcher = self._states[rid].matcher
            if matcher.is_terminated():
                bitmask[row].fill_(-1)
            else:
                batch.append(matcher)
                batch_rows.append(row)
        if batch:
            if self._batch_matcher is None:
                import xgrammar as xgr

                self._batch_matcher = xgr.BatchGrammarMatcher()
            self._batch_matcher.batch_fill_next_token_bitmask(batch, bitmask, batch_rows)
        for rid, row in rows.items():
            drafts = spec.get(rid, [])
            if not drafts:
                continue
            matcher = self._states[rid].matcher
            num_advanced = 0
            for j in range(len(drafts) + 1):
                if matcher.is_terminated():
                    bitmask[row + j].fill_(-1)  # past the stop token: unconstrained
                else:
                    matcher.fill_next_token_bitmask(bitmask, row + j)
                if j < len(drafts) and not matcher.is_terminated():
                    if matcher.accept_token(drafts[j]):
                        num_advanced += 1
            if num_advanced:
                matcher.rollback(num_advanced)
        so.grammar_bitmask = self._bitmask[:num_rows].tobytes()
        so.structured_output_request_ids = rows

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
