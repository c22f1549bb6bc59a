"""Memory per rank: weights, the KV cache the engine would allocate, and what that
buys (concurrency, maximum batch), plus the block-size and KV-growth studies.

The KV block count for a given budget is the engine's own arithmetic: the layers'
``FullAttentionSpec``s and ``num_blocks_in`` of ``kvasir/core/kv_cache_spec.py``, the
minimum over ranks (``kvasir/executor``). With ``--kv-cache-gb`` it equals the engine's
start-up number exactly; from ``--gpu-memory-utilization`` it is an estimate, since the
engine measures a profiling pass that this model predicts.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from kvasir.core.kv_cache_spec import FullAttentionSpec, bytes_per_block, num_blocks_in
from kvasir.plan.config import PlanConfig
from kvasir.plan.hardware import Hardware
from kvasir.plan.model_spec import ModelSpec
from kvasir.plan.roofline import local_kv_heads, stage_layer_range

GIB = 1 << 30
# CUDA context, cuBLAS workspaces and allocator slack outside the profiled peak
# (the engine subtracts what it sees; this model can only assume it).
CUDA_CONTEXT_BYTES = 512 << 20
_KV_DTYPE_NAMES = {
    "float32": ("float32", 4),
    "bfloat16": ("bfloat16", 2),
    "float16": ("float16", 2),
    "fp8": ("float8_e4m3fn", 1),
    "fp8_e4m3": ("float8_e4m3fn", 1),
    "fp8_e5m2": ("float8_e5m2", 1),
}


def kv_cache_specs(
    spec: ModelSpec, cfg: PlanConfig, hw_kind: str, stage: int = 0, block_size: int | None = None
) -> list[FullAttentionSpec]:
    """The specs the engine's attention layers of pipeline stage ``stage`` declare on
    one tensor-parallel rank (``Attention.kv_cache_spec``), one per attention layer."""
    name, size = _KV_DTYPE_NAMES[cfg.kv_dtype_name(hw_kind)]
    start, end = stage_layer_range(spec.num_layers, cfg.pipeline_parallel_size, stage)
    kvh = local_kv_heads(spec.num_kv_heads, cfg.tensor_parallel_size) if spec.num_kv_heads else 0
    return [
        FullAttentionSpec(
            block_size=block_size or cfg.block_size,
            num_kv_heads=kvh,
            head_dim=spec.head_dim,
            dtype=name,
            element_size=size,
        )
        for t in spec.layer_types[start:end]
        if t != "mamba"
    ]


def weight_bytes_per_rank(spec: ModelSpec, cfg: PlanConfig, hw_kind: str, stage: int = 0) -> float:
    """Weights one rank of stage ``stage`` holds: its layers' shards, the embedding on
    the first stage, the LM head on the last (shared with a tied embedding in one
    stage). On a CPU the engine keeps a second, oneDNN-prepacked copy of every linear
    weight (README, "On the CPU")."""
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    wb, ab = cfg.weight_bytes(hw_kind), cfg.act_bytes(hw_kind)
    start, end = stage_layer_range(spec.num_layers, pp, stage)
    h = spec.hidden_size
    linear = 0.0
    replicated = 0.0
    for i in range(start, end):
        norms = 2 * h if spec.layer_types[i] != "mamba" else h
        linear += (spec.layer_params(i) - norms) / tp
        replicated += norms
    emb = spec.vocab_size * h / tp
    embed = emb if stage == 0 else 0.0
    head = emb if stage == pp - 1 and not (spec.tie_word_embeddings and pp == 1) else 0.0
    if stage == pp - 1:
        replicated += h
    prepack = 2 if hw_kind == "cpu" else 1
    # embedding rows are gathered, not multiplied: kept in the model dtype unquantised
    return linear * wb * prepack + head * wb * prepack + embed * ab + replicated * ab


def activation_peak_bytes(
    spec: ModelSpec, cfg: PlanConfig, hw_kind: str, max_model_len: int
) -> float:
    """The engine's profiling pass (``profile_run``): max_num_batched_tokens tokens
    through one layer at a time (hidden, residual, qkv, gate_up and its product alive
    together) plus float32 logits of max_num_seqs rows."""
    tp = cfg.tensor_parallel_size
    t = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * max_model_len)
    ab = cfg.act_bytes(hw_kind)
    h = spec.hidden_size
    qkv = (spec.q_size + 2 * spec.kv_size) / tp
    inter = (
        max(spec.intermediate_size, spec.moe_intermediate_size * max(spec.num_experts_per_tok, 1))
        / tp
    )
    per_token = (3 * h + qkv + 3 * inter) * ab
    rows = min(cfg.max_num_seqs, t)
    return t * per_token + rows * spec.vocab_size * 4


@dataclass(frozen=True)
class Capacity:
    """Per rank unless said otherwise; ``num_blocks`` counts the null block, as the
    engine's ``num_gpu_blocks``; ``usable_blocks`` = num_blocks - 1."""

    weights_bytes: float
    kv_budget_bytes: float
    kv_bytes_per_block: int
    num_blocks: int
    block_size: int
    max_model_len: int
    kv_bytes_per_token: float  # all ranks together, every attention layer
    ssm_state_bytes_per_seq: float
    exact: bool  # True when num_blocks is the engine's own arithmetic on a given budget
    device_memory_bytes: float

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def kv_tokens(self) -> int:
        return self.usable_blocks * self.block_size

    @property
    def max_concurrency(self) -> float:
        """Requests of max_model_len tokens that fit at once (as the engine logs it)."""
        return self.kv_tokens / self.max_model_len

    def max_batch(self, seq_len: int) -> int:
        """Requests of ``seq_len`` tokens that fit at once (whole blocks each)."""
        return self.usable_blocks // max(1, math.ceil(seq_len / self.block_size))

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "weights_gib": self.weights_bytes / GIB,
            "kv_budget_gib": self.kv_budget_bytes / GIB,
            "kv_bytes_per_block": self.kv_bytes_per_block,
            "num_blocks": self.num_blocks,
            "usable_blocks": self.usable_blocks,
            "block_size": self.block_size,
            "kv_tokens": self.kv_tokens,
            "max_model_len": self.max_model_len,
            "max_concurrency": self.max_concurrency,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "ssm_state_bytes_per_seq": self.ssm_state_bytes_per_seq,
            "num_blocks_exact": self.exact,
        }


