"""Engine-core outputs -> user ``RequestOutput``s (client side: API server / LLMEngine).

Per engine-core output: detokenize, match stop strings (a match finishes the sequence
here and asks the caller to abort it in the core), convert logprobs, record timings.
Then per parent request, one ``RequestOutput`` in the request's output kind. A request
with ``n > 1`` is ``n`` engine-core requests ("children"); they are reported together.
No torch here: this runs next to the HTTP server.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from kvasir.core.outputs import EngineCoreOutput
from kvasir.engine.detokenizer import IncrementalDetokenizer
from kvasir.engine.logprobs import LogprobsProcessor, TokenTextCache, to_logprobs_list
from kvasir.outputs import (
    CompletionOutput,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
    RequestStats,
)
from kvasir.sampling_params import RequestOutputKind, SamplingParams


class OutputProcessorOutput(NamedTuple):
    request_outputs: list[RequestOutput]  # outputs of requests added without a queue
    reqs_to_abort: list[str]  # engine-core ids finished here (stop string): abort in core


class _ChildState:
    """One engine-core request (one of the n samples of a parent)."""

    __slots__ = (
        "request_id",
        "index",
        "parent",
        "detokenizer",
        "logprobs",
        "finish_reason",
        "stop_reason",
        "num_sent_tokens",
        "num_sent_logprobs",
        "last_token_time",
        "num_draft_tokens",
        "num_accepted_tokens",
        "pooled",
    )

    def __init__(
        self,
        request_id: str,
        index: int,
        parent: _ParentState,
        detokenizer: IncrementalDetokenizer,
        logprobs: LogprobsProcessor,
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.parent = parent
        self.detokenizer = detokenizer
        self.logprobs = logprobs
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_sent_tokens = 0  # DELTA: token ids already reported
        self.num_sent_logprobs = 0  # DELTA: logprob positions already reported
        self.last_token_time: float | None = None
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.pooled: list[float] | None = None  # embedding requests


class _ParentState:
    """One user request: prompt, params, its children and request-level timings."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        queue: Any,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.output_kind = params.output_kind
        self.queue = queue
        self.children: list[_ChildState] = []
        self.num_unfinished = 0
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.num_cached_tokens = 0
        # Prompt logprobs come from the first child that delivers them (all see one prompt).
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.prompt_logprobs_from: str | None = None
        self.prompt_logprobs_sent = False
        self.inter_token_latencies: list[float] = []


