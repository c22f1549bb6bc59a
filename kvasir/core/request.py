"""Request state as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from typing import Protocol

from kvasir.pooling_params import PoolingParams
from kvasir.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH_CAPPED: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


class GrammarState(Protocol):
    """A structured-output request's grammar, as the scheduler sees it (implemented by
    ``kvasir.structured_output.manager.GrammarState``)."""

    def is_ready(self) -> bool: ...
    def accept_tokens(self, token_ids: list[int]) -> None: ...
    def validate_tokens(self, token_ids: list[int]) -> list[int]: ...
    def is_terminated(self) -> bool: ...


class Request:
    """One sequence. ``n > 1`` is fanned out into n Requests by the engine; children
    name their parent in ``fork_of`` so the scheduler can share the prompt's KV blocks.

    Invariants: ``num_computed_tokens <= num_tokens``; ``block_ids`` hold the KV of
    ``all_token_ids[:num_computed_tokens]`` (plus room for what is scheduled).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        fork_of: str | None = None,
        pooling_params: PoolingParams | None = None,
        tenant: str | None = None,
        service_tier: str | None = None,
        ttft_slo_ms: float | None = None,
        tpot_slo_ms: float | None = None,
        lora_id: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.priority = priority  # lower value = served first (vLLM convention)
        self.cache_salt = cache_salt
        self.fork_of = fork_of
        self.pooling_params = pooling_params  # an embedding request (prefill only)
        # Scheduling policies (``core/policies``): who is served (fair), the request's
        # class (None: interactive) and its own SLOs (None: the class's defaults).
        self.tenant = tenant
        self.service_tier = service_tier
        self.ttft_slo_ms = ttft_slo_ms
        self.tpot_slo_ms = tpot_slo_ms
        self.lora_id = lora_id  # its adapter (0: the base model); keys its prefix blocks

        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prompt tokens served from the prefix cache (set once)
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # Chained hashes of the full blocks of all_token_ids (filled by the KV manager).
        self.block_hashes: list[bytes] = []
        sp = sampling_params
        self.max_tokens = sp.max_tokens  # resolved against max_model_len by the engine
        # Set by the scheduler: admission order (breaks arrival_time ties) and the
        # wall-clock time (time.time()) the request was first scheduled.
        self.arrival_seq = -1
        self.first_scheduled_time: float | None = None
        # Speculative decoding: drafts for the tokens after all_token_ids, proposed by
        # the runner's last step (verified, or dropped, by the next one), and this
        # request's acceptance so far (drafts scheduled / accepted).
        self.spec_token_ids: list[int] = []
        # Structured outputs: set by the engine for a constrained request.
        self.structured_output: GrammarState | None = None
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # Scheduler clock times of the first and the latest output token (SLO
        # attainment, TPOT slack), and the sjf policy's prediction of its output length.
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.predicted_output_tokens: int | None = None
        self.deferred_for: str | None = None  # the policy's last reason to defer it

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def is_finished(self) -> bool:
        return self.status.is_finished

    def get_finished_reason(self) -> str | None:
        return self.status.finish_reason()