def resolve_max_model_len(spec: ModelSpec, cfg: PlanConfig) -> int:
    if cfg.max_model_len is None:
        return spec.max_position_embeddings
    if cfg.max_model_len > spec.max_position_embeddings:
        raise ValueError(
            f"--max-model-len {cfg.max_model_len} is larger than the model's "
            f"max_position_embeddings ({spec.max_position_embeddings})"
        )
    return cfg.max_model_len


def kv_bytes_per_token(spec: ModelSpec, cfg: PlanConfig, hw_kind: str) -> float:
    """2 (K and V) x attention layers x kv_heads x head_dim x dtype bytes, the whole
    model (KV heads replicated under tensor parallelism counted once)."""
    return (
        2.0 * spec.num_attention_layers * spec.num_kv_heads * spec.head_dim * cfg.kv_bytes(hw_kind)
    )


def kv_bytes_per_seq(spec: ModelSpec, cfg: PlanConfig, hw_kind: str, seq_len: int) -> float:
    """Bytes one sequence of ``seq_len`` tokens keeps, whole blocks: full-attention
    layers hold every token; sliding-window layers at most window + one block; Mamba
    layers a fixed state."""
    bs = cfg.block_size
    per_layer_token = 2.0 * spec.num_kv_heads * spec.head_dim * cfg.kv_bytes(hw_kind)
    full_blocks = math.ceil(seq_len / bs)
    total = 0.0
    for t in spec.layer_types:
        if t == "attention":
            total += full_blocks * bs * per_layer_token
        elif t == "sliding_attention":
            w = spec.sliding_window or seq_len
            total += min(full_blocks, math.ceil(w / bs) + 1) * bs * per_layer_token
    return total + ssm_state_bytes(spec)


def ssm_state_bytes(spec: ModelSpec) -> float:
    if spec.mamba is None:
        return 0.0
    return float(spec.num_mamba_layers * spec.mamba.state_elements() * 4)  # float32 states


