"""Engine flags: one flat dataclass whose fields map 1:1 onto CLI flags (vLLM names)
and onto the frozen config dataclasses of ``kvasir.config``."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields

from kvasir.config import (
    SCHEDULING_POLICIES,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    KernelConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)

# (EngineArgs / SchedulerConfig field, CLI type, help) of the scheduling policies' knobs.
_POLICY_FLAGS: list[tuple[str, type, str]] = [
    ("policy_age_bound_s", float, "lpm/fair/sjf/slo: seconds after which a waiting "
     "request goes first, in arrival order"),
    ("target_tpot_ms", float, "steps with decodes carry only the prefill that keeps them "
     "under this time (stall-free chunking); the chosen budget is a metric"),
    ("fair_prompt_weight", float, "fair: service counted per prompt token"),
    ("fair_output_weight", float, "fair: service counted per output token"),
    ("sjf_aging_tokens_per_s", float, "sjf: predicted tokens forgiven per second waited"),
    ("interactive_ttft_slo_ms", float, "default TTFT SLO of service_tier interactive"),
    ("interactive_tpot_slo_ms", float, "default TPOT SLO of service_tier interactive"),
    ("batch_ttft_slo_ms", float, "default TTFT SLO of service_tier batch"),
    ("batch_tpot_slo_ms", float, "default TPOT SLO of service_tier batch"),
    ("slo_max_batch_wait_s", float, "slo: reject (429) a batch request whose estimated "
     "wait is longer"),
    ("fairness_window_s", float, "Jain's fairness index: the window over tenants' service"),
]  # fmt: skip


@dataclass
class EngineArgs:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct GGUF)
    tokenizer: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    served_model_name: str | None = None
    revision: str | None = None
    download_dir: str | None = None
    gguf_file: str | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_gb: float | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    scheduling_policy: str = "fcfs"
    enable_chunked_prefill: bool = True
    max_queued_requests: int | None = None
    # Scheduling policies' knobs: SchedulerConfig's fields of the same names.
    policy_age_bound_s: float = 10.0
    target_tpot_ms: float | None = None
    fair_prompt_weight: float = 1.0
    fair_output_weight: float = 2.0
    sjf_aging_tokens_per_s: float = 10.0
    interactive_ttft_slo_ms: float | None = 1500.0
    interactive_tpot_slo_ms: float | None = 80.0
    batch_ttft_slo_ms: float | None = None
    batch_tpot_slo_ms: float | None = None
    slo_max_batch_wait_s: float | None = None
    fairness_window_s: float = 60.0
    tenant_service_tiers: str | None = None  # "tenant=batch,other=interactive"
    device: str = "auto"
    attention_backend: str = "auto"
    enforce_eager: bool = False
    cuda_graph_mixed_tokens: int = 512
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    distributed_timeout: float = 60.0
    pipeline_layer_partition: str | tuple[int, ...] | None = None  # "12,12,8" per stage
    enable_expert_parallel: bool = False
    fused_gemv: bool = True
    cpu_prepack: bool = True
    pdl: bool | None = None  # None: on unless KVASIR_PDL=0
    quantization: str | None = None  # fp8 | int8 | w8a8 (online), or the checkpoint's
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False
    # JSON text or a dict, as vLLM's --speculative-config
    speculative_config: str | dict | SpeculativeConfig | None = None
    # Multi-LoRA (vLLM's flags): --lora-modules name=path ... (or a dict / pairs)
    enable_lora: bool = False
    # Watermark (TGI's names for gamma and delta): see kvasir.security.watermark.
    watermark_key: str | None = None
    watermark_gamma: float = 0.25
    watermark_delta: float = 2.0
    watermark_context: int = 1
    lora_modules: list[str] | dict[str, str] | None = None
    max_loras: int = 1
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    lora_dir: str | None = None
    lora_strategy: str = "unmerged"
    lora_max_wait_steps: int = 32

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        g = parser.add_argument_group("engine")
        g.add_argument(
            "--model",
            type=str,
            default=None,
            help="HF model directory, .gguf file, Hugging Face Hub id (org/name, or "
            "org/name:Q4_K_M for a GGUF repo), or (with --load-format dummy) a "
            "built-in config name such as llama-3-8b. Default: SmolLM2-135M-Instruct.",
        )
        g.add_argument(
            "--revision", type=str, default=None, help="hub branch, tag or commit (default main)"
        )
        g.add_argument(
            "--download-dir",
            type=str,
            default=None,
            help="hub cache directory (default: HF_HUB_CACHE, ~/.cache/huggingface/hub)",
        )
        g.add_argument(
            "--gguf-file", type=str, default=None, help="which .gguf file of a hub repo to load"
        )
        g.add_argument("--tokenizer", type=str, default=None)
        g.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "float32", "float16", "bfloat16"],
            help="auto: float32 on the CPU, bfloat16 on a GPU",
        )
        g.add_argument(
            "--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"]
        )
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument(
            "--quantization",
            "-q",
            default=None,
            choices=[
                "fp8",
                "int8",
                "w8a8",
                "compressed-tensors",
                "gptq",
                "awq",
                "gguf",
                "none",
                "bitsandbytes",
            ],
            help="quantise a float checkpoint at load: fp8 (E4M3 W8A8, dynamic per-token "
            "activations), int8 (weight-only W8A16), w8a8 (INT8 weights and dynamic "
            "per-token INT8 activations); gguf (a GGUF file's blocks kept packed), none "
            "(a GGUF file dequantised at load), bitsandbytes (NF4 weights, blocks of 64, "
            "quantised at load). Default: the checkpoint's "
            "quantization_config; for GGUF files gguf on CUDA, none on the CPU",
        )
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--served-model-name", type=str, default=None)
        g.add_argument("--block-size", type=int, default=16)
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        g.add_argument(
            "--kv-cache-gb",
            type=float,
            default=None,
            help="KV cache size in GiB (the CPU's only sizing knob)",
        )
        g.add_argument("--num-gpu-blocks-override", type=int, default=None)
        g.add_argument(
            "--kv-cache-dtype",
            default="auto",
            choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
            help="auto: the model dtype; fp8 (= fp8_e4m3) or fp8_e5m2: K/V stored in FP8 "
            "with per-head scales (half the bytes per block of bf16)",
        )
        g.add_argument(
            "--calculate-kv-scales",
            action="store_true",
            help="FP8 KV cache: set the K/V scales from the first batch instead of the "
            "checkpoint's (or 1.0)",
        )
        g.add_argument(
            "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True
        )
        g.add_argument("--max-num-batched-tokens", type=int, default=2048)
        g.add_argument("--max-num-seqs", type=int, default=256)
        g.add_argument(
            "--scheduling-policy",
            default="fcfs",
            choices=list(SCHEDULING_POLICIES),
            help="fcfs; priority; lpm (longest prefix-cache match first); fair (VTC across "
            "tenants); sjf (shortest predicted output first); slo (deadlines from TTFT/TPOT "
            "SLOs, batch work deferred or rejected when it would make interactive miss)",
        )
        g.add_argument(
            "--tenant-service-tiers",
            default=None,
            help="service tier of each tenant's requests that name none, e.g. "
            "'nightly-jobs=batch,web=interactive'",
        )
        for flag, kind, doc in _POLICY_FLAGS:
            default = getattr(EngineArgs, flag)
            g.add_argument(
                "--" + flag.replace("_", "-"),
                type=kind,
                default=default,
                help=f"{doc} (default {default})",
            )
        g.add_argument(
            "--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True
        )
        g.add_argument("--max-queued-requests", type=int, default=None)
        g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
        g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
        g.add_argument(
            "--cuda-graph-mixed-tokens",
            type=int,
            default=512,
            help="mixed (prefill + decode) steps of up to this many tokens run "
            "as CUDA graphs too; 0: only decode-only steps do",
        )
        g.add_argument(
            "--async-scheduling",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="schedule step N+1 while the device runs step N "
            "(default: on for CUDA, off on the CPU)",
        )
        p = parser.add_argument_group("parallelism")
        p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
        p.add_argument(
            "--distributed-executor-backend",
            default=None,
            choices=["uni", "mp", "ray"],
            help="uni: one rank in this process; mp: one process per rank on this host; "
            "ray: Ray actors, across hosts (default: uni for one rank, mp otherwise)",
        )
        p.add_argument(
            "--distributed-timeout",
            type=float,
            default=60.0,
            help="seconds a collective or a worker's reply may take before the engine "
            "reports itself dead",
        )
        p.add_argument(
            "--pipeline-layer-partition",
            type=str,
            default=None,
            help="decoder layers per pipeline stage, e.g. 12,12,8 (default: even split)",
        )
        p.add_argument(
            "--enable-expert-parallel",
            action="store_true",
            help="MoE models: whole experts on each tensor-parallel rank, tokens sent to "
            "them by all-to-all (default: a slice of every expert on every rank)",
        )
        k = parser.add_argument_group("kernels")
        k.add_argument(
            "--fused-gemv",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="batch-1 decode projections as the Triton GEMV (CUDA, bf16/fp16)",
        )
        k.add_argument(
            "--cpu-prepack",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="CPU float32 linears as oneDNN matmuls on prepacked weights",
        )
        k.add_argument(
            "--pdl",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="programmatic dependent launch for the decode kernels on Hopper "
            "(default: on unless KVASIR_PDL=0)",
        )
        s = parser.add_argument_group("speculative decoding")
        s.add_argument(
            "--speculative-config",
            type=str,
            default=None,
            help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'; methods: '
            "ngram, draft_model (with model), self_spec (with num_layers), eagle and medusa "
            '(with model); "num_speculative_tokens": "auto" adapts k per request and step',
        )
        wm = parser.add_argument_group("watermark")
        wm.add_argument(
            "--watermark-key",
            default=None,
            help="watermark every generated token with this secret (Kirchenbauer green list)",
        )
        wm.add_argument("--watermark-gamma", type=float, default=0.25, help="green fraction")
        wm.add_argument(
            "--watermark-delta", type=float, default=2.0, help="logit bias of green tokens"
        )
        wm.add_argument(
            "--watermark-context", type=int, default=1, help="previous tokens seeding the list"
        )
        lo = parser.add_argument_group("LoRA adapters")
        lo.add_argument("--enable-lora", action="store_true", help="serve LoRA / (IA)^3 adapters")
        lo.add_argument(
            "--lora-modules",
            nargs="+",
            default=None,
            metavar="NAME=PATH",
            help="adapters to register at start-up (PEFT directories), by the name requests "
            "use as their model",
        )
        lo.add_argument(
            "--max-loras", type=int, default=1, help="adapters in device slots (per step)"
        )
        lo.add_argument(
            "--max-cpu-loras",
            type=int,
            default=None,
            help="adapters cached in host memory (default: --max-loras)",
        )
        lo.add_argument("--max-lora-rank", type=int, default=16)
        lo.add_argument(
            "--lora-dir",
            default=None,
            help="a directory of adapters, one sub-directory per adapter name (loaded lazily)",
        )
        lo.add_argument(
            "--lora-strategy",
            choices=["auto", "unmerged", "merged"],
            default="unmerged",
            help="merged: fold B A into the base weights while one adapter runs alone",
        )
        lo.add_argument(
            "--lora-max-wait-steps",
            type=int,
            default=32,
            help="steps a request may wait for a device slot before resident adapters "
            "stop admitting (no starvation)",
        )
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def create_engine_config(self) -> EngineConfig:
        from kvasir.models.default import default_model_path

        model = self.model or default_model_path()
        model_config = ModelConfig(
            model=model,
            tokenizer=self.tokenizer,
            dtype=self.dtype,
            load_format=self.load_format,
            max_model_len=self.max_model_len,
            seed=self.seed,
            served_model_name=self.served_model_name,
            revision=self.revision,
            download_dir=self.download_dir,
            gguf_file=self.gguf_file,
            quantization=self.quantization,
        )
        # The scheduler's max_model_len is resolved against the model by the engine
        # core once the architecture is known (None until then).
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            policy=self.scheduling_policy,
            enable_chunked_prefill=self.enable_chunked_prefill,
            max_queued_requests=self.max_queued_requests,
            **{flag: getattr(self, flag) for flag, _, _ in _POLICY_FLAGS},
            tenant_service_tiers=_parse_tenant_tiers(self.tenant_service_tiers),
        )
        return EngineConfig(
            model_config=model_config,
            parallel_config=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                pipeline_parallel_size=self.pipeline_parallel_size,
                distributed_executor_backend=self.distributed_executor_backend,
                distributed_timeout=self.distributed_timeout,
                pipeline_layer_partition=_parse_partition(self.pipeline_layer_partition),
                enable_expert_parallel=self.enable_expert_parallel,
            ),
            kernel_config=KernelConfig(
                fused_gemv=self.fused_gemv,
                cpu_prepack=self.cpu_prepack,
                # The environment override is read once, here, into the config.
                pdl=self.pdl if self.pdl is not None else os.environ.get("KVASIR_PDL") != "0",
            ),
            cache_config=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_gb=self.kv_cache_gb,
                enable_prefix_caching=self.enable_prefix_caching,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                kv_cache_dtype=self.kv_cache_dtype,
                calculate_kv_scales=self.calculate_kv_scales,
            ),
            scheduler_config=scheduler_config,
            device_config=DeviceConfig(device=self.device),
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
            cuda_graph_mixed_tokens=self.cuda_graph_mixed_tokens,
            async_scheduling=self.async_scheduling,
            speculative_config=parse_speculative_config(self.speculative_config),
            lora_config=self._lora_config(),
            watermark_key=self.watermark_key,
            watermark_gamma=self.watermark_gamma,
            watermark_delta=self.watermark_delta,
            watermark_context=self.watermark_context,
        )

    def _lora_config(self) -> LoRAConfig | None:
        if not self.enable_lora:
            if self.lora_modules:
                raise ValueError("lora_modules needs enable_lora (--enable-lora)")
            return None
        return LoRAConfig(
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.max_lora_rank,
            lora_modules=parse_lora_modules(self.lora_modules),
            lora_dir=self.lora_dir,
            lora_strategy=self.lora_strategy,
            lora_max_wait_steps=self.lora_max_wait_steps,
        )


def parse_speculative_config(
    value: str | dict | SpeculativeConfig | None,
) -> SpeculativeConfig | None:
    """``--speculative-config`` JSON text (or a dict, or a config) -> the config."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON ({e}): {value!r}") from None
    return SpeculativeConfig.from_dict(value)  # type: ignore[arg-type]


