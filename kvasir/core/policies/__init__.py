"""Scheduling policies: one object per ``--scheduling-policy`` (see ``base``)."""

from __future__ import annotations

from kvasir.config import SchedulerConfig
from kvasir.core.kv_cache_manager import KVCacheManager
from kvasir.core.policies.base import (
    Admission,
    AdmissionConstraint,
    RequestRejected,
    SchedulingPolicy,
    StepState,
)
from kvasir.core.policies.fair import FairPolicy
from kvasir.core.policies.fcfs import FCFSPolicy, PriorityPolicy
from kvasir.core.policies.lpm import LPMPolicy
from kvasir.core.policies.sjf import SJFPolicy
from kvasir.core.policies.slo import SLOPolicy

POLICIES: dict[str, type[SchedulingPolicy]] = {
    p.name: p for p in (FCFSPolicy, PriorityPolicy, LPMPolicy, FairPolicy, SJFPolicy, SLOPolicy)
}

__all__ = [
    "POLICIES",
    "Admission",
    "AdmissionConstraint",
    "RequestRejected",
    "SchedulingPolicy",
    "StepState",
    "make_policy",
]


def make_policy(config: SchedulerConfig, kv: KVCacheManager) -> SchedulingPolicy:
    try:
        cls = POLICIES[config.policy]
    except KeyError:
        raise ValueError(
            f"policy must be one of {tuple(POLICIES)}, got {config.policy!r}"
        ) from None
    return cls(config, kv)