def capacity(spec: ModelSpec, cfg: PlanConfig, hw: Hardware) -> Capacity:
    """Weights, KV budget and blocks per rank. Raises ValueError when the weights (or
    the weights and one forward pass) do not fit, saying by how much."""
    max_len = resolve_max_model_len(spec, cfg)
    pp = cfg.pipeline_parallel_size
    mem = float(hw.memory_bytes)
    per_stage = []
    for stage in range(pp):
        specs = kv_cache_specs(spec, cfg, hw.kind, stage)
        weights = weight_bytes_per_rank(spec, cfg, hw.kind, stage)
        per_stage.append((stage, specs, weights))
    weights_max = max(w for _, _, w in per_stage)
    usable_mem = mem * (cfg.gpu_memory_utilization if hw.kind != "cpu" else 1.0)
    if weights_max > usable_mem:
        short = weights_max - usable_mem
        raise ValueError(
            f"{spec.name} does not fit on {hw.name}: the weights of one rank take "
            f"{weights_max / GIB:.1f} GiB but {hw.name} has {usable_mem / GIB:.1f} GiB "
            f"usable ({mem / GIB:.1f} GiB"
            + (
                f" x --gpu-memory-utilization {cfg.gpu_memory_utilization}"
                if hw.kind != "cpu"
                else ""
            )
            + f"): short by {short / GIB:.1f} GiB; raise --tensor-parallel-size or "
            "--pipeline-parallel-size, or use --quantization"
        )
    exact = cfg.kv_cache_gb is not None or hw.kind == "cpu"
    counts = []
    for _stage, specs, weights in per_stage:
        if not specs:  # a stage of Mamba layers only: no KV blocks
            continue
        if cfg.kv_cache_gb is not None:
            budget = int(cfg.kv_cache_gb * GIB)
        elif hw.kind == "cpu":
            budget = GIB  # the engine's CPU default (kv_cache_sizing.determine_num_blocks)
        else:
            act = activation_peak_bytes(spec, cfg, hw.kind, max_len)
            context = CUDA_CONTEXT_BYTES if hw.kind == "gpu" else 0
            budget = int(mem * cfg.gpu_memory_utilization - weights - act - context)
            if budget < bytes_per_block(specs):
                raise ValueError(
                    f"no memory left for the KV cache on {hw.name}: weights "
                    f"{weights / GIB:.1f} GiB + a forward pass {act / GIB:.1f} GiB leave "
                    f"{budget / GIB:.2f} GiB of {mem * cfg.gpu_memory_utilization / GIB:.1f} GiB "
                    "under --gpu-memory-utilization; raise it, lower "
                    "--max-num-batched-tokens, or add ranks"
                )
        counts.append((num_blocks_in(budget, specs), budget, bytes_per_block(specs)))
    if not counts:
        num_blocks, budget, bpb = 0, 0, 0
    else:
        num_blocks, budget, bpb = min(counts)
    return Capacity(
        weights_bytes=weights_max,
        kv_budget_bytes=float(budget),
        kv_bytes_per_block=bpb,
        num_blocks=num_blocks,
        block_size=cfg.block_size,
        max_model_len=max_len,
        kv_bytes_per_token=kv_bytes_per_token(spec, cfg, hw.kind),
        ssm_state_bytes_per_seq=ssm_state_bytes(spec),
        exact=exact,
        device_memory_bytes=mem,
    )


# -- studies ---------------------------------------------------------------------------


def block_table_bytes_per_block() -> int:
    """What one more block costs outside the cache: its int32 block-table entry on the
    device plus the engine's host-side ``KVCacheBlock`` (measured with sys.getsizeof)."""
    from kvasir.core.block_pool import KVCacheBlock

    return 4 + sys.getsizeof(KVCacheBlock(0))


def expected_waste_tokens(block_size: int, lengths: range) -> float:
    """Mean unused slots in a sequence's last block over ``lengths`` (uniform)."""
    n = len(lengths)
    return sum(math.ceil(L / block_size) * block_size - L for L in lengths) / n


def block_size_study(
    spec: ModelSpec, cfg: PlanConfig, hw_kind: str, lengths: range
) -> list[dict[str, float]]:
    """Per block size: KV bytes lost to internal fragmentation and bytes of block
    tables, per sequence, for sequence lengths uniform over ``lengths``; the best
    block size minimises their sum."""
    per_token = kv_bytes_per_token(spec, cfg, hw_kind)
    table = block_table_bytes_per_block()
    mean_len = sum(lengths) / len(lengths)
    rows = []
    for bs in (1, 2, 4, 8, 16, 32, 64, 128):
        waste = expected_waste_tokens(bs, lengths) * per_token
        tables = sum(math.ceil(L / bs) for L in lengths) / len(lengths) * table
        rows.append(
            {
                "block_size": bs,
                "fragmentation_bytes": waste,
                "table_bytes": tables,
                "total_bytes": waste + tables,
                "waste_fraction": waste / (mean_len * per_token),
            }
        )
    return rows


def best_block_size(rows: list[dict[str, float]]) -> int:
    return int(min(rows, key=lambda r: r["total_bytes"])["block_size"])
