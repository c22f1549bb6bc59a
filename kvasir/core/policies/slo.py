"""``slo``: deadlines from each request's SLOs, and admission control for batch work.

A request's class (``service_tier``: interactive / batch) gives default SLOs
(``SchedulerConfig.*_slo_ms``); its own ``ttft_slo_ms`` / ``tpot_slo_ms`` win.

* **Admission, earliest deadline first**: waiting requests by ``arrival + ttft_slo``
  (none: after every deadline), the age bound first.
* **Decodes near their TPOT bound in every step**: running decodes get the budget
  first, least TPOT slack first; and a step that carries a decode with a TPOT bound
  carries at most as many tokens as the step-time model says fit in
  ``SAFETY * tpot_slo`` (``step_time_bound_s``), so prefill rides along without
  stalling the decodes.
* **Batch requests never take what running interactive requests need**: a batch
  request is deferred while admitting it would leave fewer free KV blocks than the
  running interactive requests need to reach their ``max_tokens`` (a preemption would
  make them miss), and a running batch prefill chunk leaves room in the step for the
  interactive prompts waiting to be admitted. With ``slo_max_batch_wait_s`` a batch
  request whose estimated wait is longer is rejected at arrival (HTTP 429 with
  ``Retry-After``) instead of queued.
* **Victims**: the latest batch request, then the latest interactive one.
"""

from __future__ import annotations

import math

from kvasir.core.kv_cache_manager import cdiv
from kvasir.core.policies.base import Admission, AgedPolicy, RequestRejected, StepState
from kvasir.core.request import Request
from kvasir.core.sched_stats import BATCH, INTERACTIVE

SAFETY = 0.9  # share of a TPOT bound a step may take (the model is an estimate)


def _deadline(request: Request) -> float:
    if request.ttft_slo_ms is None:
        return math.inf
    return request.arrival_time + request.ttft_slo_ms / 1000


def _decoding(request: Request) -> bool:
    return request.num_computed_tokens >= request.num_prompt_tokens


class SLOPolicy(AgedPolicy):
    name = "slo"

    def order_key(self, request: Request) -> tuple:
        return (_deadline(request),)

    def on_add(self, request: Request) -> None:
        bound, model = self.config.slo_max_batch_wait_s, self.step_time_model
        if request.service_tier != BATCH or bound is None or model is None:
            return
        budget = self.config.max_num_batched_tokens
        tokens_ahead = sum(r.num_tokens for r in self._queue._items) + request.num_tokens
        wait_s = tokens_ahead / budget * model.predict(budget)
        if wait_s > bound:
            raise RequestRejected(
                f"request {request.request_id!r} rejected: batch work queued ahead of it "
                f"would take about {wait_s:.1f} s (slo_max_batch_wait_s={bound})",
                retry_after_s=max(wait_s - bound, 1.0),
            )

    def admit(
        self, request: Request, num_new_tokens: int, state: StepState
    ) -> tuple[Admission, str]:
        if self.is_aged(request):
            return Admission.ADMIT, "aged"
        if request.service_tier != BATCH:
            return Admission.ADMIT, "edf"
        bs = state.block_size
        reserve = 0
        for r in state.running:
            if r.service_tier == INTERACTIVE and r.max_tokens is not None:
                held = len(state.kv.get_block_ids(r.request_id))
                reserve += max(cdiv(r.num_prompt_tokens + r.max_tokens, bs) - held, 0)
        need = cdiv(request.num_tokens + num_new_tokens + 1, bs)  # an upper bound
        if reserve and state.kv.num_free_blocks - need < reserve:
            return Admission.DEFER, "kv_reserved_for_interactive"
        return Admission.ADMIT, "edf"

    def cap_chunk(self, request: Request, num_new_tokens: int, state: StepState) -> int:
        if request.service_tier != BATCH or _decoding(request) or self.is_aged(request):
            return num_new_tokens
        # Leave room for the interactive prompts that can be admitted this step.
        free_blocks, seats = state.kv.num_free_blocks, state.max_num_seqs - len(state.running)
        reserve = 0
        for r in self._queue._items:
            if seats <= 0:
                break
            if r.service_tier != INTERACTIVE:
                continue
            free_blocks -= cdiv(r.num_tokens + 1, state.block_size)
            if free_blocks < 0:
                break
            seats -= 1
            reserve += r.num_tokens
        return max(min(num_new_tokens, state.token_budget - reserve), 0)

    def order_running(self, running: list[Request]) -> list[Request]:
        now = self.now

        def key(r: Request) -> tuple:
            if _decoding(r):
                if r.tpot_slo_ms is None:
                    return (0, math.inf)
                last = r.last_token_time if r.last_token_time is not None else now
                return (0, last + r.tpot_slo_ms / 1000 - now)  # slack
            return (1, _deadline(r))

        return sorted(running, key=key)

    def step_time_bound_s(self, running: list[Request]) -> float | None:
        bounds = [r.tpot_slo_ms for r in running if r.tpot_slo_ms is not None and _decoding(r)]
        return SAFETY * min(bounds) / 1000 if bounds else None

    def select_victim(self, candidates: list[Request]) -> Request:
        return max(candidates, key=lambda r: (r.service_tier == BATCH, r.arrival_seq))
