"""Kernel launch configs tuned per device: the table the kernels read, and the search
``kvasir tune`` runs to fill it.

**The table.** One JSON file per device name::

    {"device": "NVIDIA H200",
     "kernels": {"gemv": {"rows=12288,k=4096,fusion=0,wbytes=2":
                          {"config": [8, 1024, 4, 3], "us": 21.4, "default_us": 22.9}}}}

A kernel asks ``tuned_config(kernel, key, device)`` for the config of its exact shape key
and falls back to its hand-picked default when there is none (or on the CPU, where the
kernels run under Triton's interpreter and launch configs do not matter). The table is
read once per device, from the first of: the file ``$KVASIR_KERNEL_CONFIGS``, the user's
``~/.cache/kvasir/kernel_configs/<device>.json`` (where ``kvasir tune`` writes by
default), and the file shipped in ``kvasir/kernels/configs/<device>.json``;
``KVASIR_KERNEL_CONFIGS=none`` reads none (every kernel on its default).

**The search.** A ``TunableKernel`` knows its config space for a shape, how to build
inputs, run the kernel with a config and compute a plain-torch reference. ``tune`` runs
every config once against the reference on fresh random inputs (a config that raises or
disagrees is dropped, never kept), times the survivors and the default with the given
timer, and keeps the fastest. The timer is injected: on a GPU it times CUDA-event
medians over rotating input copies (so weights larger than nothing come from memory, not
L2); the unit tests pass a fake one.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

Config = tuple[int, ...]
SHIPPED_DIR = Path(__file__).parent / "configs"
USER_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvasir/kernel_configs"


def device_file_name(device_name: str) -> str:
    """``NVIDIA H200`` -> ``NVIDIA_H200.json``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device_name.strip()) + ".json"


# ----------------------------------------------------------------------------- the table
@dataclass
class ConfigTable:
    device: str
    kernels: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    source: str = ""

    def lookup(self, kernel: str, key: str) -> Config | None:
        entry = self.kernels.get(kernel, {}).get(key)
        return None if entry is None else tuple(entry["config"])

    def put(self, kernel: str, key: str, config: Config, us: float, default_us: float) -> None:
        self.kernels.setdefault(kernel, {})[key] = {
            "config": list(config),
            "us": round(us, 3),
            "default_us": round(default_us, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "kernels": self.kernels}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ConfigTable:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("kernels"), dict):
            raise ValueError(f"{path}: not a kernel-config table (no 'kernels' object)")
        kernels: dict[str, dict[str, dict[str, Any]]] = {}
        for kernel, entries in data["kernels"].items():
            for key, entry in entries.items():
                cfg = entry.get("config") if isinstance(entry, dict) else None
                if not (
                    isinstance(cfg, list) and cfg and all(isinstance(v, int) and v > 0 for v in cfg)
                ):
                    raise ValueError(
                        f"{path}: {kernel}[{key}].config must be a list of positive ints, "
                        f"got {cfg!r}"
                    )
                kernels.setdefault(kernel, {})[key] = dict(entry)
        return cls(str(data.get("device", "")), kernels, str(path))


_override: ConfigTable | None = None


def set_table(table: ConfigTable | None) -> None:
    """Use ``table`` for every device (tests, ``kvasir tune`` checking its result);
    None goes back to the files."""
    global _override
    _override = table
    _table_for.cache_clear()


@functools.cache
def _table_for(device_name: str) -> ConfigTable | None:
    env = os.environ.get("KVASIR_KERNEL_CONFIGS", "")
    if env == "none":  # the hand-picked defaults everywhere (A/B runs)
        return None
    candidates = []
    if env:
        if not Path(env).is_file():
            raise ValueError(f"KVASIR_KERNEL_CONFIGS={env!r}: no such file")
        candidates.append(Path(env))
    name = device_file_name(device_name)
    candidates += [USER_DIR / name, SHIPPED_DIR / name]
    for path in candidates:
        if path.is_file():
            table = ConfigTable.load(path)
            n = sum(len(v) for v in table.kernels.values())
            logger.info("kernel configs: %d tuned shapes for %s from %s", n, device_name, path)
            return table
    return None


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def tuned_config(kernel: str, key: str, device: torch.device | None) -> Config | None:
    """The tuned launch config of ``kernel`` at shape ``key`` on ``device``, or None."""
    if _override is not None:
        return _override.lookup(kernel, key)
    if device is None or device.type != "cuda":
        return None
    table = _table_for(_device_name(device.index or 0))
    return None if table is None else table.lookup(kernel, key)


