"""Plain-data messages between scheduler, model runner and engine (no torch).

``EngineCoreOutput`` is a msgspec Struct so it crosses process boundaries typed,
without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from kvasir.pooling_params import PoolingParams
from kvasir.sampling_params import SamplingParams

# Per position: [(token_id, logprob, rank), ...] with the sampled/actual token first,
# then the top-k alternatives in descending order. Rank 1 = most likely.
TokenLogprobs = list[tuple[int, float, int]]


@dataclass
class NewRequestData:
    """A request the runner has not seen, or one resumed after preemption (then the
    runner replaces its block ids and restarts from ``num_computed_tokens``)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty only when resumed after preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    pooling_params: PoolingParams | None = None  # an embedding request: pool, never sample
    # State-space layers: the request's state slot (-1: the model has none). A slot is
    # kept until the request finishes or is preempted.
    state_slot: int = -1
    # An n > 1 child forking its parent: copy this slot's state into ``state_slot``
    # before the step (the parent's state at ``num_computed_tokens``). -1: none.
    state_copy_from: int = -1
    # Multi-LoRA: the request's adapter id (0: the base model); its slot is in the
    # scheduler's ``lora_loads`` of this or an earlier step.
    lora_id: int = 0


@dataclass
class CachedRequestData:
    """A request that ran in the previous step and runs again: only the diff."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Pipeline parallelism only: the sampled tokens among those this step computes
    # (positions ``max(num_computed_tokens, num_prompt_tokens)`` on), which the stages
    # that do not sample have not seen. Empty otherwise.
    new_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """One step: ``num_scheduled_tokens`` maps request id -> tokens it advances.

    Decodes come first in ``num_scheduled_tokens`` order, then prefill chunks.
    """

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests that finished/aborted since the last step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Requests preempted in this step: the runner drops them from its batch but keeps
    # their sampling state (generator, output tokens) for when they resume.
    preempted_req_ids: set[str] = field(default_factory=set)
    # Speculative decoding: request id -> the drafts it verifies this step. They are
    # the last len(drafts) of its num_scheduled_tokens (after its known tokens).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Structured outputs (filled by the engine's StructuredOutputManager after
    # schedule()): request id -> its first row in ``grammar_bitmask``, which holds
    # 1 + len(drafts) rows per constrained request that samples, as int32 words
    # ([rows, ceil(vocab_size / 32)], bit set = token allowed).
    structured_output_request_ids: dict[str, int] = field(default_factory=dict)
    grammar_bitmask: bytes | None = None
    # Multi-LoRA: device slot -> adapter id for slots (re)assigned this step; the
    # runner copies those adapters in before running the step.
    lora_loads: dict[int, int] = field(default_factory=dict)


@dataclass
class ModelRunnerOutput:
    """Per scheduled request: tokens sampled this step (empty for a prefill chunk that
    did not reach the end of the prompt; with speculative decoding its accepted drafts
    plus one token); logprobs per sampled token; and, with speculative decoding, the
    drafts proposed for each request's next step."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Embedding requests whose prompt finished this step: the pooled hidden state.
    pooled_outputs: dict[str, list[float]] = field(default_factory=dict)


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    # Prompt logprobs for positions 1.. of the prompt, delivered once when complete.
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # Speculative decoding, so far: drafts verified and accepted (final output only).
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Wall-clock events (time.time()): first scheduled, per-step token time.
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    pooled_output: list[float] | None = None  # embedding requests, with finish_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use
    prefix_cache_queries: int = 0  # tokens looked up (cumulative)
    prefix_cache_hits: int = 0  # tokens hit (cumulative)
    num_preemptions: int = 0  # cumulative
    num_scheduled_tokens: int = 0  # last step
    # Speculative decoding (cumulative, vLLM's metric names): steps' requests that
    # verified drafts, drafts verified, drafts accepted, and accepted per draft position.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = msgspec.field(default_factory=list)
    spec_k: float = 0.0  # mean drafts per speculating request in the last step
    # Scheduling policies (core/sched_stats.py): the last step's token budget, decision
    # counts ("admitted/<reason>" ...), SLO attainment per "<class>/<tenant>", output
    # length predictions (sjf) against what came out, Jain's index over tenants.
    policy: str = ""
    token_budget: int = 0
    sched_decisions: dict[str, int] = msgspec.field(default_factory=dict)
    slo_met: dict[str, int] = msgspec.field(default_factory=dict)
    slo_total: dict[str, int] = msgspec.field(default_factory=dict)
    num_length_predictions: int = 0
    predicted_output_tokens: int = 0
    actual_output_tokens: int = 0
    prediction_abs_error: int = 0
    jain_fairness: float = 1.0
    # Multi-LoRA (filled by the engine core when enabled): adapters of the running and
    # waiting requests, the device slots, and the adapter cache's cumulative counters
    # (``kvasir.lora.manager.LoRAManager.stats``).
    lora_running_ids: list[int] = msgspec.field(default_factory=list)
    lora_waiting_ids: list[int] = msgspec.field(default_factory=list)
    max_loras: int = 0
    lora_stats: dict[str, float] = msgspec.field(default_factory=dict)
