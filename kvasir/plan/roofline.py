"""FLOPs and bytes of every operator of one engine step, per rank, and where each sits
on a device's roofline.

A step is what the scheduler hands the runner: some single-token decode rows (each
with its context length, the new token included) and some prompt chunks (each with
its new tokens and the tokens already in the cache). Counts follow kvasir's model:
fused qkv and gate_up projections, RMSNorm with the residual add fused, RoPE on q and
k, a KV-cache write, attention, SiLU-and-mul, the LM head over one row per sampling
request, and the sampler. FLOPs count multiply and add separately (2 per MAC); bytes
are what the operator must move to or from device memory at least once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvasir.plan.config import PlanConfig
from kvasir.plan.model_spec import ModelSpec

KINDS = ("gemm", "attention", "elementwise", "ssm", "sampler", "comm")
# Query rows per attention tile: K/V are re-read once per tile of queries (FlashAttention).
_ATTN_QUERY_TILE = 128
_SSM_STATE_BYTES = 4  # Mamba states are kept in float32
# FLOPs per (channel, state) element per token of the selective scan: discretise
# (exp, mul), update h = a * h + b * x (2 mul + add), read out C . h (mul + add),
# for v1; Mamba-2's scalar decay per head saves the elementwise exp per element.
_SCAN_FLOPS = {1: 9, 2: 6}


@dataclass(frozen=True)
class StepShape:
    """``decode_context_lens[i]``: tokens request i attends to (its new token included);
    ``prefill_chunks[j] = (num_new_tokens, num_computed_tokens)``."""

    decode_context_lens: tuple[int, ...] = ()
    prefill_chunks: tuple[tuple[int, int], ...] = ()
    num_spec_tokens: int = 0  # per decode row: draft tokens verified with it
    # Chunks that stop short of their prompt's end: they sample nothing, so the runner
    # computes no logits for them.
    num_partial_chunks: int = 0

    def __post_init__(self) -> None:
        if any(c < 1 for c in self.decode_context_lens):
            raise ValueError("decode context lengths must be >= 1")
        if any(n < 1 or c < 0 for n, c in self.prefill_chunks):
            raise ValueError("prefill chunks need >= 1 new token and >= 0 computed")
        if not 0 <= self.num_partial_chunks <= len(self.prefill_chunks):
            raise ValueError("num_partial_chunks must be in [0, number of chunks]")

    @property
    def num_decode(self) -> int:
        return len(self.decode_context_lens)

    @property
    def num_tokens(self) -> int:
        per_decode = 1 + self.num_spec_tokens
        return self.num_decode * per_decode + sum(n for n, _ in self.prefill_chunks)

    @property
    def num_sampled_rows(self) -> int:
        """Rows the LM head and sampler see: every decode row and its drafts, and each
        chunk that completes its prompt."""
        finals = len(self.prefill_chunks) - self.num_partial_chunks
        return self.num_decode * (1 + self.num_spec_tokens) + finals

    @property
    def num_reqs(self) -> int:
        return self.num_decode + len(self.prefill_chunks)

    @classmethod
    def decode(cls, batch: int, context_len: int, num_spec_tokens: int = 0) -> StepShape:
        return cls((context_len,) * batch, (), num_spec_tokens)

    @classmethod
    def prefill(cls, prompt_len: int, batch: int = 1, computed: int = 0) -> StepShape:
        return cls((), ((prompt_len, computed),) * batch)


@dataclass(frozen=True)
class Operator:
    """One operator summed over the layers that run it (``count`` of them)."""

    name: str
    kind: str
    flops: float
    bytes: float
    dtype: str  # roofline dtype of its arithmetic (gemm: the weights' GEMM dtype)
    count: int = 1  # layers (or calls) it is summed over
    calls: int = 1  # kernel launches / framework calls in total
    message_bytes: float = 0.0  # comm: bytes of one collective's message
    # What the implementation moves, where that is more than the minimum ``bytes``
    # (kvasir's torch backend gathers K/V into a copy before attending); None: bytes.
    moved_bytes: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def traffic(self) -> float:
        return self.bytes if self.moved_bytes is None else self.moved_bytes

    @property
    def intensity(self) -> float:
        """Operational intensity, FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else math.inf