# ----------------------------------------------------------------------------- the search
@dataclass
class TunableKernel:
    """One kernel's search: ``space(shape)`` lists candidate configs, ``default(shape)``
    the hand-picked one, ``make_inputs(shape, device, seed)`` fresh random inputs,
    ``run(inputs, config)`` the kernel's output, ``reference(inputs)`` the plain-torch
    one, ``key(shape)`` the table key, ``bytes_moved(shape)`` the fewest bytes a call
    must move (for the bandwidth column), and ``tol`` the relative error a correct
    config stays under (‖out - ref‖ / ‖ref‖)."""

    name: str
    space: Callable[[tuple], list[Config]]
    default: Callable[[tuple], Config]
    make_inputs: Callable[[tuple, torch.device, int], dict[str, Any]]
    run: Callable[[dict[str, Any], Config], torch.Tensor]
    reference: Callable[[dict[str, Any]], torch.Tensor]
    key: Callable[[tuple], str]
    bytes_moved: Callable[[tuple], int]
    tol: float = 1e-2


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


CheckCase = tuple[dict[str, Any], torch.Tensor]  # inputs, reference output


def check_cases(kernel: TunableKernel, shape: tuple, device: torch.device) -> list[CheckCase]:
    """Two random draws (seeds other than the timing inputs') and their references, made
    once per shape: drawing a 1 GB weight per config would cost more than the search."""
    cases = []
    for seed in (1, 2):
        inputs = kernel.make_inputs(shape, device, seed)
        cases.append((inputs, kernel.reference(inputs)))
    return cases


def check_config(
    kernel: TunableKernel,
    shape: tuple,
    config: Config,
    device: torch.device,
    cases: list[CheckCase] | None = None,
) -> str:
    """'' if ``config`` computes ``kernel`` correctly on the random ``cases`` (made here
    when not given), else why not: it raised, left a non-finite value (the kernels
    allocate their outputs with ``torch.empty``, so an unwritten element is garbage) or
    missed the reference by more than ``kernel.tol``."""
    for inputs, ref in cases if cases is not None else check_cases(kernel, shape, device):
        try:
            out = kernel.run(inputs, config)
        except Exception as e:  # a config the compiler or the kernel's asserts refuse
            return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        err = rel_error(out, ref)
        if not err <= kernel.tol:
            return f"relative error {err:.3g} > {kernel.tol:g}"
    return ""


Timer = Callable[[Callable[[], Any], "TimingContext"], float]


@dataclass
class TimingContext:
    """What a timer is told besides the callable (the fake timers of the tests use it)."""

    kernel: str
    key: str
    config: Config
    is_default: bool


def cuda_timer(warmup_ms: float = 25, rep_ms: float = 100) -> Timer:
    """Median seconds per call by CUDA events (``triton.testing.do_bench``)."""
    import triton

    def timer(fn: Callable[[], Any], ctx: TimingContext) -> float:
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3

    return timer


@dataclass
class TuneResult:
    kernel: str
    key: str
    best: Config
    best_s: float
    default: Config
    default_s: float
    tried: int
    rejected: list[tuple[Config, str]]
    bytes_moved: int

    @property
    def speedup(self) -> float:
        return self.default_s / self.best_s


