"""Checks of a deployment against the model and the device, before anything is
predicted: the parallel split the engine would refuse, a device that cannot hold the
model. Errors name the flag and the values allowed (as the engine's own start-up
checks, ``kvasir.distributed.validate_parallel_config``)."""

from __future__ import annotations

import logging

from kvasir.plan.config import PlanConfig
from kvasir.plan.hardware import Hardware
from kvasir.plan.memory import capacity
from kvasir.plan.model_spec import ModelSpec
from kvasir.plan.perf import DEVICES_PER_HOST

logger = logging.getLogger(__name__)


def allowed_tp_sizes(spec: ModelSpec) -> list[int]:
    top = max(spec.num_heads, 1) if spec.num_attention_layers else 64
    return [d for d in range(1, top + 1) if _tp_fits(spec, d)]


def _tp_fits(spec: ModelSpec, tp: int) -> bool:
    sizes = [spec.vocab_size]
    if spec.num_attention_layers:
        sizes.append(spec.num_heads)
    if spec.intermediate_size:
        sizes.append(spec.intermediate_size)
    if spec.is_moe:
        sizes.append(spec.moe_intermediate_size)
    if spec.mamba is not None:
        sizes.append(spec.mamba.d_inner)
    if any(n % tp for n in sizes):
        return False
    kvh = spec.num_kv_heads
    return not spec.num_attention_layers or kvh % tp == 0 or tp % kvh == 0


def validate(spec: ModelSpec, cfg: PlanConfig, hw: Hardware) -> None:
    """Raise ValueError naming the flag for a split the engine would refuse, or a
    model that does not fit (by how much); warn for a tensor-parallel group wider
    than a host."""
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    if not _tp_fits(spec, tp):
        raise ValueError(
            f"--tensor-parallel-size {tp} does not divide {spec.name}'s heads, KV heads, "
            f"vocabulary or MLP; allowed tensor-parallel sizes: {allowed_tp_sizes(spec)}"
        )
    if pp > spec.num_layers:
        raise ValueError(
            f"--pipeline-parallel-size {pp} is larger than {spec.name}'s "
            f"{spec.num_layers} layers; allowed: 1..{spec.num_layers}"
        )
    if tp > DEVICES_PER_HOST:
        logger.warning(
            "--tensor-parallel-size %d spans hosts (%d devices per host): its all-reduces "
            "cross the network",
            tp,
            DEVICES_PER_HOST,
        )
    if cfg.draft_model and not cfg.num_speculative_tokens:
        raise ValueError("--draft-model needs --num-speculative-tokens >= 1")
    capacity(spec, cfg, hw)  # raises when it does not fit, saying by how much
