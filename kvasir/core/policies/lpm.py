"""``lpm``: longest prefix-cache match first (as SGLang admits), with the age bound.

Admitting requests whose prompts are already in the cache first serves them from it
before other admissions evict those blocks, and prefills less. Ranking looks up every
waiting request's cached prefix once per step; beyond ``MAX_RANKED`` waiting requests
the rest keep arrival order (the cost of ranking would outgrow what it saves).
"""

from __future__ import annotations

from kvasir.core.policies.base import AgedPolicy
from kvasir.core.request import Request

MAX_RANKED = 512


class LPMPolicy(AgedPolicy):
    name = "lpm"

    def begin_step(self, now: float) -> None:
        super().begin_step(now)
        self._hits: dict[str, int] = {}
        queue = self._queue
        if self.kv.enable_caching and len(queue) <= MAX_RANKED:
            for request in queue._items:
                _, num_hit = self.kv.get_computed_blocks(request, record_stats=False)
                self._hits[request.request_id] = num_hit

    def order_key(self, request: Request) -> tuple:
        return (-self._hits.get(request.request_id, 0),)

    def select_victim(self, candidates: list[Request]) -> Request:
        return candidates[-1]
