"""``fcfs`` and ``priority``: kvasir's original policies, unchanged."""

from __future__ import annotations

from kvasir.core.policies.base import SchedulingPolicy
from kvasir.core.request import Request
from kvasir.core.request_queue import FCFSRequestQueue, PriorityRequestQueue, RequestQueue


class FCFSPolicy(SchedulingPolicy):
    """Arrival order; the latest admitted running request is preempted first."""

    name = "fcfs"

    def make_queue(self) -> RequestQueue:
        return FCFSRequestQueue()

    def select_victim(self, candidates: list[Request]) -> Request:
        return candidates[-1]


class PriorityPolicy(SchedulingPolicy):
    """Lowest ``priority`` first, then arrival; the victim is the largest ``priority``,
    then the latest arrival."""

    name = "priority"

    def make_queue(self) -> RequestQueue:
        return PriorityRequestQueue()

    def select_victim(self, candidates: list[Request]) -> Request:
        return max(candidates, key=lambda r: (r.priority, r.arrival_time, r.arrival_seq))