class OutputProcessor:
    """Turns ``EngineCoreOutput`` batches into ``RequestOutput``s.

    ``add_request`` registers a parent request and the engine-core ids of its samples;
    outputs for unknown (aborted or finished) core ids are ignored. A request added with
    a ``queue`` gets its outputs through ``queue.put_nowait``; the others are returned
    from ``process_outputs``.
    """

    def __init__(self, tokenizer: Any, log_stats: bool = False) -> None:
        self.tokenizer = tokenizer
        self.log_stats = log_stats
        self._token_texts = TokenTextCache(tokenizer)
        self._parents: dict[str, _ParentState] = {}
        self._children: dict[str, _ChildState] = {}  # engine-core id -> unfinished child

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        child_request_ids: list[str],
        queue: object | None = None,
    ) -> None:
        """``child_request_ids``: the engine-core ids of the n samples, in index order."""
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not child_request_ids or any(c in self._children for c in child_request_ids):
            raise ValueError(f"child_request_ids {child_request_ids!r} must be new and non-empty")
        parent = _ParentState(request_id, prompt, prompt_token_ids, params, arrival_time, queue)
        for index, child_id in enumerate(child_request_ids):
            child = _ChildState(
                child_id,
                index,
                parent,
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
                LogprobsProcessor(self._token_texts, _num_logprobs(params), None),
            )
            parent.children.append(child)
            self._children[child_id] = child
        parent.num_unfinished = len(child_request_ids)
        self._parents[request_id] = parent

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ---------------------------------------------------------------- outputs

    def process_outputs(
        self, outputs: list[EngineCoreOutput], now: float | None = None
    ) -> OutputProcessorOutput:
        """``now``: wall-clock time of this batch (default ``time.time()``)."""
        now = time.time() if now is None else now
        reqs_to_abort: list[str] = []
        # parent id -> {core id: child} of the children with news in this batch
        touched: dict[str, dict[str, _ChildState]] = {}
        for out in outputs:
            child = self._children.get(out.request_id)
            if child is None:
                continue  # aborted, or finished here on a stop string
            parent = child.parent
            self._record_timings(parent, child, out, now)

            finish_reason, stop_reason = out.finish_reason, out.stop_reason
            # The core finishes with "stop" only on EOS / stop token ids (strings are ours).
            stop_terminated = finish_reason == "stop" and not isinstance(stop_reason, str)
            stop_string = child.detokenizer.update(out.new_token_ids, stop_terminated)
            if stop_string is not None:
                finish_reason, stop_reason = "stop", stop_string
                if not out.finished:
                    reqs_to_abort.append(child.request_id)

            child.logprobs.update_from_output(out)
            if out.pooled_output is not None:
                child.pooled = out.pooled_output
            if out.new_prompt_logprobs and parent.prompt_logprobs is not None:
                if parent.prompt_logprobs_from in (None, child.request_id):
                    parent.prompt_logprobs_from = child.request_id
                    parent.prompt_logprobs.extend(
                        to_logprobs_list(out.new_prompt_logprobs, self._token_texts)
                    )

            if finish_reason is not None:
                child.finish_reason, child.stop_reason = finish_reason, stop_reason
                parent.num_unfinished -= 1
                del self._children[child.request_id]
            touched.setdefault(parent.request_id, {})[child.request_id] = child

        request_outputs: list[RequestOutput] = []
        for parent_id, children in touched.items():
            parent = self._parents[parent_id]
            finished = parent.num_unfinished == 0
            if finished:
                parent.metrics.finished_time = now
                del self._parents[parent_id]
            request_output = self._make_request_output(parent, children.values(), finished)
            if request_output is None:
                continue
            if parent.queue is not None:
                parent.queue.put_nowait(request_output)  # type: ignore[attr-defined]
            else:
                request_outputs.append(request_output)
        return OutputProcessorOutput(request_outputs, reqs_to_abort)

    def _record_timings(
        self, parent: _ParentState, child: _ChildState, out: EngineCoreOutput, now: float
    ) -> None:
        metrics = parent.metrics
        if out.first_scheduled_time is not None and (
            metrics.first_scheduled_time is None
            or out.first_scheduled_time < metrics.first_scheduled_time
        ):
            metrics.first_scheduled_time = out.first_scheduled_time
        if out.num_preemptions > metrics.num_preemptions:
            metrics.num_preemptions = out.num_preemptions
        if out.num_cached_tokens > parent.num_cached_tokens:
            parent.num_cached_tokens = out.num_cached_tokens
        if out.num_draft_tokens > child.num_draft_tokens:  # cumulative per sequence
            child.num_draft_tokens = out.num_draft_tokens
            child.num_accepted_tokens = out.num_accepted_tokens
            metrics.num_draft_tokens = sum(c.num_draft_tokens for c in parent.children)
            metrics.num_accepted_tokens = sum(c.num_accepted_tokens for c in parent.children)
        if out.new_token_ids:
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            if self.log_stats and child.last_token_time is not None:
                parent.inter_token_latencies.append(now - child.last_token_time)
            child.last_token_time = now
            metrics.last_token_time = now

    def _make_request_output(
        self,
        parent: _ParentState,
        touched: Iterable[_ChildState],
        finished: bool,
        abort: bool = False,
    ) -> RequestOutput | None:
        kind = parent.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if kind == RequestOutputKind.DELTA:
            completions = []
            for child in sorted(touched, key=lambda c: c.index):
                completion = _completion(child, delta=True, abort=abort)
                if completion.text or completion.token_ids or completion.finish_reason:
                    completions.append(completion)
            if not completions and not finished:
                return None
        else:
            # CUMULATIVE and FINAL_ONLY report every sample, in index order.
            completions = [_completion(c, delta=False, abort=abort) for c in parent.children]
        extra: dict = {}
        if parent.params.num_candidates > parent.params.n:
            extra["num_candidate_tokens"] = sum(len(c.token_ids) for c in completions)
            completions = _best_of(completions, parent.params)

        prompt_logprobs = None
        if parent.prompt_logprobs is not None and not parent.prompt_logprobs_sent:
            # Complete once every prompt position is in, or once sampling has begun
            # (the prompt was fully processed then, whatever the core delivered).
            prompt_logprobs = parent.prompt_logprobs
            if len(prompt_logprobs) >= len(parent.prompt_token_ids) or any(
                c.detokenizer.token_ids or c.finish_reason for c in parent.children
            ):
                # DELTA reports them once; the other kinds carry them on every output.
                parent.prompt_logprobs_sent = kind == RequestOutputKind.DELTA
            else:
                prompt_logprobs = None
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
            metrics=parent.metrics,
            stats=self._make_stats(parent, abort) if finished and self.log_stats else None,
            extra=extra,
            pooled_output=parent.children[0].pooled,
        )

    def _make_stats(self, parent: _ParentState, abort: bool) -> RequestStats:
        m = parent.metrics
        finished_time = m.finished_time if m.finished_time is not None else time.time()

        def span(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else end - start

        return RequestStats(
            num_prompt_tokens=len(parent.prompt_token_ids),
            num_generation_tokens=sum(c.detokenizer.num_output_tokens for c in parent.children),
            num_cached_tokens=parent.num_cached_tokens,
            num_preemptions=m.num_preemptions,
            finish_reasons=[c.finish_reason or ("abort" if abort else "") for c in parent.children],
            e2e_latency=finished_time - m.arrival_time,
            queue_time=span(m.arrival_time, m.first_scheduled_time),
            time_to_first_token=span(m.arrival_time, m.first_token_time),
            prefill_time=span(m.first_scheduled_time, m.first_token_time),
            decode_time=span(m.first_token_time, m.last_token_time),
            inference_time=span(m.first_scheduled_time, m.last_token_time),
            inter_token_latencies=parent.inter_token_latencies,
        )

    # ---------------------------------------------------------------- aborts

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Drop requests (parent ids, or engine-core ids of single samples) and return
        the engine-core ids the caller must abort in the core. Unknown ids are ignored."""
        core_ids: list[str] = []
        for request_id in request_ids:
            parent = self._parents.pop(request_id, None)
            if parent is not None:
                for child in parent.children:
                    if self._children.pop(child.request_id, None) is not None:
                        core_ids.append(child.request_id)
                continue
            sample = self._children.pop(request_id, None)
            if sample is None:
                continue
            core_ids.append(request_id)
            sample.finish_reason = "abort"
            sample.parent.num_unfinished -= 1
            if sample.parent.num_unfinished == 0:
                self._parents.pop(sample.parent.request_id, None)
        return core_ids

    def finish_aborted(self, request_id: str) -> RequestOutput | None:
        """The final output of a request about to be aborted: unfinished samples get
        finish_reason "abort" (DELTA: with the text still held back). Call it before
        ``abort_requests``, which drops the request; ``None`` for unknown ids. Nothing is
        put on the request's queue: the caller decides where the output goes."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        parent.metrics.finished_time = time.time()
        unfinished = [c for c in parent.children if c.finish_reason is None]
        return self._make_request_output(parent, unfinished, finished=True, abort=True)


def _completion(child: _ChildState, delta: bool, abort: bool) -> CompletionOutput:
    """The child's output so far (``delta``: only what was not reported before)."""
    finish_reason = child.finish_reason
    if finish_reason is None and abort:
        finish_reason = "abort"
    detokenizer = child.detokenizer
    text = detokenizer.get_next_output_text(finish_reason is not None, delta)
    all_logprobs = child.logprobs.logprobs
    if delta:
        token_ids = detokenizer.token_ids[child.num_sent_tokens :]
        child.num_sent_tokens += len(token_ids)
        logprobs = None
        if all_logprobs is not None:
            logprobs = all_logprobs[child.num_sent_logprobs :]
            child.num_sent_logprobs += len(logprobs)
    else:
        token_ids = list(detokenizer.token_ids)
        logprobs = list(all_logprobs) if all_logprobs is not None else None
    return CompletionOutput(
        index=child.index,
        text=text,
        token_ids=token_ids,
        cumulative_logprob=child.logprobs.cumulative_logprob,
        logprobs=logprobs,
        finish_reason=finish_reason,
        stop_reason=child.stop_reason,
    )


def _num_logprobs(params: SamplingParams) -> int | None:
    # best_of ranks candidates by cumulative logprob: track it even when not asked for.
    if params.logprobs is None and params.num_candidates > params.n:
        return 0
    return params.logprobs


def _best_of(completions: list[CompletionOutput], params: SamplingParams) -> list[CompletionOutput]:
    """The n candidates with the highest cumulative logprob, re-indexed 0..n-1 in that
    order (logprobs dropped when the request did not ask for them)."""
    ranked = sorted(
        completions,
        key=lambda c: -math.inf if c.cumulative_logprob is None else c.cumulative_logprob,
        reverse=True,
    )
    out = []
    for i, c in enumerate(ranked[: params.n]):
        c.index = i
        if params.logprobs is None:
            c.logprobs = None
        out.append(c)
    return out
