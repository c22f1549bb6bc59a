"""The deployment being planned: parallelism, dtypes, quantisation, the engine's
scheduler and cache settings (vLLM's flag names, as the engine's), speculative
decoding. Frozen and validated; errors name the CLI flag."""

from __future__ import annotations

from dataclasses import dataclass

# dtype name -> (bytes per element, roofline dtype of its GEMMs)
DTYPES = {"float32": (4, "fp32"), "bfloat16": (2, "bf16"), "float16": (2, "fp16")}
KV_DTYPES = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}
# --quantization -> (bytes per weight incl. scales, GEMM dtype; None: the model dtype's)
QUANTIZATIONS: dict[str, tuple[float | None, str | None]] = {
    "none": (None, None),
    "fp8": (1.0, "fp8"),  # W8A8 FP8, per-channel scales
    "int8": (1.0, "int8"),  # W8A8 int8 (SmoothQuant-style)
    "int4": (0.5 + 2 / 128, None),  # W4A16 (AWQ/GPTQ), an fp16 scale per 128 weights
    "fp4": (0.5 + 1 / 16, "fp4"),  # NVFP4 W4A4, an fp8 scale per 16 weights
    "q4_1": (20 / 32, None),  # GGUF Q4_1: 32 weights in 20 bytes, dequantised to compute
}
ALLREDUCE = ("auto", "ring", "tree")


def _check(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{flag} {msg}")


@dataclass(frozen=True)
class PlanConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: str = "auto"  # auto: float32 on a CPU, bfloat16 elsewhere (as the engine)
    quantization: str = "none"
    kv_cache_dtype: str = "auto"  # auto: the model dtype
    kv_cache_gb: float | None = None  # per rank; None: gpu_memory_utilization of memory
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    allreduce: str = "auto"
    # Speculative decoding: k draft tokens per step, each accepted with this probability
    # (i.i.d.), proposed by an n-gram matcher (free) or a draft model (its own steps).
    num_speculative_tokens: int = 0
    acceptance_rate: float = 0.7
    draft_model: str | None = None

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1, "--tensor-parallel-size", "must be >= 1")
        _check(self.pipeline_parallel_size >= 1, "--pipeline-parallel-size", "must be >= 1")
        _check(
            self.dtype == "auto" or self.dtype in DTYPES,
            "--dtype",
            f"must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}",
        )
        _check(
            self.quantization in QUANTIZATIONS,
            "--quantization",
            f"must be one of {sorted(QUANTIZATIONS)}, got {self.quantization!r}",
        )
        _check(
            self.kv_cache_dtype == "auto" or self.kv_cache_dtype in KV_DTYPES,
            "--kv-cache-dtype",
            f"must be auto or one of {sorted(KV_DTYPES)}, got {self.kv_cache_dtype!r}",
        )
        if self.kv_cache_gb is not None:
            _check(self.kv_cache_gb > 0, "--kv-cache-gb", f"must be > 0, got {self.kv_cache_gb}")
        _check(
            0 < self.gpu_memory_utilization <= 1,
            "--gpu-memory-utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _check(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            "--block-size",
            f"must be a power of two in [1, 128], got {self.block_size}",
        )
        _check(self.max_num_seqs >= 1, "--max-num-seqs", "must be >= 1")
        _check(self.max_num_batched_tokens >= 1, "--max-num-batched-tokens", "must be >= 1")
        if self.max_model_len is not None:
            _check(self.max_model_len >= 1, "--max-model-len", "must be >= 1")
        _check(self.allreduce in ALLREDUCE, "--allreduce", f"must be one of {ALLREDUCE}")
        _check(self.num_speculative_tokens >= 0, "--num-speculative-tokens", "must be >= 0")
        _check(
            0 <= self.acceptance_rate < 1,
            "--acceptance-rate",
            f"must be in [0, 1), got {self.acceptance_rate}",
        )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def model_dtype(self, hw_kind: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if hw_kind == "cpu" else "bfloat16"

    def act_bytes(self, hw_kind: str) -> int:
        return DTYPES[self.model_dtype(hw_kind)][0]

    def weight_bytes(self, hw_kind: str) -> float:
        """Bytes per weight as stored (scales included)."""
        q = QUANTIZATIONS[self.quantization][0]
        return float(self.act_bytes(hw_kind)) if q is None else q

    def gemm_dtype(self, hw_kind: str) -> str:
        q = QUANTIZATIONS[self.quantization][1]
        return q if q is not None else DTYPES[self.model_dtype(hw_kind)][1]

    def kv_bytes(self, hw_kind: str) -> int:
        if self.kv_cache_dtype == "auto":
            return self.act_bytes(hw_kind)
        return KV_DTYPES[self.kv_cache_dtype]

    def kv_dtype_name(self, hw_kind: str) -> str:
        return self.model_dtype(hw_kind) if self.kv_cache_dtype == "auto" else self.kv_cache_dtype
