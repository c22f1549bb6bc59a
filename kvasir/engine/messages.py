"""Typed messages into the engine core (msgspec: never pickle)."""

from __future__ import annotations

import msgspec

from kvasir.lora.request import LoRARequest
from kvasir.pooling_params import PoolingParams
from kvasir.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, omit_defaults=True):
    """One sequence for the engine core. ``n > 1`` requests are fanned out by the
    client into children ``f"{i}_{parent_id}"``; children i >= 1 carry ``fork_of``
    (the first child's id) so the core shares the prompt's KV blocks."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int] = []
    arrival_time: float = 0.0
    priority: int = 0
    cache_salt: str | None = None
    fork_of: str | None = None
    # An embedding request: prefill only, one pooled hidden state back.
    pooling_params: PoolingParams | None = None
    # The adapter it runs under (None: the base model).
    lora_request: LoRARequest | None = None
    # Scheduling (``--scheduling-policy``): the tenant it is served for (fair), its
    # class (interactive / batch) and its own SLOs (None: the class's defaults).
    tenant: str | None = None
    service_tier: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None


class SchedulingHints(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a caller tells the scheduler about a request beyond ``priority``; copied
    into each ``EngineCoreRequest`` of it."""

    tenant: str | None = None
    service_tier: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None


class EngineCoreAbort(msgspec.Struct):
    request_ids: list[str]


def encode(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)
