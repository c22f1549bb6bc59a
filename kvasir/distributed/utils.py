"""Start-up checks of a parallel configuration against the model, and the layer split."""

from __future__ import annotations

from kvasir.config import ModelArchConfig, ParallelConfig


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_parallel_config(
    config: ParallelConfig, arch: ModelArchConfig, num_devices: int | None
) -> None:
    """Refuse a split the model cannot take, naming the flag and the allowed values.

    ``num_devices``: the CUDA GPUs on this host for a CUDA run of the "mp" executor
    (None: not limited, e.g. the CPU or Ray across hosts)."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if "mamba" in arch.layer_types and config.world_size > 1:
        raise ValueError(
            "state-space (Mamba) layers do not support tensor parallelism or pipeline "
            "parallelism yet; use --tensor-parallel-size 1 --pipeline-parallel-size 1"
        )
    for what, n in (
        ("num_attention_heads", arch.num_attention_heads),
        ("vocab_size", arch.vocab_size),
        ("intermediate_size", arch.intermediate_size),
    ):
        if n % tp:
            allowed = [d for d in _divisors(arch.num_attention_heads) if _fits(d, arch)]
            raise ValueError(
                f"--tensor-parallel-size {tp} does not divide the model's {what} ({n}); "
                f"allowed tensor-parallel sizes for this model: {allowed}"
            )
    if arch.num_experts and tp > 1:
        if config.enable_expert_parallel and arch.num_experts % tp:
            raise ValueError(
                f"--enable-expert-parallel with --tensor-parallel-size {tp}: the model's "
                f"num_experts ({arch.num_experts}) must be divisible by it; allowed: "
                f"{[d for d in _divisors(arch.num_experts) if _fits(d, arch)]}"
            )
        if not config.enable_expert_parallel and arch.moe_intermediate_size % tp:
            raise ValueError(
                f"--tensor-parallel-size {tp} does not divide the model's "
                f"moe_intermediate_size ({arch.moe_intermediate_size}); use a divisor or "
                f"--enable-expert-parallel"
            )
    kvh = arch.num_key_value_heads
    if kvh % tp and tp % kvh:
        allowed = [d for d in _divisors(arch.num_attention_heads) if _fits(d, arch)]
        raise ValueError(
            f"--tensor-parallel-size {tp} must divide num_key_value_heads ({kvh}) or be a "
            f"multiple of it (KV heads are split or replicated); allowed: {allowed}"
        )
    layers = arch.num_hidden_layers
    if pp > layers:
        raise ValueError(
            f"--pipeline-parallel-size {pp} is larger than the model's {layers} layers; "
            f"allowed: 1..{layers}"
        )
    part = config.pipeline_layer_partition
    if part is not None and sum(part) != layers:
        raise ValueError(
            f"--pipeline-layer-partition {','.join(map(str, part))} sums to {sum(part)}, "
            f"but the model has {layers} layers"
        )
    if num_devices is not None and config.world_size > num_devices:
        raise ValueError(
            f"--tensor-parallel-size x --pipeline-parallel-size = {config.world_size} "
            f"ranks, but this host has {num_devices} CUDA device(s); allowed: at most "
            f"{num_devices} ranks (one per GPU)"
        )


def _fits(tp: int, arch: ModelArchConfig) -> bool:
    kvh = arch.num_key_value_heads
    return (
        arch.num_attention_heads % tp == 0
        and arch.vocab_size % tp == 0
        and arch.intermediate_size % tp == 0
        and (kvh % tp == 0 or tp % kvh == 0)
    )


def stage_layers(config: ParallelConfig, num_layers: int, pp_rank: int) -> tuple[int, int]:
    """``[start, end)`` of the decoder layers that pipeline stage ``pp_rank`` holds."""
    part = config.pipeline_layer_partition
    pp = config.pipeline_parallel_size
    if part is None:
        base, extra = divmod(num_layers, pp)
        part = tuple(base + (1 if i < extra else 0) for i in range(pp))
    start = sum(part[:pp_rank])
    return start, start + part[pp_rank]