def stage_layer_range(num_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """Layers of pipeline stage ``stage``: as even as possible, earlier stages first
    (the engine's default partition, ``kvasir.distributed.stage_layers``)."""
    base, extra = divmod(num_layers, pp)
    sizes = [base + (1 if i < extra else 0) for i in range(pp)]
    start = sum(sizes[:stage])
    return start, start + sizes[stage]


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads one rank holds: split, or one replicated head once tp > kv heads."""
    return max(1, num_kv_heads // tp)


def attention_pairs(q_len: int, past: int, window: int | None) -> float:
    """(query, key) pairs of a causal chunk of ``q_len`` queries after ``past`` cached
    tokens, each query seeing at most ``window`` keys (itself included)."""
    if window is None:
        return q_len * past + q_len * (q_len + 1) / 2
    # query j (1-based) sees min(past + j, window) keys
    full = max(0, min(q_len, window - past))  # queries before the window bites
    pairs = full * past + full * (full + 1) / 2
    return pairs + (q_len - full) * window


def torch_decode_groups(context_lens: Sequence[int]) -> list[list[int]]:
    """The length groups kvasir's torch backend attends the decode rows of a step in
    (its own grouping, ``kvasir/attention/torch_backend.py``: up to four groups of
    similar length, when that saves more padded slots than the extra calls cost)."""
    from kvasir.attention.torch_backend import _length_groups

    return _length_groups(list(context_lens))


def _gemm(
    name: str, rows: int, k: int, n: int, wb: float, ab: int, dtype: str, count: int, **extra
) -> Operator:
    flops = 2.0 * rows * k * n * count
    byts = (k * n * wb + rows * (k + n) * ab) * count
    return Operator(
        name,
        "gemm",
        flops,
        byts,
        dtype,
        count,
        count,
        extra={"rows": rows, "k": k, "n": n, **extra},
    )


def _elementwise(
    name: str, flops: float, byts: float, ab_dtype: str, count: int, calls_per: int = 1
) -> Operator:
    return Operator(
        name, "elementwise", flops * count, byts * count, ab_dtype, count, calls_per * count
    )


def step_operators(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw_kind: str,
    shape: StepShape,
    stage: int = 0,
    backend: str | None = None,
) -> list[Operator]:
    """Every operator of one step on one rank of pipeline stage ``stage``.
    ``backend``: "torch" (kvasir's CPU path: one attention call per decode length
    group and per prompt chunk) or "triton" (one kernel per layer); default by device."""
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    backend = backend or ("torch" if hw_kind == "cpu" else "triton")
    ab = cfg.act_bytes(hw_kind)
    wb = cfg.weight_bytes(hw_kind)
    kvb = cfg.kv_bytes(hw_kind)
    gdt = cfg.gemm_dtype(hw_kind)
    adt = {4: "fp32", 2: "bf16"}.get(ab, "bf16")
    h = spec.hidden_size
    t = shape.num_tokens
    start, end = stage_layer_range(spec.num_layers, pp, stage)
    types = spec.layer_types[start:end]
    moes = spec.moe_layers[start:end]
    ops: list[Operator] = []
    if stage == 0:
        ops.append(_elementwise("embedding", 0.0, 2.0 * t * h * ab, adt, 1))

    n_attn = sum(1 for x in types if x == "attention")
    n_swa = sum(1 for x in types if x == "sliding_attention")
    n_mamba = sum(1 for x in types if x == "mamba")
    if n_attn + n_swa:
        heads = spec.num_heads // tp
        kvh = local_kv_heads(spec.num_kv_heads, tp)
        d = spec.head_dim
        qs, kvs = heads * d, kvh * d
        na = n_attn + n_swa
        ops.append(_gemm("qkv_proj", t, h, qs + 2 * kvs, wb, ab, gdt, na))
        if spec.qk_norm:
            ops.append(
                _elementwise("qk_norm", 4.0 * t * (qs + kvs), 2.0 * t * (qs + kvs) * ab, adt, na, 2)
            )
        ops.append(_elementwise("rope", 3.0 * t * (qs + kvs), 2.0 * t * (qs + kvs) * ab, adt, na))
        # The Triton backend fuses the cache write into the RoPE kernel (no launch).
        fused = 0 if backend == "triton" else 1
        ops.append(_elementwise("kv_cache_write", 0.0, t * 2 * kvs * (ab + kvb), adt, na, fused))
        for kind, n_layers, window in (
            ("attention", n_attn, None),
            ("sliding_attention", n_swa, spec.sliding_window),
        ):
            if n_layers:
                ops.extend(
                    _attention_ops(
                        kind,
                        shape,
                        heads,
                        kvh,
                        d,
                        ab,
                        kvb,
                        adt,
                        window,
                        n_layers,
                        backend,
                        cfg.block_size,
                    )  # fmt: skip
                )
        ops.append(_gemm("o_proj", t, qs, h, wb, ab, gdt, na))
    if n_mamba:
        assert spec.mamba is not None
        ops.extend(_mamba_ops(spec, shape, tp, wb, ab, gdt, adt, n_mamba))
    # Norms: two per layer with an MLP, one for a pure Mamba layer; the residual add is
    # fused into the norm (read x and residual, write both).
    num_norms = sum(
        2 if (x != "mamba" or spec.intermediate_size or m) else 1 for x, m in zip(types, moes)
    )
    ops.append(_elementwise("rmsnorm", 5.0 * t * h, 4.0 * t * h * ab, adt, num_norms))
    dense_mlp = sum(
        1 for x, m in zip(types, moes) if not m and (x != "mamba" or spec.intermediate_size)
    )
    if dense_mlp:
        i = spec.intermediate_size // tp
        ops.append(_gemm("gate_up_proj", t, h, 2 * i, wb, ab, gdt, dense_mlp))
        ops.append(_elementwise("silu_and_mul", 4.0 * t * i, 3.0 * t * i * ab, adt, dense_mlp))
        ops.append(_gemm("down_proj", t, i, h, wb, ab, gdt, dense_mlp))
    n_moe = sum(moes)
    if n_moe:
        ops.extend(_moe_ops(spec, t, tp, wb, ab, gdt, adt, n_moe))
    if tp > 1:
        # Row-parallel outputs are all-reduced: after o_proj (or the mixer's out_proj)
        # and after down_proj / the experts.
        num_ar = sum(
            1 + (1 if (x != "mamba" or spec.intermediate_size or m) else 0)
            for x, m in zip(types, moes)
        )
        msg = float(t * h * ab)
        ops.append(
            Operator(
                "all_reduce", "comm", 0.0, msg * num_ar, adt, num_ar, num_ar, message_bytes=msg
            )
        )
    if stage == pp - 1:
        rows = shape.num_sampled_rows
        v = spec.vocab_size // tp if spec.vocab_size % tp == 0 else math.ceil(spec.vocab_size / tp)
        ops.append(_elementwise("final_norm", 5.0 * rows * h, 4.0 * rows * h * ab, adt, 1))
        ops.append(_gemm("lm_head", rows, h, v, wb, ab, gdt, 1))
        # float32 logits: softmax / argmax passes read them about three times
        ops.append(
            Operator(
                "sampler",
                "sampler",
                5.0 * rows * spec.vocab_size,
                3.0 * rows * spec.vocab_size * 4,
                "fp32",
            )
        )
    elif pp > 1:
        msg = float(2 * t * h * ab)  # hidden states and residual to the next stage
        ops.append(
            Operator("pp_send", "comm", 0.0, msg, adt, 1, 1, message_bytes=msg, extra={"p2p": True})
        )
    return ops


def _attention_ops(
    kind: str,
    shape: StepShape,
    heads: int,
    kvh: int,
    d: int,
    ab: int,
    kvb: int,
    adt: str,
    window: int | None,
    n_layers: int,
    backend: str,
    block_size: int,
) -> list[Operator]:
    ops = []
    kv_token = 2 * kvh * d * kvb
    q_rows = 1 + shape.num_spec_tokens
    if shape.decode_context_lens:
        pairs = 0.0
        keys_per_row = []
        for c in shape.decode_context_lens:
            keys = min(c + shape.num_spec_tokens, window) if window else c + shape.num_spec_tokens
            pairs += keys * q_rows
            keys_per_row.append(keys)
        flops = 4.0 * d * heads * pairs
        qo = shape.num_decode * q_rows * 2 * heads * d * ab
        byts = 1.0 * sum(keys_per_row) * kv_token + qo
        calls, moved = 2, None  # Triton: split + reduce kernels, reading the pages once
        if backend == "torch":
            # Per length group: whole blocks up to the group's longest row gathered into
            # a copy (read + write) that SDPA then reads, three passes over it.
            groups = torch_decode_groups(keys_per_row)
            calls = len(groups)
            padded = sum(
                len(g) * -(-max(keys_per_row[i] for i in g) // block_size) * block_size
                for g in groups
            )
            moved = 3.0 * padded * kv_token + qo
        ops.append(
            Operator(
                f"{kind}_decode",
                "attention",
                flops * n_layers,
                byts * n_layers,
                adt,
                n_layers,
                calls * n_layers,
                moved_bytes=None if moved is None else moved * n_layers,
            )
        )
    if shape.prefill_chunks:
        pairs = 0.0
        byts = 0.0
        moved = 0.0
        for q, past in shape.prefill_chunks:
            pairs += attention_pairs(q, past, window)
            keys = min(past + q, (window or past + q) + q)
            tiles = math.ceil(q / _ATTN_QUERY_TILE)
            byts += keys * kv_token * tiles + 2 * q * heads * d * ab
            # torch: a fresh prompt attends to its own K/V; a later chunk gathers its
            # request's blocks first (read + write, then read)
            gathered = 3 * -(-keys // block_size) * block_size if past else keys
            moved += gathered * kv_token + 2 * q * heads * d * ab
        calls = len(shape.prefill_chunks) if backend == "torch" else 1
        ops.append(
            Operator(
                f"{kind}_prefill",
                "attention",
                4.0 * d * heads * pairs * n_layers,
                byts * n_layers,
                adt,
                n_layers,
                calls * n_layers,
                moved_bytes=moved * n_layers if backend == "torch" else None,
            )
        )
    return ops


def _mamba_ops(
    spec: ModelSpec, shape: StepShape, tp: int, wb: float, ab: int, gdt: str, adt: str, n: int
) -> list[Operator]:
    m = spec.mamba
    assert m is not None
    h, t = spec.hidden_size, shape.num_tokens
    di = m.d_inner // tp
    ops = [_gemm("mamba_in_proj", t, h, m.in_proj_out() // tp, wb, ab, gdt, n)]
    conv = m.conv_channels() // tp
    seqs = shape.num_reqs
    ops.append(
        Operator(
            "mamba_conv1d",
            "ssm",
            2.0 * t * conv * m.d_conv * n,
            (2.0 * t * conv * ab + 2 * seqs * conv * (m.d_conv - 1) * _SSM_STATE_BYTES) * n,
            "fp32",
            n,
            n,
        )
    )
    if m.version == 1:
        ops.append(_gemm("mamba_x_proj", t, di, m.dt_rank + 2 * m.d_state, wb, ab, gdt, n))
        ops.append(_gemm("mamba_dt_proj", t, m.dt_rank, di, wb, ab, gdt, n))
    state = di * m.d_state
    ops.append(
        Operator(
            "mamba_scan",
            "ssm",
            float(_SCAN_FLOPS[m.version] * t * state * n),
            (2.0 * seqs * state * _SSM_STATE_BYTES + 4.0 * t * di * ab) * n,
            "fp32",
            n,
            n,
        )
    )
    ops.append(_gemm("mamba_out_proj", t, di, h, wb, ab, gdt, n))
    return ops


def expected_experts_touched(num_tokens: int, num_experts: int, k: int) -> float:
    """Distinct experts that ``num_tokens`` tokens routing to ``k`` of ``num_experts``
    each touch, for uniform routing: E * (1 - (1 - k/E)^T)."""
    if num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - k / num_experts) ** num_tokens)


def _moe_ops(
    spec: ModelSpec, t: int, tp: int, wb: float, ab: int, gdt: str, adt: str, n: int
) -> list[Operator]:
    h, e, k = spec.hidden_size, spec.num_experts, spec.num_experts_per_tok
    i = spec.moe_intermediate_size // tp
    ops = [_gemm("moe_router", t, h, e, wb, ab, gdt, n)]
    touched = expected_experts_touched(t, e, k)
    flops = 2.0 * t * k * 3 * h * i
    byts = touched * 3 * h * i * wb + t * k * (2 * h + 3 * i) * ab
    ops.append(
        Operator(
            "moe_experts",
            "gemm",
            flops * n,
            byts * n,
            gdt,
            n,
            n,
            extra={"experts_touched": touched},
        )
    )
    if spec.shared_expert_intermediate_size:
        si = spec.shared_expert_intermediate_size // tp
        ops.append(_gemm("moe_shared_gate_up", t, h, 2 * si, wb, ab, gdt, n))
        ops.append(_gemm("moe_shared_down", t, si, h, wb, ab, gdt, n))
    return ops


def total(ops: Sequence[Operator], kind: str | None = None) -> tuple[float, float]:
    """(FLOPs, bytes) summed over ``ops`` (of one ``kind``, if given)."""
    sel = [o for o in ops if kind is None or o.kind == kind]
    return sum(o.flops for o in sel), sum(o.bytes for o in sel)
