"""The interface between the scheduler (mechanism) and a scheduling policy.

The scheduler owns request state, KV blocks and the token budget; it asks the policy,
in a few fixed places of ``Scheduler.schedule()``:

* the **order of waiting requests** (the queue it builds, ``make_queue``);
* whether a waiting request that fits may be **admitted** now (``admit``: admit it,
  defer it -- skip it this step and try the next one --, or stop admitting);
* the **order running requests get the token budget** in (``order_running``) and how
  much of it a running prefill chunk may take (``cap_chunk``);
* a **time bound** for steps that carry decodes (``step_time_bound_s``, turned into a
  token budget through the step-time model);
* the **preemption victim** (``select_victim``).

It tells the policy what happened: ``on_add`` (may refuse with ``RequestRejected``),
``on_scheduled`` (tokens a request got this step), ``on_finished`` (finished or
aborted). A policy never allocates or frees anything, never changes a request's
tokens, and must terminate: every request it defers must become admissible once the
requests ahead of it finish (the age bound guarantees it for the built-in ones).

Further admission constraints that are not a policy (for instance a cap on distinct
LoRA adapters per step) are ``AdmissionConstraint`` objects in
``Scheduler.admission_constraints``, consulted after the policy with the same
decisions.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from kvasir.config import SchedulerConfig
from kvasir.core.kv_cache_manager import KVCacheManager
from kvasir.core.request import Request
from kvasir.core.request_queue import RequestQueue
from kvasir.core.step_time import StepTimeModel


class RequestRejected(ValueError):
    """A request refused at arrival by admission control: HTTP 429 with
    ``Retry-After: retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission(enum.Enum):
    ADMIT = "admitted"
    DEFER = "deferred"  # skip this request this step; later ones may go ahead
    STOP = "stopped"  # admit nobody else this step


@dataclass
class StepState:
    """What a policy may read while one ``schedule()`` runs."""

    now: float
    running: list[Request]
    waiting: RequestQueue
    kv: KVCacheManager
    block_size: int
    token_budget: int  # left, updated by the scheduler as it hands tokens out
    max_num_seqs: int
    # Requests admitted so far in this step (an AdmissionConstraint counts them).
    admitted: list[Request] = field(default_factory=list)


class AdmissionConstraint(ABC):
    """An extra check on each waiting request the policy would admit."""

    @abstractmethod
    def admit(
        self, request: Request, num_new_tokens: int, state: StepState
    ) -> tuple[Admission, str]:
        """(decision, reason); ADMIT lets the next constraint decide."""


class SchedulingPolicy(ABC):
    """One ``--scheduling-policy``. See the module docstring for when each hook runs."""

    name: str = ""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.now = 0.0
        # Set by the scheduler once the engine has measured it (slo's admission control).
        self.step_time_model: StepTimeModel | None = None

    @abstractmethod
    def make_queue(self) -> RequestQueue:
        """The waiting queue, in this policy's admission order."""

    def begin_step(self, now: float) -> None:
        """Called first in every ``schedule()``."""
        self.now = now

    def on_add(self, request: Request) -> None:
        """A new request (its SLOs resolved). May raise ``RequestRejected``."""
        return None

    def admit(
        self, request: Request, num_new_tokens: int, state: StepState
    ) -> tuple[Admission, str]:
        """Whether the head of the queue, which fits, is admitted now, and why."""
        return Admission.ADMIT, self.name

    def order_running(self, running: list[Request]) -> list[Request]:
        """The same requests, in the order they get this step's token budget (and, for
        ``fcfs``, admission order is what ``select_victim`` reads)."""
        return running

    def cap_chunk(self, request: Request, num_new_tokens: int, state: StepState) -> int:
        """How many of ``num_new_tokens`` (> 0) a running request's prefill chunk gets
        (0: none this step). A policy returning 0 must not do so forever."""
        return num_new_tokens

    def step_time_bound_s(self, running: list[Request]) -> float | None:
        """A bound on the time of a step that carries decodes (None: no bound)."""
        return None

    @abstractmethod
    def select_victim(self, candidates: list[Request]) -> Request:
        """The running request to preempt when KV blocks run out (``candidates`` is
        in admission order, never empty)."""

    def on_scheduled(self, request: Request, num_new_tokens: int, computed_before: int) -> None:
        """``request`` got ``num_new_tokens`` in this step, from ``computed_before``."""
        return None

    def on_finished(self, request: Request) -> None:
        """Finished or aborted; its tokens are final."""
        return None


class AgedPolicy(SchedulingPolicy):
    """A policy with its own order whose requests are put first, oldest first, once
    they have waited ``policy_age_bound_s``: none starves, whatever the order says."""

    def make_queue(self) -> RequestQueue:
        from kvasir.core.request_queue import KeyedRequestQueue

        self._queue = KeyedRequestQueue(self._queue_key)
        return self._queue

    def begin_step(self, now: float) -> None:
        super().begin_step(now)
        self._queue.invalidate()

    def is_aged(self, request: Request) -> bool:
        return self.now - request.arrival_time >= self.config.policy_age_bound_s

    def _queue_key(self, request: Request) -> tuple:
        if self.is_aged(request):
            return (0, request.arrival_time, request.arrival_seq)
        return (1, *self.order_key(request), request.arrival_seq)

    @abstractmethod
    def order_key(self, request: Request) -> tuple:
        """This policy's key for a request that has not waited past the age bound."""

    def admit(
        self, request: Request, num_new_tokens: int, state: StepState
    ) -> tuple[Admission, str]:
        return Admission.ADMIT, "aged" if self.is_aged(request) else self.name
