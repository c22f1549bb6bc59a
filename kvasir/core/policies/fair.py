"""``fair``: virtual token counters across tenants (VTC, Sheng et al., OSDI '24).

Each tenant's counter is the service it got: ``fair_prompt_weight`` per prompt token
and ``fair_output_weight`` per output token computed for it. The least-served tenant's
requests are admitted first and get the step's token budget first; the most-served
tenant's latest request is preempted first. Two rules bound the gap between backlogged
tenants by a constant (one request's cost plus a step's budget), however much one of
them floods:

* a tenant only gains service while it is served, so a flood only grows the flooding
  tenant's counter;
* a tenant that had nothing queued (idle) has its counter lifted, on its next arrival,
  to the lowest counter of the tenants still backlogged: time spent idle is not credit
  to spend later as a burst.
"""

from __future__ import annotations

from kvasir.config import SchedulerConfig
from kvasir.core.kv_cache_manager import KVCacheManager
from kvasir.core.policies.base import AgedPolicy
from kvasir.core.request import Request
from kvasir.core.sched_stats import DEFAULT_TENANT


class FairPolicy(AgedPolicy):
    name = "fair"

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        super().__init__(config, kv)
        self.counters: dict[str, float] = {}  # tenant -> weighted tokens served
        self._backlog: dict[str, int] = {}  # tenant -> unfinished requests

    def counter(self, request: Request) -> float:
        return self.counters.get(request.tenant or DEFAULT_TENANT, 0.0)

    def on_add(self, request: Request) -> None:
        tenant = request.tenant or DEFAULT_TENANT
        if not self._backlog.get(tenant):
            active = [self.counters[t] for t, n in self._backlog.items() if n and t != tenant]
            floor = min(active) if active else max(self.counters.values(), default=0.0)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._backlog[tenant] = self._backlog.get(tenant, 0) + 1

    def on_finished(self, request: Request) -> None:
        tenant = request.tenant or DEFAULT_TENANT
        left = self._backlog.get(tenant, 0) - 1
        if left > 0:
            self._backlog[tenant] = left
        else:
            self._backlog.pop(tenant, None)

    def on_scheduled(self, request: Request, num_new_tokens: int, computed_before: int) -> None:
        end = computed_before + num_new_tokens
        num_prompt = max(min(end, request.num_prompt_tokens) - computed_before, 0)
        num_output = num_new_tokens - num_prompt
        cfg = self.config
        tenant = request.tenant or DEFAULT_TENANT
        cost = cfg.fair_prompt_weight * num_prompt + cfg.fair_output_weight * num_output
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost
        self._queue.invalidate()  # the least-served tenant may have changed

    def order_key(self, request: Request) -> tuple:
        return (self.counter(request),)

    def order_running(self, running: list[Request]) -> list[Request]:
        # Stable: within a tenant, admission order.
        return sorted(running, key=self.counter)

    def select_victim(self, candidates: list[Request]) -> Request:
        return max(candidates, key=lambda r: (self.counter(r), r.arrival_seq))
