"""Validated, frozen configuration dataclasses.

Every CLI flag maps 1:1 onto a field here (see ``EngineArgs`` in
``kvasir/engine/arg_utils.py``). Errors name the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")
SCHEDULING_POLICIES = ("fcfs", "priority", "lpm", "fair", "sjf", "slo")
_POLICIES = SCHEDULING_POLICIES
SERVICE_TIERS = ("interactive", "batch")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DEVICES = ("auto", "cpu", "cuda")
_ATTN_BACKENDS = ("auto", "torch", "triton")
_EXECUTOR_BACKENDS = ("uni", "mp", "ray")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
# --quantization: online schemes, and the checkpoint methods (which must then match).
_QUANTIZATION_METHODS = (
    "fp8", "int8", "w8a8", "compressed-tensors", "gptq", "awq", "gguf", "none", "bitsandbytes",
)  # fmt: skip
SPEC_METHODS = ("ngram", "draft_model", "self_spec", "eagle", "medusa")
# Drafts per request per step; beyond this a step's verification work is mostly wasted.
MAX_SPECULATIVE_TOKENS = 16


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name} {msg}")


@dataclass(frozen=True)
class ModelArchConfig:
    """Architecture of a Llama-family causal LM, read from an HF config.json, GGUF
    metadata or a built-in dummy config. Field names follow HF transformers."""

    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF `rope_scaling` dict (e.g. {"rope_type": "llama3", "factor": 8.0, ...}) or None.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qkv bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    model_type: str = "llama"
    # Mixture of experts (0 experts: every layer dense). A layer ``i`` is sparse unless
    # it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0`` (Qwen MoE).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's MLP width
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert (0: none)
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # State-space (Mamba) layers. ``layer_types[i]`` is "attention" or "mamba" (empty:
    # every layer attention). ``ssm_version`` 1: Mamba-1 (a state per channel, dt_rank);
    # 2: Mamba-2 (ssm_num_heads heads of ssm_head_dim, B/C shared by ssm_n_groups).
    layer_types: tuple[str, ...] = ()
    ssm_version: int = 0
    ssm_state_size: int = 0
    ssm_conv_kernel: int = 4
    ssm_intermediate_size: int = 0
    ssm_dt_rank: int = 0
    ssm_num_heads: int = 0
    ssm_head_dim: int = 0
    ssm_n_groups: int = 1
    ssm_chunk_size: int = 256
    ssm_bias: bool = False  # in_proj / out_proj bias
    ssm_conv_bias: bool = True
    ssm_inner_norms: bool = False  # Jamba: RMSNorm on dt, B and C
    ssm_time_step_limit: tuple[float, float] = (0.0, float("inf"))
    use_rope: bool = True  # Jamba's attention has no positional encoding

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"({self.num_key_value_heads}) must divide num_attention_heads "
            f"({self.num_attention_heads})",
        )
        if self.layer_types:
            _check(
                len(self.layer_types) == self.num_hidden_layers
                and set(self.layer_types) <= {"attention", "mamba"},
                "layer_types",
                f"must list 'attention' or 'mamba' for each of the {self.num_hidden_layers} "
                f"layers, got {list(self.layer_types)}",
            )
        if "mamba" in self.layer_types:
            _check(
                self.ssm_version in (1, 2), "ssm_version", f"must be 1 or 2, got {self.ssm_version}"
            )
            _check(self.ssm_state_size > 0, "ssm_state_size", "must be > 0")
            _check(self.ssm_intermediate_size > 0, "ssm_intermediate_size", "must be > 0")
            _check(self.ssm_conv_kernel >= 2, "ssm_conv_kernel", "must be >= 2")
        if self.num_experts:
            _check(
                0 < self.num_experts_per_tok <= self.num_experts,
                "num_experts_per_tok",
                f"must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}",
            )
            _check(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
            _check(self.decoder_sparse_step >= 1, "decoder_sparse_step", "must be >= 1")

    def is_mamba_layer(self, index: int) -> bool:
        return bool(self.layer_types) and self.layer_types[index] == "mamba"

    @property
    def has_attention(self) -> bool:
        return not self.layer_types or "attention" in self.layer_types

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` has a sparse MoE block instead of a dense MLP."""
        return (
            self.num_experts > 0
            and index not in self.mlp_only_layers
            and (index + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class ModelConfig:
    model: str  # path to an HF directory or .gguf file, or a dummy config name
    tokenizer: str | None = None
    dtype: str = "auto"  # resolved by the runner: float32 on CPU, bfloat16 on CUDA
    load_format: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    served_model_name: str | None = None
    trust_remote_code: bool = False
    # Hub model ids (``org/name[:QUANT]``): kvasir.models.loader.hub
    revision: str | None = None
    download_dir: str | None = None
    gguf_file: str | None = None
    # Online quantisation of a float checkpoint (kvasir.quantization.ONLINE_METHODS);
    # None: the checkpoint's own quantization_config, if any.
    quantization: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.model), "model", "must be a non-empty path or config name")
        _check(
            self.quantization in (None, *_QUANTIZATION_METHODS),
            "quantization",
            f"must be one of {list(_QUANTIZATION_METHODS)} (or unset), got {self.quantization!r}",
        )
        _check(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _check(
            self.load_format in _LOAD_FORMATS,
            "load_format",
            f"must be one of {_LOAD_FORMATS}, got {self.load_format!r}",
        )
        if self.max_model_len is not None:
            _check(self.max_model_len > 0, "max_model_len", "must be > 0")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_gb: float | None = None  # CPU: KV cache size; GPU: overrides utilization
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    # auto: the model's dtype; fp8 (= fp8_e4m3) / fp8_e5m2: K and V stored in FP8 with
    # per-head scales (checkpoint, calculated from the first batch, or 1.0).
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False

    def __post_init__(self) -> None:
        _check(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            f"must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}",
        )
        _check(
            not self.calculate_kv_scales or self.kv_cache_dtype != "auto",
            "calculate_kv_scales",
            "needs an FP8 kv_cache_dtype (fp8, fp8_e4m3 or fp8_e5m2)",
        )
        _check(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            "block_size",
            f"must be a power of two in [1, 128], got {self.block_size}",
        )
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        if self.kv_cache_gb is not None:
            _check(self.kv_cache_gb > 0, "kv_cache_gb", "must be > 0")
        if self.num_gpu_blocks_override is not None:
            _check(self.num_gpu_blocks_override > 0, "num_gpu_blocks_override", "must be > 0")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None until resolved against the model
    policy: str = "fcfs"
    enable_chunked_prefill: bool = True
    max_queued_requests: int | None = None  # None: unbounded waiting queue
    # Policies other than fcfs/priority put a request that has waited this long first
    # (in arrival order), whatever their own order says: no starvation.
    policy_age_bound_s: float = 10.0
    # Adaptive token budget: mixed steps carry only as much prefill as keeps a step
    # under this time (stall-free chunking), from the step-time model.
    target_tpot_ms: float | None = None
    # fair (VTC): the cost of a prompt token and of an output token in a tenant's
    # service counter.
    fair_prompt_weight: float = 1.0
    fair_output_weight: float = 2.0
    # sjf: predicted output tokens forgiven per second waited (aging).
    sjf_aging_tokens_per_s: float = 10.0
    # slo: the default SLOs of each service tier (a request's own fields win); None:
    # no bound. A batch request is rejected (429) when its estimated wait exceeds
    # slo_max_batch_wait_s (None: batch requests are only ever deferred).
    interactive_ttft_slo_ms: float | None = 1500.0
    interactive_tpot_slo_ms: float | None = 80.0
    batch_ttft_slo_ms: float | None = None
    batch_tpot_slo_ms: float | None = None
    slo_max_batch_wait_s: float | None = None
    # The service tier of a tenant's requests that name none: ((tenant, tier), ...).
    tenant_service_tiers: tuple[tuple[str, str], ...] = ()
    # Jain's fairness index is over the tenants' service in this trailing window.
    fairness_window_s: float = 60.0

    def __post_init__(self) -> None:
        _check(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0")
        _check(self.policy_age_bound_s > 0, "policy_age_bound_s", "must be > 0")
        if self.target_tpot_ms is not None:
            _check(self.target_tpot_ms > 0, "target_tpot_ms", "must be > 0")
        _check(self.fair_prompt_weight >= 0, "fair_prompt_weight", "must be >= 0")
        _check(self.fair_output_weight >= 0, "fair_output_weight", "must be >= 0")
        _check(
            self.fair_prompt_weight + self.fair_output_weight > 0,
            "fair_output_weight",
            "and fair_prompt_weight must not both be 0",
        )
        _check(self.sjf_aging_tokens_per_s >= 0, "sjf_aging_tokens_per_s", "must be >= 0")
        for name in (
            "interactive_ttft_slo_ms",
            "interactive_tpot_slo_ms",
            "batch_ttft_slo_ms",
            "batch_tpot_slo_ms",
            "slo_max_batch_wait_s",
        ):
            value = getattr(self, name)
            if value is not None:
                _check(value > 0, name, f"must be > 0, got {value}")
        _check(self.fairness_window_s > 0, "fairness_window_s", "must be > 0")
        for tenant, tier in self.tenant_service_tiers:
            _check(
                tier in SERVICE_TIERS,
                "tenant_service_tiers",
                f"must map tenants to one of {SERVICE_TIERS}, got {tenant!r}: {tier!r}",
            )
        _check(self.max_num_seqs > 0, "max_num_seqs", "must be > 0")
        if self.max_model_len is not None:
            _check(self.max_model_len > 0, "max_model_len", "must be > 0")
        _check(self.policy in _POLICIES, "policy", f"must be one of {_POLICIES}")
        if not self.enable_chunked_prefill and self.max_model_len is not None:
            _check(
                self.max_num_batched_tokens >= self.max_model_len,
                "max_num_batched_tokens",
                f"({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled",
            )
        if self.max_queued_requests is not None:
            _check(self.max_queued_requests > 0, "max_queued_requests", "must be > 0")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"  # auto: cuda if available else cpu

    def __post_init__(self) -> None:
        _check(self.device in _DEVICES, "device", f"must be one of {_DEVICES}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor x pipeline parallelism: ``tensor_parallel_size * pipeline_parallel_size``
    ranks, rank ``pp_rank * tensor_parallel_size + tp_rank``. Checks against the model
    (heads, vocabulary, layers) happen once its architecture is known
    (``kvasir.distributed.validate_parallel_config``)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # None: "uni" for one rank, "mp" (one process per rank on this host) otherwise.
    distributed_executor_backend: str | None = None
    # Seconds a collective (or a worker's reply) may take before the engine gives up.
    distributed_timeout: float = 60.0
    # Decoder layers per pipeline stage (None: as even as possible, earlier stages first).
    pipeline_layer_partition: tuple[int, ...] | None = None
    # MoE layers: whole experts on the tensor-parallel ranks (all-to-all dispatch)
    # instead of a slice of every expert on every rank.
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _check(self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be >= 1")
        if self.distributed_executor_backend is not None:
            _check(
                self.distributed_executor_backend in _EXECUTOR_BACKENDS,
                "distributed_executor_backend",
                f"must be one of {_EXECUTOR_BACKENDS}, got {self.distributed_executor_backend!r}",
            )
            _check(
                self.distributed_executor_backend != "uni" or self.world_size == 1,
                "distributed_executor_backend",
                f"'uni' runs one rank, but tensor_parallel_size x pipeline_parallel_size "
                f"is {self.world_size}; use 'mp' or 'ray'",
            )
        _check(self.distributed_timeout > 0, "distributed_timeout", "must be > 0 seconds")
        if self.pipeline_layer_partition is not None:
            part = self.pipeline_layer_partition
            _check(
                len(part) == self.pipeline_parallel_size and all(n >= 1 for n in part),
                "pipeline_layer_partition",
                f"must list {self.pipeline_parallel_size} layer counts >= 1 (one per "
                f"pipeline stage), got {list(part)}",
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"


@dataclass(frozen=True)
class KernelConfig:
    """Which fast paths the layers take, fixed at construction (CUDA graphs freeze
    whatever a forward did at capture, so these are never switched at run time).
    Benchmarks compare variants by building two engines."""

    # Batch-1 decode projections as the single-row Triton GEMV (CUDA, bf16/fp16).
    fused_gemv: bool = True
    # CPU float32 linears as oneDNN matmuls on weights prepacked after loading.
    cpu_prepack: bool = True
    # Programmatic dependent launch for the decode kernels (Hopper on; ignored elsewhere).
    pdl: bool = True


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``--speculative-config`` (a JSON object): how drafts are proposed and how
    many per request per step. Checks against the target model (draft vocabulary, head
    sizes, layer counts) happen when the proposer is built (``kvasir.spec_decode``).

    ``num_speculative_tokens`` is a fixed k, or ``"auto"``: k chosen per request and
    per step, up to ``max_speculative_tokens``, from measured acceptance and the
    engine's step-cost model (``kvasir.spec_decode.adaptive``)."""

    method: str
    num_speculative_tokens: int | str = 3
    # "auto": the largest k a request may get.
    max_speculative_tokens: int = 6
    # ngram: the n-gram lengths matched against the request's own tokens.
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # draft_model / eagle / medusa: the draft's checkpoint (HF directory or .gguf).
    model: str | None = None
    load_format: str = "auto"
    # self_spec: the target's first num_layers decoder layers (plus its norm and LM
    # head) are the draft. None: a quarter of the layers.
    num_layers: int | None = None

    def __post_init__(self) -> None:
        name = "speculative_config"
        _check(
            self.method in SPEC_METHODS,
            f"{name}.method",
            f"must be one of {SPEC_METHODS}, got {self.method!r}",
        )
        k = self.num_speculative_tokens
        if isinstance(k, str):
            _check(
                k == "auto", f"{name}.num_speculative_tokens", f"must be >= 1 or 'auto', got {k!r}"
            )
            limit = self.max_speculative_tokens
            _check(
                1 <= limit <= MAX_SPECULATIVE_TOKENS,
                f"{name}.max_speculative_tokens",
                f"must be in [1, {MAX_SPECULATIVE_TOKENS}], got {limit}",
            )
        else:
            _check(
                isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_SPECULATIVE_TOKENS,
                f"{name}.num_speculative_tokens",
                f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}] or 'auto', got {k!r}",
            )
        _check(
            1 <= self.prompt_lookup_min <= self.prompt_lookup_max,
            f"{name}.prompt_lookup_min",
            f"must satisfy 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= "
            f"prompt_lookup_max ({self.prompt_lookup_max})",
        )
        needs_model = self.method in ("draft_model", "eagle", "medusa")
        _check(
            not needs_model or bool(self.model),
            f"{name}.model",
            f"is required for method {self.method!r} (the draft's checkpoint)",
        )
        _check(
            self.load_format in _LOAD_FORMATS,
            f"{name}.load_format",
            f"must be one of {_LOAD_FORMATS}, got {self.load_format!r}",
        )
        if self.num_layers is not None:
            _check(self.num_layers >= 1, f"{name}.num_layers", "must be >= 1")

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots past a sampling step that the proposer's own draft steps write
        (drafting models with a KV cache: one per draft but the last)."""
        return self.k if self.method in ("draft_model", "self_spec", "eagle") else 0

    @property
    def adaptive(self) -> bool:
        return self.num_speculative_tokens == "auto"

    @property
    def k(self) -> int:
        """The most drafts a request gets in one step."""
        k = self.num_speculative_tokens
        return self.max_speculative_tokens if isinstance(k, str) else k

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        """From the JSON object users pass; unknown keys are refused by name."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {d!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"speculative_config has unknown field(s) {unknown}; known: {sorted(known)}"
            )
        if "method" not in d:
            raise ValueError(f"speculative_config.method is required (one of {SPEC_METHODS})")
        return cls(**d)


LORA_STRATEGIES = ("auto", "unmerged", "merged")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (``--enable-lora``; vLLM's flags, see ``kvasir.lora``).

    ``max_loras`` adapters sit in device slots at once (so at most that many distinct
    adapters run in one step), ``max_cpu_loras`` in host memory; any number on disk
    (``lora_modules`` registered by name, or a directory per adapter under
    ``lora_dir``). ``lora_strategy``: "unmerged" computes ``W0 x + B A x`` per token;
    "merged" folds ``B A`` into the base weights while a single adapter is the only one
    running (and restores them bit for bit when the mix changes); "auto" picks per run
    of steps from measured costs. ``lora_max_wait_steps``: how many steps a request may
    wait for a device slot before adapters already resident stop admitting new
    requests, so a cold adapter is never starved."""

    max_loras: int = 1
    max_cpu_loras: int | None = None  # None: max_loras
    max_lora_rank: int = 16
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path)
    lora_dir: str | None = None
    lora_strategy: str = "unmerged"
    lora_max_wait_steps: int = 32

    def __post_init__(self) -> None:
        _check(self.max_loras >= 1, "max_loras", f"must be >= 1, got {self.max_loras}")
        if self.max_cpu_loras is not None:
            _check(
                self.max_cpu_loras >= self.max_loras,
                "max_cpu_loras",
                f"({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})",
            )
        _check(
            1 <= self.max_lora_rank <= 512,
            "max_lora_rank",
            f"must be in [1, 512], got {self.max_lora_rank}",
        )
        _check(
            self.lora_strategy in LORA_STRATEGIES,
            "lora_strategy",
            f"must be one of {LORA_STRATEGIES}, got {self.lora_strategy!r}",
        )
        _check(self.lora_max_wait_steps >= 1, "lora_max_wait_steps", "must be >= 1")
        names = [n for n, _ in self.lora_modules]
        _check(
            len(names) == len(set(names)),
            "lora_modules",
            f"names must be unique, got {names}",
        )
        for name, path in self.lora_modules:
            _check(bool(name) and bool(path), "lora_modules", "entries must be name=path")

    @property
    def num_cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    kernel_config: KernelConfig = field(default_factory=KernelConfig)
    attention_backend: str = "auto"  # auto: triton on CUDA, torch on CPU
    enforce_eager: bool = False  # disable CUDA graphs
    # Mixed (prefill + decode) steps of up to this many tokens run as CUDA graphs too
    # (0: only decode-only steps do).
    cuda_graph_mixed_tokens: int = 512
    disable_log_stats: bool = True
    # Schedule step N + 1 while the device runs step N (None: on for CUDA, off on CPU).
    async_scheduling: bool | None = None
    speculative_config: SpeculativeConfig | None = None
    lora_config: LoRAConfig | None = None  # None: LoRA off (--enable-lora)
    # Green-list watermark of every sampled token (kvasir.security.watermark); None: off.
    watermark_key: str | None = None
    watermark_gamma: float = 0.25
    watermark_delta: float = 2.0
    watermark_context: int = 1

    def __post_init__(self) -> None:
        _check(self.cuda_graph_mixed_tokens >= 0, "cuda_graph_mixed_tokens", "must be >= 0")
        _check(0.0 < self.watermark_gamma < 1.0, "watermark_gamma", "must be in (0, 1)")
        _check(0.0 <= self.watermark_delta <= 20.0, "watermark_delta", "must be in [0, 20]")
        _check(1 <= self.watermark_context <= 8, "watermark_context", "must be in [1, 8]")
        _check(self.watermark_key != "", "watermark_key", "must not be empty")
        _check(
            self.attention_backend in _ATTN_BACKENDS,
            "attention_backend",
            f"must be one of {_ATTN_BACKENDS}",
        )
