"""Per-step timing that the engine core records and ships with the step's outputs.

The core only stamps clocks and counts here (a few ``perf_counter`` calls per step); it
never talks to an exporter. The API server turns ``StepStats`` into Prometheus
histograms and OpenTelemetry span events (``kvasir.metrics``, ``kvasir.observability``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from kvasir.core.outputs import SchedulerOutput
    from kvasir.core.scheduler import Scheduler

# Why a request was preempted. The scheduler preempts (by recompute) only when a running
# request cannot get KV blocks; with the priority policy the victim is the
# lowest-priority request, so a victim of lower priority than someone this step runs
# was preempted *for* that request ("priority"); otherwise it is plain KV pressure.
PREEMPTION_REASONS = ("kv_cache_full", "priority")


class StepStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """One engine step. Durations in seconds (``perf_counter``), ``start_time`` wall
    clock (``time.time()``) like the other engine timestamps.

    With async scheduling or pipeline parallelism, ``execute_s`` is the launch plus the
    wait for the step(s) read back in this call, and the batch counts are those of the
    step launched in it.
    """

    start_time: float
    schedule_s: float
    execute_s: float
    update_s: float
    num_reqs: int = 0  # requests in the batch
    num_tokens: int = 0  # tokens in the batch
    preempted_req_ids: list[str] = []
    preemption_reasons: list[str] = []  # one per preempted request, PREEMPTION_REASONS
    # Sampled KV-block residency (``--kv-cache-metrics``): seconds, one per observation.
    kv_block_lifetimes: list[float] = []
    kv_block_idle_before_evict: list[float] = []
    kv_block_reuse_gaps: list[float] = []


def make_step_stats(
    scheduler: Scheduler,
    so: SchedulerOutput | None,
    start_time: float,
    schedule_s: float,
    execute_s: float,
    update_s: float,
) -> StepStats:
    st = StepStats(start_time, schedule_s, execute_s, update_s)
    if so is None:
        return st
    st.num_reqs = len(so.num_scheduled_tokens)
    st.num_tokens = so.total_num_scheduled_tokens
    if so.preempted_req_ids:  # rare: the reason is worked out only here
        st.preempted_req_ids = sorted(so.preempted_req_ids)
        st.preemption_reasons = [
            preemption_reason(scheduler, so, rid) for rid in st.preempted_req_ids
        ]
    return st


def preemption_reason(scheduler: Scheduler, so: SchedulerOutput, request_id: str) -> str:
    if scheduler.scheduler_config.policy != "priority":
        return "kv_cache_full"
    reqs = scheduler.requests
    victim = reqs.get(request_id)
    if victim is None:
        return "kv_cache_full"
    for rid in so.num_scheduled_tokens:
        r = reqs.get(rid)
        if r is not None and r.priority < victim.priority:
            return "priority"
    return "kv_cache_full"
