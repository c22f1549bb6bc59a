"""The scheduler: one decision per step, ``{request_id: num_new_tokens}``.

Contract with the model runner (see ``core/outputs.py``):

* ``num_computed_tokens`` in ``NewRequestData`` / ``CachedRequestData`` is the value
  *before* this step. For a request with ``c`` computed and ``n`` scheduled tokens the
  runner computes the KV of ``all_token_ids[c:c + n]`` and samples a token iff
  ``c + n == num_tokens`` (the end of the known tokens); a prefill chunk that stops
  short of the end samples nothing.
* The scheduler advances ``request.num_computed_tokens`` at ``schedule()`` time (as vLLM
  v1 does); ``update_from_output`` only appends tokens and checks stop conditions.
* A request is *new* to the runner (``scheduled_new_reqs``, full data, all block ids) the
  first time it is scheduled and again after every preemption; otherwise it is *cached*
  (``scheduled_cached_reqs``, only blocks appended this step), even if it sat out some
  steps for lack of token budget. The runner keeps a request's state until its id shows
  up in ``finished_req_ids`` (dropped for good) or ``preempted_req_ids`` (dropped from the
  batch; it comes back as new with its output tokens so far).
* ``num_scheduled_tokens`` lists single-token entries (decodes) first, then longer ones,
  each group in scheduling order. Block 0 is never handed out (padding target).
* Requests of one step may share KV that this same step computes: a full block is
  registered in the prefix cache when the step that completes it is scheduled (as in
  vLLM v1), and an n>1 child may fork its parent's prompt blocks in the step that
  finishes the parent's prompt. So the runner must run a step's whole batch in one
  forward pass, each layer writing all of the step's KV before any attention reads it
  (the ``AttentionBackend`` contract) -- never decodes and prefills as separate passes.

Mechanism and policy: the order decisions belong to a ``SchedulingPolicy``
(``core/policies``: ``fcfs``, ``priority``, ``lpm``, ``fair``, ``sjf``, ``slo``); this class
hands out tokens and blocks. Running requests first (in the policy's order; admission
order for ``fcfs``), each getting what it still needs up to the remaining token budget
(chunked prefill; the policy may cap a prefill chunk). When KV blocks run out, the
policy's victim is preempted by recompute (``fcfs``: the latest admitted; ``priority``:
largest ``priority``, then latest arrival) and goes back to its queue. Then, unless
this step preempted, waiting requests are admitted in queue order; the policy (and any
``admission_constraints``) may defer one, which lets the next one try; when the head
does not fit, admission stops so younger requests cannot starve it. The step's token
budget is ``max_num_batched_tokens``, or what the step-time model fits in a TPOT
bound (``target_tpot_ms``, the ``slo`` policy's) in a step that carries decodes. n>1 children (``fork_of``) wait until their parent's prompt is scheduled to
be computed, then share its full prompt blocks (at least one token is always
recomputed). A request taken back out of the step it was scheduled in (priority-policy
preemption) first loses the hashes registered for KV that will now never be computed.

Requests are capped so that ``prompt + max_tokens <= min(max_model_len, KV capacity in
tokens)``: a request alone in the cache can always finish (it ends with "length").

Aborts: ``abort_requests`` frees everything at once; their ``EngineCoreOutput``
(``finish_reason="abort"``) come from ``take_aborted_outputs()``, never from
``update_from_output``.

Async scheduling (``async_scheduling=True``): the engine calls ``schedule()`` for step
N + 1 before ``update_from_output`` of step N, so a request that samples in step N has
one *output placeholder*: a token that exists on the device but not yet here. It
counts as known for scheduling (the request decodes it in step N + 1) and is replaced
by the real token in ``update_from_output``. A request that will finish once its
placeholders arrive (max_tokens, max_model_len) is not scheduled again; one that stops
on EOS / a stop token is found one step late and the token its extra step sampled is
dropped (as in vLLM). Outputs are the same as without async scheduling.

Speculative decoding: a running request may carry drafts (``spec_token_ids``, proposed
by the runner's previous step). A step that reaches the end of its known tokens also
schedules up to k of them (within the token budget, ``max_model_len`` and what can
still become output) and lists them in ``scheduled_spec_decode_tokens``; it allocates
``num_lookahead_tokens`` more KV slots for the proposer's own draft steps (dropped,
with the drafts, before anyone is preempted for them). ``update_from_output`` rolls
``num_computed_tokens`` back over the rejected drafts: their slots are rewritten by
the next step. Only known tokens' blocks are ever registered in the prefix cache
(``allocate_slots`` caches up to ``num_tokens``), so a block holding unverified drafts
never is. Speculative decoding runs without async scheduling (the engine reads each
step back before scheduling the next: the accepted count decides the next positions).

Pipeline parallelism (``pipeline_parallel_size > 1``): the engine keeps up to that many
steps in flight, calling ``schedule()`` again before the earlier steps' outputs are
back. A request in a step still in flight is never scheduled again nor preempted until
that step's ``update_from_output``, so no request is in two in-flight batches. Cached
requests then carry ``new_token_ids`` (the sampled tokens the stages that do not sample
have not seen).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from kvasir.config import CacheConfig, SchedulerConfig
from kvasir.core.block_pool import KVCacheBlock
from kvasir.core.kv_cache_manager import KVCacheManager, cdiv
from kvasir.core.kv_cache_spec import KVCacheConfig
from kvasir.core.lora_slots import LoRASlots
from kvasir.core.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
    TokenLogprobs,
)
from kvasir.core.policies import (
    Admission,
    AdmissionConstraint,
    RequestRejected,
    StepState,
    make_policy,
)
from kvasir.core.request import Request, RequestStatus
from kvasir.core.sched_stats import SchedulingStats, resolve_slos
from kvasir.core.step_time import StepTimeModel


class Scheduler:
    """Decides each step which requests advance by how many tokens; owns request state
    and the KV cache manager. Pure Python: never sees a tensor.

    ``num_blocks`` counts every KV block including the reserved null block 0.
    ``clock`` (seconds, default ``time.time``) stamps admissions, token times and the
    policies' ages and deadlines; tests pass a simulated one.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        async_scheduling: bool = False,
        pipeline_parallel_size: int = 1,
        kv_cache_config: KVCacheConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scheduler_config = scheduler_config
        self.clock = clock
        self.cache_config = cache_config
        if scheduler_config.max_model_len is None:
            raise ValueError(
                "scheduler_config.max_model_len must be resolved against the model "
                "before building the Scheduler"
            )
        self.max_model_len: int = scheduler_config.max_model_len
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.block_size = cache_config.block_size
        if kv_cache_config is not None:  # the layers' specs: the pool checks their kinds
            if kv_cache_config.num_blocks != num_blocks:
                raise ValueError(
                    f"kv_cache_config has {kv_cache_config.num_blocks} blocks, "
                    f"but num_blocks is {num_blocks}"
                )
            self.kv_cache_manager = KVCacheManager.from_config(
                kv_cache_config,
                enable_caching=cache_config.enable_prefix_caching,
                max_model_len=self.max_model_len,
                max_num_seqs=self.max_num_seqs,
            )
        else:
            self.kv_cache_manager = KVCacheManager(
                num_blocks,
                cache_config.block_size,
                enable_caching=cache_config.enable_prefix_caching,
                max_model_len=self.max_model_len,
            )
        self.requests: dict[str, Request] = {}  # every unfinished request
        # The policy orders the waiting queue, admits, ranks running requests and picks
        # preemption victims (core/policies); this class is the mechanism.
        self.policy = make_policy(scheduler_config, self.kv_cache_manager)
        self.waiting = self.policy.make_queue()
        self.admission_constraints: list[AdmissionConstraint] = []
        self.sched_stats = SchedulingStats(scheduler_config.fairness_window_s)
        # Step time in tokens: measured by the engine (set_step_time_model); None: no
        # time-bounded budgets (--target-tpot-ms, slo) until it is.
        self.step_time_model: StepTimeModel | None = None
        self._last_token_budget = self.max_num_batched_tokens
        self.running: list[Request] = []  # admission order
        self.finished_req_ids: set[str] = set()  # since the last schedule()
        self.num_preemptions = 0  # cumulative
        self._aborted_outputs: list[EngineCoreOutput] = []
        self._prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        self._next_arrival_seq = 0
        self._last_num_scheduled_tokens = 0
        self.async_scheduling = async_scheduling
        # Async scheduling: request id -> tokens sampled by steps whose output has not
        # come back yet; and per SchedulerOutput (by id), the arrival_seq of the first
        # request added after it (a request reusing a finished id is not in that step).
        self._num_output_placeholders: dict[str, int] = {}
        self._arrival_limits: dict[int, int] = {}
        if pipeline_parallel_size > 1 and async_scheduling:
            raise ValueError(
                "async_scheduling must be off with pipeline parallelism (the pipeline "
                "keeps several steps in flight instead)"
            )
        # Pipeline parallelism: request id -> steps in flight that include it.
        self.pipelined = pipeline_parallel_size > 1
        self._in_flight: dict[str, int] = {}
        # Speculative decoding: KV slots a sampling step keeps free past its tokens for
        # the proposer's draft steps (set by the engine from its proposer), and
        # cumulative acceptance counters.
        self.num_lookahead_tokens = 0
        self.spec_num_drafts = 0
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        self.spec_accepted_per_pos: list[int] = []
        self._last_spec_k = 0.0
        # State-space models' n > 1 forks: child id -> the parent's state slot to copy,
        # and (per schedule()) what each scheduled request had computed before the step.
        self._state_copies: dict[str, int] = {}
        self.num_state_forks = 0  # cumulative
        self._computed_before_step: dict[str, int] = {}
        # Multi-LoRA (set by the engine when enabled): the device slots' adapters, and
        # the requests holding a slot (admitted, not yet finished or preempted).
        self.lora_slots: LoRASlots | None = None
        self._lora_holders: set[str] = set()

    # ------------------------------------------------------------------ intake

    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ValueError if it can never run (prompt too long for
        ``max_model_len`` or the KV cache), its id is taken, or the queue is full."""
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError(f"request {rid!r}: the prompt must contain at least one token")
        if num_prompt + 1 > self.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt of {num_prompt} tokens plus 1 generated token "
                f"exceeds max_model_len ({self.max_model_len})"
            )
        num_usable = self.kv_cache_manager.num_usable_blocks
        kv_capacity = num_usable * self.block_size
        if cdiv(num_prompt + 1, self.block_size) > num_usable:
            raise ValueError(
                f"request {rid!r}: prompt of {num_prompt} tokens plus 1 generated token "
                f"does not fit in the KV cache ({num_usable} blocks of {self.block_size} "
                f"= {kv_capacity} tokens)"
            )
        max_queued = self.scheduler_config.max_queued_requests
        if max_queued is not None and len(self.waiting) >= max_queued:
            raise ValueError(
                f"request {rid!r} rejected: the waiting queue is full "
                f"(max_queued_requests={max_queued})"
            )
        limit = min(self.max_model_len, kv_capacity) - num_prompt
        request.max_tokens = limit if request.max_tokens is None else min(request.max_tokens, limit)
        resolve_slos(request, self.scheduler_config)
        try:
            self.policy.on_add(request)
        except RequestRejected:
            self.sched_stats.record_decision("rejected", "estimated_wait", request)
            raise
        request.arrival_seq = self._next_arrival_seq
        self._next_arrival_seq += 1
        request.status = RequestStatus.WAITING
        self.requests[rid] = request
        self.waiting.add(request)

    # ------------------------------------------------------------------ schedule

    def reset_policy_state(self) -> None:
        """A fresh policy and fresh policy stats (after the engine's calibration
        requests); only while nothing is waiting."""
        assert not self.waiting and not self.running
        model = self.step_time_model
        self.policy = make_policy(self.scheduler_config, self.kv_cache_manager)
        self.waiting = self.policy.make_queue()
        self.sched_stats = SchedulingStats(self.scheduler_config.fairness_window_s)
        self.set_step_time_model(model)

    def set_step_time_model(self, model: StepTimeModel | None) -> None:
        self.step_time_model = model
        self.policy.step_time_model = model

    def observe_step_time(self, num_tokens: int, seconds: float) -> None:
        """A step of ``num_tokens`` took ``seconds`` on the device: refine the model."""
        if self.step_time_model is not None:
            self.step_time_model.observe(num_tokens, seconds)

    def _step_token_budget(self) -> int:
        """``max_num_batched_tokens``, or fewer in a step that carries decodes when a
        time bound applies (``--target-tpot-ms``, the policy's): as many tokens as the
        step-time model says fit, never so few that prefill stops (stall-free
        chunking: each running request gets one token and prefill at least one)."""
        budget = self.max_num_batched_tokens
        model = self.step_time_model
        if model is None or not any(
            r.num_computed_tokens >= r.num_prompt_tokens for r in self.running
        ):
            return budget
        target_ms = self.scheduler_config.target_tpot_ms
        bounds = [self.policy.step_time_bound_s(self.running)]
        bounds.append(target_ms / 1000 if target_ms is not None else None)
        bound = min((b for b in bounds if b is not None), default=None)
        if bound is None:
            return budget
        floor = len(self.running) + 1
        return min(budget, max(model.max_tokens_within(bound), floor))

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts; allocate their KV blocks."""
        kv = self.kv_cache_manager
        now = self.clock()
        policy = self.policy
        policy.begin_step(now)
        self.running = policy.order_running(self.running)
        token_budget = self._last_token_budget = self._step_token_budget()
        state = StepState(
            now, self.running, self.waiting, kv, self.block_size, token_budget, self.max_num_seqs
        )
        chunked = self.scheduler_config.enable_chunked_prefill
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: dict[str, CachedRequestData] = {}
        preempted_ids: set[str] = set()
        placeholders = self._num_output_placeholders
        placeholder_added: set[str] = set()
        spec_scheduled: dict[str, list[int]] = {}
        # State-space models: parents whose n > 1 children wait to fork (see _state_fork).
        forking: set[str] = set()
        if kv.state_slots is not None:
            forking = {r.fork_of for r in self.waiting if r.fork_of is not None}  # type: ignore[misc]

        # Running requests: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and token_budget > 0:
            request = self.running[i]
            if self.pipelined and request.request_id in self._in_flight:
                i += 1  # its last step is still in the pipeline
                continue
            num_placeholders = placeholders.get(request.request_id, 0)
            if num_placeholders and self._finishes_with(request, num_placeholders):
                i += 1  # its last token is in flight; another step would be wasted
                continue
            num_new = request.num_tokens + num_placeholders - request.num_computed_tokens
            if num_new <= 0 or (not chunked and num_new > token_budget):
                i += 1
                continue
            num_new = min(num_new, token_budget)
            num_new = self._cap_at_fork(request, num_new, forking)
            if request.num_computed_tokens < request.num_prompt_tokens:  # a prefill chunk
                state.token_budget = token_budget
                num_new = policy.cap_chunk(request, num_new, state)
                if num_new <= 0:
                    i += 1
                    continue
            # Speculative decoding: drafts after the known tokens, and KV slots past
            # them for the proposer's own draft steps (only when this step samples).
            num_spec = lookahead = 0
            if num_new == request.num_tokens + num_placeholders - request.num_computed_tokens:
                num_spec = self._num_schedulable_drafts(request, token_budget - num_new)
                lookahead = min(
                    self.num_lookahead_tokens,
                    self.max_model_len - request.num_computed_tokens - num_new - num_spec,
                )
            while True:
                new_block_ids = kv.allocate_slots(request, num_new + num_spec + lookahead)
                if new_block_ids is not None:
                    break
                if num_spec or lookahead:  # drop the speculation before preempting anyone
                    num_spec = lookahead = 0
                    continue
                victim = self._select_victim()
                victim_index = self.running.index(victim)
                del self.running[victim_index]
                if victim.request_id in num_scheduled:
                    # Scheduled earlier in this step (priority policy): take it back.
                    # Blocks it registered for this step's KV will hold no KV.
                    token_budget += num_scheduled.pop(victim.request_id)
                    spec_scheduled.pop(victim.request_id, None)
                    computed_before = cached_reqs.pop(victim.request_id).num_computed_tokens
                    kv.uncache_blocks(victim, computed_before)
                    if victim.request_id in placeholder_added:
                        placeholder_added.discard(victim.request_id)
                        self._remove_placeholder(victim.request_id)
                self._preempt(victim)
                preempted_ids.add(victim.request_id)
                if victim_index < i:
                    i -= 1
                if victim is request:
                    break
            if new_block_ids is None:
                continue  # the request itself was preempted; running[i] is the next one
            cached = CachedRequestData(
                request.request_id, new_block_ids, request.num_computed_tokens
            )
            if self.pipelined:
                end = request.num_computed_tokens + num_new
                start = max(request.num_computed_tokens, request.num_prompt_tokens)
                cached.new_token_ids = request.all_token_ids[start:end]
            cached_reqs[request.request_id] = cached
            if num_spec:
                spec_scheduled[request.request_id] = request.spec_token_ids[:num_spec]
                num_new += num_spec
            num_scheduled[request.request_id] = num_new
            token_budget -= num_new
            request.num_computed_tokens += num_new
            if (
                self.async_scheduling
                and request.num_computed_tokens == request.num_tokens + num_placeholders
            ):
                placeholders[request.request_id] = num_placeholders + 1  # it samples
                placeholder_added.add(request.request_id)
            i += 1

        # Waiting requests; none in a step that had to preempt (it would thrash).
        self._computed_before_step = {r: c.num_computed_tokens for r, c in cached_reqs.items()}
        if not preempted_ids:
            skipped: list[Request] = []
            while self.waiting and token_budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting.peek()
                assert request.num_computed_tokens == 0
                if request.request_id in placeholders or (
                    self.pipelined and request.request_id in self._in_flight
                ):
                    # Preempted while its last token was in flight (or an aborted
                    # request's id reused while its step is in the pipeline): later.
                    skipped.append(self.waiting.pop())
                    continue
                if request.structured_output is not None and not (
                    request.structured_output.is_ready()
                ):
                    skipped.append(self.waiting.pop())  # its grammar is compiling
                    continue
                hold, computed_blocks, num_computed, from_cache = self._prefix_for(request)
                if hold:  # a child whose parent's prompt is not computed yet
                    skipped.append(self.waiting.pop())
                    continue
                num_new = request.num_tokens - num_computed
                if not chunked and num_new > token_budget:
                    break
                num_new = min(num_new, token_budget)
                num_new = self._cap_at_fork(request, num_new, forking)
                state.token_budget = token_budget
                decision, reason = self._admission(request, num_new, state)
                if decision is not Admission.ADMIT:
                    self._state_copies.pop(request.request_id, None)
                    if request.deferred_for != reason:  # counted once per request and reason
                        request.deferred_for = reason
                        self.sched_stats.record_decision(decision.value, reason, request)
                    if decision is Admission.STOP:
                        break
                    skipped.append(self.waiting.pop())
                    continue
                if request.lora_id and not self._lora_admit(request):
                    skipped.append(self.waiting.pop())  # its adapter has no slot yet
                    continue
                lookahead = 0
                if num_computed + num_new == request.num_tokens:  # it samples: room to draft
                    lookahead = min(
                        self.num_lookahead_tokens, self.max_model_len - request.num_tokens
                    )
                new_block_ids = kv.allocate_slots(
                    request, num_new + lookahead, computed_blocks, num_computed
                )
                if new_block_ids is None and lookahead:
                    lookahead = 0
                    new_block_ids = kv.allocate_slots(
                        request, num_new, computed_blocks, num_computed
                    )
                if new_block_ids is None:
                    self._state_copies.pop(request.request_id, None)
                    self._lora_release(request)
                    break  # the head does not fit: nobody jumps ahead of it
                self.waiting.pop()
                if from_cache:
                    kv.record_prefix_cache_stats(request.num_tokens, num_computed)
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                self._computed_before_step[request.request_id] = num_computed
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = num_computed
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = now
                    self.sched_stats.record_decision("admitted", reason, request)
                state.admitted.append(request)
                new_reqs.append(
                    NewRequestData(
                        req_id=request.request_id,
                        prompt_token_ids=list(request.prompt_token_ids),
                        output_token_ids=list(request.output_token_ids),
                        sampling_params=request.sampling_params,
                        block_ids=kv.get_block_ids(request.request_id),
                        num_computed_tokens=num_computed,
                        pooling_params=request.pooling_params,
                        state_slot=kv.get_state_slot(request.request_id),
                        state_copy_from=self._state_copies.pop(request.request_id, -1),
                        lora_id=request.lora_id,
                    )
                )
                num_scheduled[request.request_id] = num_new
                token_budget -= num_new
                request.num_computed_tokens = num_computed + num_new
                if self.async_scheduling and request.num_computed_tokens == request.num_tokens:
                    placeholders[request.request_id] = 1
            for request in reversed(skipped):
                self.waiting.prepend(request)

        # Decodes first, then longer queries, each in scheduling order.
        ordered = {rid: n for rid, n in num_scheduled.items() if n == 1}
        ordered.update((rid, n) for rid, n in num_scheduled.items() if n != 1)
        total = sum(ordered.values())
        assert total <= self._last_token_budget <= self.max_num_batched_tokens
        served: dict[str, int] = {}
        for rid, n in ordered.items():  # service: what the step really carries
            request = self.requests[rid]
            policy.on_scheduled(request, n, self._computed_before_step[rid])
            tenant = request.tenant or ""
            served[tenant] = served.get(tenant, 0) + n
        if served:
            self.sched_stats.record_service(now, served)
        self._last_num_scheduled_tokens = total
        finished_ids, self.finished_req_ids = self.finished_req_ids, set()
        so = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=list(cached_reqs.values()),
            num_scheduled_tokens=ordered,
            total_num_scheduled_tokens=total,
            finished_req_ids=finished_ids,
            preempted_req_ids=preempted_ids,
            scheduled_spec_decode_tokens=spec_scheduled,
        )
        if self.lora_slots is not None:
            so.lora_loads = self.lora_slots.take_loads()
        if spec_scheduled:
            self._last_spec_k = sum(map(len, spec_scheduled.values())) / len(spec_scheduled)
        if self.pipelined:
            for rid in ordered:
                self._in_flight[rid] = self._in_flight.get(rid, 0) + 1
        if self.async_scheduling:
            limits = self._arrival_limits
            limits[id(so)] = self._next_arrival_seq
            if len(limits) > 16:  # outputs never passed to update_from_output
                del limits[next(iter(limits))]
        return so

    def _num_schedulable_drafts(self, request: Request, token_budget: int) -> int:
        """How many of the request's drafts this step verifies: within the token budget
        left, before max_model_len, and no more than can still become output (the
        step yields up to num_drafts + 1 tokens)."""
        if not request.spec_token_ids:
            return 0
        assert request.max_tokens is not None
        return max(
            min(
                len(request.spec_token_ids),
                token_budget,
                self.max_model_len - request.num_tokens,
                request.max_tokens - request.num_output_tokens - 1,
            ),
            0,
        )

    def _finishes_with(self, request: Request, num_placeholders: int) -> bool:
        """Whether the request reaches max_tokens or max_model_len once its
        placeholders are real tokens (so it certainly finishes)."""
        assert request.max_tokens is not None
        return (
            request.num_output_tokens + num_placeholders >= request.max_tokens
            or request.num_tokens + num_placeholders >= self.max_model_len
        )

    def _remove_placeholder(self, request_id: str) -> None:
        n = self._num_output_placeholders.get(request_id, 0)
        if n > 1:
            self._num_output_placeholders[request_id] = n - 1
        elif n == 1:
            del self._num_output_placeholders[request_id]

    def _admission(self, request: Request, num_new: int, state: StepState) -> tuple[Admission, str]:
        """The policy's decision on a waiting request that fits, then the constraints'."""
        decision, reason = self.policy.admit(request, num_new, state)
        for constraint in self.admission_constraints:
            if decision is not Admission.ADMIT:
                break
            decision, why = constraint.admit(request, num_new, state)
            if decision is not Admission.ADMIT:
                reason = why
        return decision, reason

    def _select_victim(self) -> Request:
        running = self.running
        if self.pipelined:  # never a request whose step is still in the pipeline
            running = [r for r in running if r.request_id not in self._in_flight]
        return self.policy.select_victim(running)

    def _lora_admit(self, request: Request) -> bool:
        """Whether a waiting request's adapter got a device slot (see ``LoRASlots``)."""
        slots = self.lora_slots
        if slots is None:
            raise ValueError(f"request {request.request_id!r} names an adapter; LoRA is off")
        demand: set[int] = set()
        if slots.starving is not None:
            demand = {r.lora_id for r in self.waiting if r.lora_id}
        if slots.admit(request.request_id, request.lora_id, demand) is None:
            return False
        self._lora_holders.add(request.request_id)
        return True

    def _lora_release(self, request: Request) -> None:
        if request.request_id in self._lora_holders:
            self._lora_holders.discard(request.request_id)
            assert self.lora_slots is not None
            self.lora_slots.release(request.lora_id)
        elif request.lora_id and self.lora_slots is not None:
            self.lora_slots.forget(request.request_id, request.lora_id)

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: drop the KV, restart from token 0 later."""
        self.kv_cache_manager.free(request)
        self._lora_release(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)

    def _prefix_for(self, request: Request) -> tuple[bool, list[KVCacheBlock], int, bool]:
        """(hold, computed blocks, their tokens, found in the prefix cache) for a waiting
        request: its parent's prompt blocks (fork) or prefix-cache hits, the longer."""
        kv = self.kv_cache_manager
        fork_blocks: list[KVCacheBlock] = []
        if kv.state_slots is not None:
            return self._state_fork(request)
        if request.fork_of is not None:
            parent = self.requests.get(request.fork_of)
            if (
                parent is not None
                and parent is not request
                and request.sampling_params.prompt_logprobs is None
                and parent.cache_salt == request.cache_salt
                and parent.lora_id == request.lora_id
                and parent.prompt_token_ids == request.prompt_token_ids
            ):
                # num_computed_tokens counts this step's tokens already (see module doc).
                if parent.status != RequestStatus.RUNNING or (
                    parent.num_computed_tokens < parent.num_prompt_tokens
                ):
                    # Never-scheduled children wait for the parent; resumed ones don't.
                    if request.status == RequestStatus.WAITING:
                        return True, [], 0, False
                else:
                    num_fork_blocks = (parent.num_prompt_tokens - 1) // self.block_size
                    fork_blocks = kv.get_fork_blocks(parent, num_fork_blocks * self.block_size)
        from_cache = kv.enable_caching and request.sampling_params.prompt_logprobs is None
        cached_blocks, _ = kv.get_computed_blocks(request, record_stats=False)
        if len(fork_blocks) >= len(cached_blocks) and fork_blocks:
            return False, fork_blocks, len(fork_blocks) * self.block_size, False
        return False, cached_blocks, len(cached_blocks) * self.block_size, from_cache

    def _state_fork_point(self, parent: Request) -> int:
        """Where an n > 1 child of a state-space model forks: the last block boundary
        before the parent's last prompt token (0: no fork)."""
        return (parent.num_prompt_tokens - 1) // self.block_size * self.block_size

    def _state_fork(self, request: Request) -> tuple[bool, list[KVCacheBlock], int, bool]:
        """``_prefix_for`` for a model with state-space layers. There is no prefix cache
        (the recurrent state at a block boundary is not kept), but an n > 1 child forks
        its parent at ``F = _state_fork_point``: the parent's prefill stops at F while
        children wait (``_cap_at_fork``); in the step after that, each child shares the
        parent's first F tokens' blocks and starts from a copy of the parent's state
        slot (``NewRequestData.state_copy_from``), recomputing only the tokens from F.
        A child that misses that step (no room) prefills its prompt itself."""
        kv = self.kv_cache_manager
        parent = self.requests.get(request.fork_of) if request.fork_of is not None else None
        if (
            parent is None
            or parent is request
            or request.status != RequestStatus.WAITING  # resumed children recompute
            or request.sampling_params.prompt_logprobs is not None
            or parent.prompt_token_ids != request.prompt_token_ids
        ):
            return False, [], 0, False
        fork = self._state_fork_point(parent)
        if fork == 0:
            return False, [], 0, False
        if parent.status != RequestStatus.RUNNING:
            return True, [], 0, False  # wait for the parent to reach the fork point
        # Tokens the parent had computed before this step: what its state slot holds.
        before = self._computed_before_step.get(parent.request_id, parent.num_computed_tokens)
        if before != fork:
            # Not there yet: wait. Past it (this child missed the step): prefill.
            return (before < fork), [], 0, False
        self._state_copies[request.request_id] = kv.get_state_slot(parent.request_id)
        self.num_state_forks += 1
        return False, kv.get_fork_blocks(parent, fork), fork, False

    def _cap_at_fork(self, request: Request, num_new: int, forking: set[str]) -> int:
        """A state-space model's parent with children waiting to fork stops its prefill
        at the fork point, so its state slot holds exactly that prefix for a step."""
        if request.request_id not in forking:
            return num_new
        fork = self._state_fork_point(request)
        c = request.num_computed_tokens
        if c < fork < c + num_new:
            return fork - c
        return num_new

    # ------------------------------------------------------------------ results

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, apply stop conditions, free finished requests.

        Returns one output per request that got tokens or finished this step. Prompt
        logprobs are gathered over a prompt's chunks and sent once, with the first token.
        """
        index = {rid: i for i, rid in enumerate(model_runner_output.req_ids)}
        outputs: list[EngineCoreOutput] = []
        any_finished = False
        arrival_limit = self._arrival_limits.pop(id(scheduler_output), None)
        for rid, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            if self.pipelined:
                n = self._in_flight.pop(rid, 0)
                if n > 1:
                    self._in_flight[rid] = n - 1
            request = self.requests.get(rid)
            if request is None:
                continue  # finished or aborted after it was scheduled
            if arrival_limit is not None and request.arrival_seq >= arrival_limit:
                continue  # a newer request with the id of one that was in this step
            # Async scheduling: preempted after this step was launched; its token counts.
            preempted = request.status == RequestStatus.PREEMPTED
            if request.status != RequestStatus.RUNNING and not preempted:
                continue
            first_output = request.num_output_tokens == 0
            chunk = model_runner_output.prompt_logprobs.get(rid)
            if chunk and first_output and request.sampling_params.prompt_logprobs is not None:
                self._add_prompt_logprobs(
                    request, _computed_before(scheduler_output, rid), num_scheduled, chunk
                )
            pooled = model_runner_output.pooled_outputs.get(rid)
            if pooled is not None:  # an embedding request: done after its prefill
                outputs.append(self._finish_pooling(request, pooled, preempted))
                any_finished = True
                continue
            i = index.get(rid)
            sampled = model_runner_output.sampled_token_ids[i] if i is not None else []
            drafts = scheduler_output.scheduled_spec_decode_tokens.get(rid)
            if drafts and sampled:
                # Roll back over the rejected drafts: their KV slots are rewritten by
                # the next step (the blocks stay; none of them is in the prefix cache).
                num_accepted = len(sampled) - 1
                request.num_computed_tokens -= len(drafts) - num_accepted
                self._record_spec(request, len(drafts), num_accepted)
            if sampled and self.async_scheduling:
                for _ in sampled:
                    self._remove_placeholder(rid)
            new_token_ids: list[int] = []
            for token_id in sampled:
                request.append_output_token_ids([token_id])
                new_token_ids.append(token_id)
                if self._check_stop(request, token_id):
                    break
            grammar = request.structured_output
            if grammar is not None and new_token_ids:
                grammar.accept_tokens(new_token_ids)
                if not request.is_finished() and grammar.is_terminated():
                    request.status = RequestStatus.FINISHED_STOPPED
            if i is not None and not request.is_finished():
                request.spec_token_ids = model_runner_output.spec_token_ids.get(rid, [])
                if grammar is not None and request.spec_token_ids:
                    # Drafts the grammar refuses would be rejected anyway: cut them.
                    request.spec_token_ids = grammar.validate_tokens(request.spec_token_ids)
            if not new_token_ids:
                continue  # a prefill chunk short of the end: nothing to report
            request.last_token_time = token_time = self.clock()
            if request.first_token_time is None:
                request.first_token_time = token_time
            logprobs = model_runner_output.logprobs.get(rid)
            outputs.append(
                EngineCoreOutput(
                    request_id=rid,
                    new_token_ids=new_token_ids,
                    new_logprobs=logprobs[: len(new_token_ids)] if logprobs else None,
                    new_prompt_logprobs=self._prompt_logprobs.pop(rid, None)
                    if first_output
                    else None,
                    finish_reason=request.get_finished_reason(),
                    stop_reason=request.stop_reason,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    num_draft_tokens=request.num_draft_tokens,
                    num_accepted_tokens=request.num_accepted_tokens,
                    first_scheduled_time=request.first_scheduled_time,
                    num_preemptions=request.num_preemptions,
                )
            )
            if request.is_finished():
                any_finished = True
                if preempted:
                    self.waiting.remove(request)
                self.sched_stats.record_finished(request)
                self._free_request(request)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished()]
        return outputs

    def _finish_pooling(
        self, request: Request, pooled: list[float], preempted: bool
    ) -> EngineCoreOutput:
        request.status = RequestStatus.FINISHED_STOPPED
        if preempted:
            self.waiting.remove(request)
        self._free_request(request)
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[],
            finish_reason="stop",
            num_cached_tokens=max(request.num_cached_tokens, 0),
            first_scheduled_time=request.first_scheduled_time,
            pooled_output=pooled,
        )

    def _record_spec(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        request.num_draft_tokens += num_drafts
        request.num_accepted_tokens += num_accepted
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += num_drafts
        self.spec_num_accepted_tokens += num_accepted
        per_pos = self.spec_accepted_per_pos
        if len(per_pos) < num_drafts:
            per_pos.extend([0] * (num_drafts - len(per_pos)))
        for j in range(num_accepted):
            per_pos[j] += 1

    def _add_prompt_logprobs(
        self,
        request: Request,
        computed_before: int,
        num_scheduled: int,
        chunk: list[TokenLogprobs],
    ) -> None:
        """Gather one step's prompt logprobs. The chunk ends at target position
        ``min(c + n, num_prompt - 1)``; positions already gathered (a runner recomputing
        them after a preemption) are skipped, so runners may or may not de-duplicate."""
        gathered = self._prompt_logprobs.setdefault(request.request_id, [])
        last = min(computed_before + num_scheduled, request.num_prompt_tokens - 1)
        first = last - len(chunk) + 1  # prompt position of chunk[0]; position 0 has none
        skip = max(len(gathered) + 1 - first, 0)
        gathered.extend(chunk[skip:])

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """EOS, then stop_token_ids (neither before min_tokens), then length."""
        sp = request.sampling_params
        if request.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and token_id in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
            if sp.stop_token_ids and token_id in sp.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return True
        assert request.max_tokens is not None  # resolved in add_request
        if (
            request.num_output_tokens >= request.max_tokens
            or request.num_tokens >= self.max_model_len
        ):
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def _free_request(self, request: Request) -> None:
        self.policy.on_finished(request)
        self.kv_cache_manager.free(request)
        self._lora_release(request)
        self._num_output_placeholders.pop(request.request_id, None)
        del self.requests[request.request_id]
        self._prompt_logprobs.pop(request.request_id, None)
        self.finished_req_ids.add(request.request_id)

    # ------------------------------------------------------------------ control

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Finish requests in any state as aborted; unknown ids are ignored. Their
        outputs come from ``take_aborted_outputs()``."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = RequestStatus.FINISHED_ABORTED
            self._free_request(request)
            self._aborted_outputs.append(
                EngineCoreOutput(
                    request_id=rid,
                    new_token_ids=[],
                    finish_reason="abort",
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    first_scheduled_time=request.first_scheduled_time,
                    num_preemptions=request.num_preemptions,
                )
            )

    def take_aborted_outputs(self) -> list[EngineCoreOutput]:
        """Outputs of requests aborted since the last call (``finish_reason="abort"``)."""
        outputs, self._aborted_outputs = self._aborted_outputs, []
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def make_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        st = self.sched_stats
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            num_scheduled_tokens=self._last_num_scheduled_tokens,
            spec_num_drafts=self.spec_num_drafts,
            spec_num_draft_tokens=self.spec_num_draft_tokens,
            spec_num_accepted_tokens=self.spec_num_accepted_tokens,
            spec_accepted_per_pos=list(self.spec_accepted_per_pos),
            spec_k=self._last_spec_k,
            policy=self.policy.name,
            token_budget=self._last_token_budget,
            sched_decisions=dict(st.decisions),
            slo_met=dict(st.slo_met),
            slo_total=dict(st.slo_total),
            num_length_predictions=st.num_predictions,
            predicted_output_tokens=st.predicted_tokens,
            actual_output_tokens=st.actual_tokens,
            prediction_abs_error=st.prediction_abs_error,
            jain_fairness=st.jain_fairness(self.clock()),
        )


def _computed_before(scheduler_output: SchedulerOutput, request_id: str) -> int:
    """The request's num_computed_tokens before the step of ``scheduler_output``."""
    for data in scheduler_output.scheduled_cached_reqs:
        if data.req_id == request_id:
            return data.num_computed_tokens
    for new in scheduler_output.scheduled_new_reqs:
        if new.req_id == request_id:
            return new.num_computed_tokens
    raise KeyError(request_id)