def parse_lora_modules(
    value: list[str] | dict[str, str] | tuple | str | None,
) -> tuple[tuple[str, str], ...]:
    """``--lora-modules name=path ...`` (also a dict, or a JSON object per entry as vLLM
    accepts: ``{"name": ..., "path": ...}``) -> ``((name, path), ...)``."""
    if not value:
        return ()
    if isinstance(value, dict):
        return tuple((str(k), str(v)) for k, v in value.items())
    if isinstance(value, str):
        value = value.split()
    out: list[tuple[str, str]] = []
    for item in value:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((str(item[0]), str(item[1])))
            continue
        text = str(item).strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
                out.append((str(obj["name"]), str(obj["path"])))
                continue
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"lora_modules: {text!r} must be name=path or a JSON object with name and path"
                ) from None
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"lora_modules: {text!r} must be name=path")
        out.append((name, path))
    return tuple(out)


def _parse_partition(text: str | tuple[int, ...] | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if not isinstance(text, str):
        return tuple(int(x) for x in text)
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(
            f"pipeline_layer_partition must be comma-separated layer counts such as "
            f"'12,12,8', got {text!r}"
        ) from None


def _parse_tenant_tiers(value: str | None) -> tuple[tuple[str, str], ...]:
    """``"a=batch,b=interactive"`` -> ``(("a", "batch"), ("b", "interactive"))``."""
    if not value:
        return ()
    pairs = []
    for item in value.split(","):
        tenant, sep, tier = item.strip().partition("=")
        if not sep or not tenant:
            raise ValueError(
                f"tenant_service_tiers must be 'tenant=tier,...', got {item.strip()!r}"
            )
        pairs.append((tenant, tier))
    return tuple(pairs)
