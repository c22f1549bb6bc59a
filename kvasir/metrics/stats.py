"""Per-request and per-iteration statistics, computed on the server side from the
engine core's output stream (plain Python: no prometheus, no torch).

Times are wall-clock (``time.time()``), as stamped by the server when an output batch
arrives, so TTFT and inter-token latency include the hop from the core process - what
a client actually sees, minus the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvasir.core.outputs import EngineCoreOutput


@dataclass
class FinishedRequestStats:
    """One finished sequence (a request, or one of the n samples of a request)."""

    request_id: str  # the engine-core id (== the API request id when n == 1)
    parent_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    num_cached_tokens: int
    e2e_latency: float
    queued_time: float | None
    prefill_time: float | None
    decode_time: float | None
    ttft: float | None
    num_preemptions: int
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Engine-side timestamps (time.time() of the core's output batches) for traces.
    first_scheduled_time: float | None = None
    first_token_engine_time: float | None = None
    last_token_engine_time: float | None = None
    finished_time: float = 0.0  # server wall clock when the server saw it finish
    # (engine time, reason) of each preemption the core reported.
    preemptions: list[tuple[float, str]] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (decode time / (tokens - 1))."""
        if self.decode_time is None or self.num_generation_tokens < 2:
            return None
        return self.decode_time / (self.num_generation_tokens - 1)

    def to_log_dict(self) -> dict:
        """The structured (JSON) log record of this request."""

        def ms(x: float | None) -> float | None:
            return None if x is None else round(x * 1000.0, 3)

        return {
            "event": "request_finished",
            "request_id": self.parent_id,
            "seq_id": self.request_id,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_generation_tokens,
            "cached_tokens": self.num_cached_tokens,
            "e2e_ms": ms(self.e2e_latency),
            "queue_ms": ms(self.queued_time),
            "ttft_ms": ms(self.ttft),
            "prefill_ms": ms(self.prefill_time),
            "decode_ms": ms(self.decode_time),
            "tpot_ms": ms(self.tpot),
            "num_preemptions": self.num_preemptions,
            **(
                {
                    "spec_draft_tokens": self.num_draft_tokens,
                    "spec_accepted_tokens": self.num_accepted_tokens,
                    "spec_acceptance_rate": round(
                        self.num_accepted_tokens / self.num_draft_tokens, 4
                    ),
                }
                if self.num_draft_tokens
                else {}
            ),
        }


@dataclass
class IterationStats:
    """What one batch of engine-core outputs contributed."""

    num_prompt_tokens: int = 0  # prompts whose first token arrived in this batch
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


@dataclass
class _SeqState:
    parent_id: str
    arrival_time: float
    num_prompt_tokens: int  # 0 for forked samples: they share the first sample's prefill
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    first_token_engine_time: float | None = None
    last_token_engine_time: float | None = None
    preemptions: list[tuple[float, str]] | None = None


class RequestStatsTracker:
    """Tracks every in-flight engine-core sequence and turns output batches into
    ``IterationStats`` (counters, latencies, finished requests)."""

    def __init__(self) -> None:
        self._seqs: dict[str, _SeqState] = {}

    def add_request(
        self, request_id: str, parent_id: str, arrival_time: float, num_prompt_tokens: int
    ) -> None:
        self._seqs[request_id] = _SeqState(parent_id, arrival_time, num_prompt_tokens)

    def __len__(self) -> int:
        return len(self._seqs)

    def record_preemptions(self, request_ids: list[str], reasons: list[str], when: float) -> None:
        """Preemptions the core reported for a step (kept for the requests' traces)."""
        for rid, reason in zip(request_ids, reasons, strict=True):
            s = self._seqs.get(rid)
            if s is not None:
                if s.preemptions is None:
                    s.preemptions = []
                s.preemptions.append((when, reason))

    def update(
        self, outputs: list[EngineCoreOutput], now: float, engine_time: float | None = None
    ) -> IterationStats:
        """``engine_time``: when the core sent these outputs (default ``now``)."""
        it = IterationStats()
        et = now if engine_time is None else engine_time
        for out in outputs:
            s = self._seqs.get(out.request_id)
            if s is None:  # aborted by us after the core produced this output
                continue
            if out.first_scheduled_time is not None and s.first_scheduled_time is None:
                s.first_scheduled_time = out.first_scheduled_time
            s.num_preemptions = max(s.num_preemptions, out.num_preemptions)
            if out.num_cached_tokens:
                s.num_cached_tokens = out.num_cached_tokens
            if out.num_draft_tokens:  # cumulative per sequence
                s.num_draft_tokens = out.num_draft_tokens
                s.num_accepted_tokens = out.num_accepted_tokens
            n = len(out.new_token_ids)
            if n:
                if s.first_token_time is None:
                    s.first_token_time = now
                    s.first_token_engine_time = et
                    it.time_to_first_tokens.append(now - s.arrival_time)
                    it.num_prompt_tokens += s.num_prompt_tokens
                else:
                    assert s.last_token_time is not None
                    it.inter_token_latencies.append(now - s.last_token_time)
                s.last_token_time = now
                s.last_token_engine_time = et
                s.num_generation_tokens += n
                it.num_generation_tokens += n
            if out.finish_reason is not None:
                it.finished.append(self._finish(out.request_id, out.finish_reason, now))
        return it

    def finish(
        self, request_ids: list[str], finish_reason: str, now: float
    ) -> list[FinishedRequestStats]:
        """Requests the server ended itself (client gone or drain: "abort"; a stop
        string: "stop"): the core sends nothing more for them."""
        return [self._finish(rid, finish_reason, now) for rid in request_ids if rid in self._seqs]

    def _finish(self, request_id: str, finish_reason: str, now: float) -> FinishedRequestStats:
        s = self._seqs.pop(request_id)
        sched = s.first_scheduled_time
        first = s.first_token_time
        return FinishedRequestStats(
            request_id=request_id,
            parent_id=s.parent_id,
            finish_reason=finish_reason,
            num_prompt_tokens=s.num_prompt_tokens,
            num_generation_tokens=s.num_generation_tokens,
            num_cached_tokens=s.num_cached_tokens,
            e2e_latency=now - s.arrival_time,
            queued_time=None if sched is None else max(sched - s.arrival_time, 0.0),
            prefill_time=None if sched is None or first is None else max(first - sched, 0.0),
            decode_time=None
            if first is None or s.last_token_time is None
            else s.last_token_time - first,
            ttft=None if first is None else first - s.arrival_time,
            num_preemptions=s.num_preemptions,
            num_draft_tokens=s.num_draft_tokens,
            num_accepted_tokens=s.num_accepted_tokens,
            first_scheduled_time=sched,
            first_token_engine_time=s.first_token_engine_time,
            last_token_engine_time=s.last_token_engine_time,
            finished_time=now,
            preemptions=s.preemptions or [],
        )