def tune_shape(
    kernel: TunableKernel,
    shape: tuple,
    device: torch.device,
    timer: Timer,
    max_configs: int | None = None,
    rotate_bytes: int = 0,
) -> TuneResult:
    """Check and time every config of ``kernel.space(shape)`` (the default included);
    the fastest correct one wins. ``rotate_bytes``: timing inputs are that many bytes of
    copies cycled call by call, so a shape whose operands fit in the cache is still timed
    from memory."""
    default = kernel.default(shape)
    space = list(dict.fromkeys([default, *kernel.space(shape)]))
    if max_configs is not None:
        space = space[: max(1, max_configs)]
    rejected: list[tuple[Config, str]] = []
    copies = max(1, -(-rotate_bytes // max(1, kernel.bytes_moved(shape))))
    pool = [kernel.make_inputs(shape, device, 100 + i) for i in range(copies)]
    times: dict[Config, float] = {}
    key = kernel.key(shape)
    cases = check_cases(kernel, shape, device)
    for cfg in space:
        why = check_config(kernel, shape, cfg, device, cases)
        if why:
            rejected.append((cfg, why))
            continue
        it = itertools.cycle(pool)
        times[cfg] = timer(
            lambda cfg=cfg, it=it: kernel.run(next(it), cfg),
            TimingContext(kernel.name, key, cfg, cfg == default),
        )
    if default not in times:
        raise RuntimeError(
            f"{kernel.name}[{key}]: the default config {default} fails its own check: "
            f"{dict(rejected).get(default)}"
        )
    best = min(times, key=lambda c: (times[c], c != default))
    return TuneResult(
        kernel.name, key, best, times[best], default, times[default], len(space), rejected,
        kernel.bytes_moved(shape),
    )  # fmt: skip


def tune(
    jobs: Iterable[tuple[TunableKernel, tuple]],
    device: torch.device,
    timer: Timer,
    table: ConfigTable,
    max_configs: int | None = None,
    rotate_bytes: int = 0,
    progress: Callable[[TuneResult], None] | None = None,
) -> list[TuneResult]:
    """Tune each (kernel, shape) and record the winner in ``table`` (also when it is
    the default: the table then says so, with the time)."""
    results = []
    for kernel, shape in jobs:
        r = tune_shape(kernel, shape, device, timer, max_configs, rotate_bytes)
        table.put(r.kernel, r.key, r.best, r.best_s * 1e6, r.default_s * 1e6)
        results.append(r)
        if progress is not None:
            progress(r)
    return results


def summarize(results: Sequence[TuneResult]) -> dict[str, Any]:
    speedups = [r.speedup for r in results]
    return {
        "shapes": len(results),
        "improved": sum(r.best != r.default for r in results),
        "geomean_speedup": statistics.geometric_mean(speedups) if speedups else 1.0,
        "min_speedup": min(speedups, default=1.0),
    }


# ----------------------------------------------------------------------------- kernels
def _gemv_kernel() -> TunableKernel:
    from kvasir.kernels import gemv as g

    def space(shape: tuple) -> list[Config]:
        rows, k, fusion, wbytes = shape
        kmax = 1 << (k - 1).bit_length()  # a tile wider than K only masks
        out = []
        for bn, bk_bytes, warps, stages in itertools.product(
            (4, 8, 16), (1024, 2048, 4096), (4, 8), (2, 3)
        ):
            out.append((bn, min(bk_bytes // wbytes, kmax), warps, stages))
        return list(dict.fromkeys(out))

    def make_inputs(shape: tuple, device: torch.device, seed: int) -> dict[str, Any]:
        rows, k, fusion, wbytes = shape
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(1, k, generator=gen).to(device, torch.bfloat16)
        w = torch.randn(rows, k, generator=gen) * k**-0.5
        if wbytes == 1:
            scale = (w.abs().amax(1) / 448.0).clamp_min(1e-12)
            q = (w / scale[:, None]).to(torch.float8_e4m3fn)
            return {"x": x, "w": q.to(device), "scale": scale.to(device), "fusion": fusion}
        return {"x": x, "w": w.to(device, torch.bfloat16), "scale": None, "fusion": fusion}

    def run(inp: dict[str, Any], cfg: Config) -> torch.Tensor:
        return g.gemv(inp["x"], inp["w"], None, inp["fusion"], cfg, scale=inp["scale"])

    def reference(inp: dict[str, Any]) -> torch.Tensor:
        return g.gemv_ref(inp["x"], inp["w"], None, inp["fusion"], inp["scale"])

    def default(shape: tuple) -> Config:
        rows, k, fusion, wbytes = shape
        cfg = g.default_gemv_config(rows, k, 132, True, wbytes)
        if fusion:
            cfg = (max(1, cfg[0] // 2), *cfg[1:])
        return cfg

    def bytes_moved(shape: tuple) -> int:
        rows, k, fusion, wbytes = shape
        return rows * k * wbytes + k * 2 + (rows // (2 if fusion else 1)) * 2

    return TunableKernel(
        "gemv", space, default, make_inputs, run, reference,
        key=lambda s: g.gemv_shape_key(*s), bytes_moved=bytes_moved, tol=2e-2,
    )  # fmt: skip


def _quant_matmul_kernel() -> TunableKernel:
    from kvasir.kernels import quant_gemm as q

    # shape: (m, n, k, a_quant, weight dtype name): a_quant 0 is weight-only (bf16
    # activations), 1 is W8A8 with per-token activation scales.
    def space(shape: tuple) -> list[Config]:
        m = shape[0]
        out = []
        for bm, bn, bk, warps in itertools.product(
            (16, 32, 64, 128), (32, 64, 128), (64, 128), (4, 8)
        ):
            if bm <= max(16, 1 << (m - 1).bit_length()):
                out.append((bm, bn, bk, warps))
        return out

    def make_inputs(shape: tuple, device: torch.device, seed: int) -> dict[str, Any]:
        m, n, k, a_quant, wname = shape
        dtype = torch.int8 if wname == "int8" else torch.float8_e4m3fn
        qmax = 127.0 if wname == "int8" else 448.0
        gen = torch.Generator(device="cpu").manual_seed(seed)
        a = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen) * k**-0.5

        def quant(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = (t.abs().amax(1) / qmax).clamp_min(1e-12)
            v = t / s[:, None]
            v = v.round().clamp(-qmax, qmax).to(dtype) if wname == "int8" else v.to(dtype)
            return v.to(device), s.to(device)

        wq, ws = quant(w)
        if a_quant:
            aq, sa = quant(a)
            return {"a": aq, "w": wq, "ws": ws, "as": sa}
        return {"a": a.to(device, torch.bfloat16), "w": wq, "ws": ws, "as": None}

    def run(inp: dict[str, Any], cfg: Config) -> torch.Tensor:
        out_dtype = None if inp["as"] is None else torch.bfloat16
        return q.quant_matmul(inp["a"], inp["w"], inp["ws"], inp["as"], None, out_dtype, cfg)  # type: ignore[arg-type]

    def reference(inp: dict[str, Any]) -> torch.Tensor:
        return q.quant_matmul_ref(inp["a"], inp["w"], inp["ws"], inp["as"])

    def key(shape: tuple) -> str:
        m, n, k, a_quant, wname = shape
        dtype = torch.int8 if wname == "int8" else torch.float8_e4m3fn
        return q.quant_matmul_shape_key(m, n, k, a_quant, dtype)

    def bytes_moved(shape: tuple) -> int:
        m, n, k, a_quant, _ = shape
        return n * k + m * k * (1 if a_quant else 2) + m * n * 2

    return TunableKernel(
        "quant_matmul", space, lambda s: q.default_quant_matmul_config(s[0], False),
        make_inputs, run, reference, key, bytes_moved, tol=2e-2,
    )  # fmt: skip


@functools.cache
def registry() -> dict[str, TunableKernel]:
    return {k.name: k for k in (_gemv_kernel(), _quant_matmul_kernel())}


def model_jobs(
    hidden: int,
    intermediate: int,
    q_size: int,
    kv_size: int,
    kernels: Sequence[str],
    weight_bytes: Sequence[int] = (2, 1),
    m_buckets: Sequence[int] = (16, 64, 256, 1024),
    tp: int = 1,
    quant_weights: Sequence[str] = ("fp8", "int8"),
    vocab: int = 0,
) -> list[tuple[TunableKernel, tuple]]:
    """The (kernel, shape) pairs of one decoder layer's projections at tensor-parallel
    size ``tp``: qkv, o, gate_up (GEMV with SiLU fused) and down; and with ``vocab`` the
    LM head's GEMV (bf16 only: the schemes leave the LM head unquantised)."""
    reg = registry()
    unknown = [k for k in kernels if k not in reg]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; tunable: {sorted(reg)}")
    qkv = (q_size + 2 * kv_size) // tp
    projections = [  # (rows, k, fusion)
        (qkv, hidden, 0),
        (hidden, q_size // tp, 0),
        (2 * intermediate // tp, hidden, 1),
        (hidden, intermediate // tp, 0),
    ]
    jobs: list[tuple[TunableKernel, tuple]] = []
    if "gemv" in kernels:
        for wb in weight_bytes:
            jobs += [(reg["gemv"], (r, k, f, wb)) for r, k, f in projections]
        if vocab and 2 in weight_bytes:
            jobs.append((reg["gemv"], (-(-vocab // tp), hidden, 0, 2)))
    if "quant_matmul" in kernels:
        for wname in quant_weights:
            for m in m_buckets:
                for aq in (0, 1):
                    jobs += [(reg["quant_matmul"], (m, r, k, aq, wname)) for r, k, _ in projections]
    return jobs


__all__ = [
    "ConfigTable",
    "TimingContext",
    "TunableKernel",
    "TuneResult",
    "check_config",
    "cuda_timer",
    "device_file_name",
    "model_jobs",
    "registry",
    "set_table",
    "summarize",
    "tune",
    "tune_shape",
    "tuned_config",
]
