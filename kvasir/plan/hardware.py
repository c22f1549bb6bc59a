"""The hardware catalogue: peak rates, memory, interconnect, power and price of each
device, every figure with its source, plus the calibrated current machine.

Rates are dense (no 2:4 sparsity), in TFLOP/s (TOP/s for int8), per device. Memory is
the capacity that holds the weights: HBM/GDDR for GPUs, DRAM for CPUs, on-chip SRAM for
the SRAM-resident devices (Groq LPU, Cerebras WSE-3: ``weights_in_sram``). Vendor "GB"
of HBM/GDDR is read as GiB (an 80 GB H100 holds 80 GiB of DRAM, of which the driver
reports about 79 GiB). Interconnect figures are per device and per direction.

Prices: NVIDIA and AMD publish no list prices for data-centre GPUs; the figures are the
street prices reported at the date given, named as such in ``price_source``. Cloud
prices live with the cost model (``kvasir.plan.tco``). None of this was re-checked
against the web when written (the tool was built offline): check a price before buying.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8", "fp4")
KINDS = ("gpu", "cpu", "tpu", "lpu", "wafer")


@dataclass(frozen=True)
class KernelOverheads:
    """Fixed seconds each call costs on top of its roofline time (launch, dispatch,
    framework), per kind of operator, and per engine step (scheduler, input
    preparation, sampling, output processing that the device does not hide)."""

    gemm_s: float = 0.0
    attention_s: float = 0.0
    elementwise_s: float = 0.0
    step_s: float = 0.0
    request_s: float = 0.0  # per request in the step (batch building, sampling, output)
    # Per decoder layer, whatever its operators' sizes (the calls of a layer and the
    # Python between them); when set, the per-call costs above count only the calls a
    # layer makes beyond one of each (more decode groups, one per prompt chunk).
    layer_s: float = 0.0
    layer_request_s: float = 0.0  # per decoder layer per request (decode groups, gathers)
    source: str = ""


@dataclass(frozen=True)
class Hardware:
    """One device of the catalogue (or this machine, calibrated). Invariant: every
    figure has a source (``source``, ``price_source``), and ``peak_tflops`` names
    only ``DTYPES``."""

    name: str
    kind: str
    description: str
    peak_tflops: Mapping[str, float]  # dense, per dtype (int8: TOP/s)
    memory_gib: float  # capacity that holds the weights
    memory_bandwidth_gbs: float  # GB/s (1e9) of that memory
    cache_mb: float  # L2 (GPU), last-level cache (CPU), SRAM beside HBM (Infinity Cache)
    link_name: str  # scale-up interconnect between devices of one host ("PCIe" if none)
    link_gbs: float  # GB/s per direction per device on that link
    pcie_gbs: float  # GB/s per direction to the host
    tdp_w: float | None
    price_usd: float | None
    price_source: str
    price_date: str
    source: str  # datasheet name and URL
    source_date: str
    weights_in_sram: bool = False
    # CPUs: the shape the peak is derived from (cores x vector lanes x FMA x clock).
    cpu_cores: int | None = None
    cpu_vector_bits: int | None = None
    cpu_fma_units: int | None = None
    cpu_clock_ghz: float | None = None
    # Measured machines (``--calibrate``): rates are what kvasir's own kernels reached,
    # so the efficiency factors are 1 and the fixed costs were measured too.
    calibrated: bool = False
    overheads: KernelOverheads | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        bad = sorted(set(self.peak_tflops) - set(DTYPES))
        if bad:
            raise ValueError(f"peak_tflops keys must be in {DTYPES}, got {bad}")
        for name in ("memory_gib", "memory_bandwidth_gbs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 ({self.name})")
        if not self.source:
            raise ValueError(f"source must name the datasheet ({self.name})")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * (1 << 30))

    def _shape_rate(self, rows: int, k: int, n: int | None) -> float | None:
        """From ``extra["gemm_tflops_by_shape"]`` ([N, K, rows, TFLOP/s] measured for a
        model's own projections, ``--calibrate --model``): log-interpolated in rows."""
        pts = sorted(
            (float(m), float(t)) for nn, kk, m, t in self.extra.get("gemm_tflops_by_shape", [])
            if kk == k and nn == n
        )  # fmt: skip
        if not pts:
            return None
        x = min(max(float(rows), pts[0][0]), pts[-1][0])
        for (m0, t0), (m1, t1) in zip(pts, pts[1:]):
            if m0 <= x <= m1:
                w = (math.log(x) - math.log(m0)) / (math.log(m1) - math.log(m0))
                return (t0 + w * (t1 - t0)) * 1e12
        return pts[0][1] * 1e12

    def gemm_rate(
        self, dtype: str, rows: int | None, k: int | None = None, n: int | None = None
    ) -> float | None:
        """FLOP/s of a GEMM of ``rows`` rows, inner size ``k`` and ``n`` outputs streaming
        its weights, from a calibrated machine's measured tables: the model's own shape
        if it was profiled, else ``extra["gemm_tflops_by_k_rows"]`` (bilinear in log K
        and log rows, clamped at its edges); None without one."""
        if rows is None or k is None:
            return None
        shaped = self._shape_rate(rows, k, n)
        if shaped is not None:
            return shaped
        table = self.extra.get("gemm_tflops_by_k_rows")
        if not table:
            return None
        grid: dict[float, dict[float, float]] = {}
        for kk, m, t in table:
            grid.setdefault(float(kk), {})[float(m)] = float(t)
        ks = sorted(grid)

        def interp(xs: list[float], x: float) -> tuple[float, float, float]:
            x = min(max(x, xs[0]), xs[-1])
            for a, b in zip(xs, xs[1:]):
                if a <= x <= b:
                    return a, b, (math.log(x) - math.log(a)) / (math.log(b) - math.log(a))
            return xs[0], xs[0], 0.0

        def at_k(kk: float) -> float:
            ms = sorted(grid[kk])
            a, b, w = interp(ms, float(rows))
            return grid[kk][a] + w * (grid[kk][b] - grid[kk][a]) if b != a else grid[kk][a]

        if len(ks) == 1:
            return at_k(ks[0]) * 1e12
        k0, k1, wk = interp(ks, float(k))
        r0, r1 = at_k(k0), at_k(k1)
        return (r0 + wk * (r1 - r0)) * 1e12

    def peak(self, dtype: str) -> float:
        """FLOP/s of ``dtype`` GEMMs; a dtype without its own units runs at the next
        wider one it has (fp8 on an A100 runs as bf16, as a dequantising kernel would);
        fp32 on a device with no fp32 figure (TPU, LPU, WSE-3) at its 16-bit rate."""
        order = {"fp4": "fp8", "fp8": "bf16", "int8": "bf16", "fp16": "bf16", "bf16": "fp32"}
        d = dtype
        while d not in self.peak_tflops:
            if d not in order:
                for narrower in ("bf16", "fp16"):
                    if narrower in self.peak_tflops:
                        return self.peak_tflops[narrower] * 1e12
                raise ValueError(f"{self.name} has no {dtype} rate (nor a wider one)")
            d = order[d]
        return self.peak_tflops[d] * 1e12

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_tflops"] = dict(self.peak_tflops)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Hardware:
        d = dict(d)
        ov = d.get("overheads")
        if isinstance(ov, Mapping):
            d["overheads"] = KernelOverheads(**ov)
        return cls(**d)


def cpu_peak_fp32_tflops(cores: int, vector_bits: int, fma_units: int, clock_ghz: float) -> float:
    """Cores x fp32 lanes per vector x FMA units x 2 FLOPs per FMA x clock."""
    return cores * (vector_bits // 32) * fma_units * 2 * clock_ghz / 1e3


def ddr_bandwidth_gbs(channels: int, mt_s: int) -> float:
    """Channels x transfers/s x 8 bytes per 64-bit channel."""
    return channels * mt_s * 8 / 1e3


_NV_PRICE_NOTE = "reported street price; NVIDIA publishes no list price"

_CATALOGUE: tuple[Hardware, ...] = (
    Hardware(
        name="h100-sxm",
        kind="gpu",
        description="NVIDIA H100 SXM5 80 GB",
        peak_tflops={"fp32": 66.9, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "int8": 1978.9},
        memory_gib=80,
        memory_bandwidth_gbs=3350,
        cache_mb=50,
        link_name="NVLink 4",
        link_gbs=450,  # 900 GB/s total bidirectional
        pcie_gbs=64,  # PCIe Gen5 x16, 128 GB/s bidirectional
        tdp_w=700,
        price_usd=30000,
        price_source=f"{_NV_PRICE_NOTE} (US$25-30k per H100, press reports 2023-24)",
        price_date="2024",
        source="NVIDIA H100 Tensor Core GPU datasheet, "
        "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
        source_date="2023",
    ),
    Hardware(
        name="h100-pcie",
        kind="gpu",
        description="NVIDIA H100 PCIe 80 GB",
        peak_tflops={"fp32": 51.2, "bf16": 756.5, "fp16": 756.5, "fp8": 1513, "int8": 1513},
        memory_gib=80,
        memory_bandwidth_gbs=2000,
        cache_mb=50,
        link_name="PCIe",  # NVLink bridges join pairs only; a TP group of 4+ uses PCIe
        link_gbs=64,
        pcie_gbs=64,
        tdp_w=350,
        price_usd=25000,
        price_source=f"{_NV_PRICE_NOTE} (press reports 2023-24)",
        price_date="2024",
        source="NVIDIA H100 Tensor Core GPU datasheet (PCIe column), "
        "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
        source_date="2023",
    ),
    Hardware(
        name="h200",
        kind="gpu",
        description="NVIDIA H200 SXM 141 GB",
        peak_tflops={"fp32": 66.9, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "int8": 1978.9},
        memory_gib=141,
        memory_bandwidth_gbs=4800,
        cache_mb=50,
        link_name="NVLink 4",
        link_gbs=450,
        pcie_gbs=64,
        tdp_w=700,
        price_usd=32000,
        price_source=f"{_NV_PRICE_NOTE} (US$30-40k, press reports 2024)",
        price_date="2024",
        source="NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/",
        source_date="2023-11",
    ),
    Hardware(
        name="b200",
        kind="gpu",
        description="NVIDIA B200 (HGX B200, per GPU)",
        # HGX B200 (8 GPUs) with sparsity: FP4 144 PF, FP8 72 PF, INT8 72 PO, BF16 36 PF,
        # TF32 18 PF; dense per GPU is an eighth, halved.
        peak_tflops={
            "fp32": 75,
            "bf16": 2250,
            "fp16": 2250,
            "fp8": 4500,
            "int8": 4500,
            "fp4": 9000,
        },
        memory_gib=180,  # HGX B200: 1.4 TB over 8 GPUs
        memory_bandwidth_gbs=7700,  # HGX B200: 62 TB/s over 8 GPUs
        cache_mb=126,
        link_name="NVLink 5",
        link_gbs=900,  # 1.8 TB/s total bidirectional
        pcie_gbs=64,
        tdp_w=1000,
        price_usd=35000,
        price_source=f"{_NV_PRICE_NOTE} (US$30-40k, J. Huang to CNBC, 2024-03)",
        price_date="2024-03",
        source="NVIDIA HGX B200 specifications, https://www.nvidia.com/en-us/data-center/hgx/",
        source_date="2024",
    ),
    Hardware(
        name="a100-80gb",
        kind="gpu",
        description="NVIDIA A100 SXM4 80 GB",
        peak_tflops={"fp32": 19.5, "bf16": 312, "fp16": 312, "int8": 624},
        memory_gib=80,
        memory_bandwidth_gbs=2039,
        cache_mb=40,
        link_name="NVLink 3",
        link_gbs=300,  # 600 GB/s total bidirectional
        pcie_gbs=32,  # PCIe Gen4 x16
        tdp_w=400,
        price_usd=15000,
        price_source=f"{_NV_PRICE_NOTE} (US$10-15k, press reports 2023)",
        price_date="2023",
        source="NVIDIA A100 Tensor Core GPU datasheet, "
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
        "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
        source_date="2021-06",
    ),
    Hardware(
        name="l40s",
        kind="gpu",
        description="NVIDIA L40S 48 GB",
        peak_tflops={"fp32": 91.6, "bf16": 362.05, "fp16": 362.05, "fp8": 733, "int8": 733},
        memory_gib=48,
        memory_bandwidth_gbs=864,
        cache_mb=96,
        link_name="PCIe",  # no NVLink
        link_gbs=32,  # PCIe Gen4 x16, 64 GB/s bidirectional
        pcie_gbs=32,
        tdp_w=350,
        price_usd=8000,
        price_source=f"{_NV_PRICE_NOTE} (US$7.5-10k, reseller listings 2024)",
        price_date="2024",
        source="NVIDIA L40S datasheet, https://www.nvidia.com/en-us/data-center/l40s/",
        source_date="2023-08",
    ),
    Hardware(
        name="l4",
        kind="gpu",
        description="NVIDIA L4 24 GB",
        peak_tflops={"fp32": 30.3, "bf16": 121, "fp16": 121, "fp8": 242.5, "int8": 242.5},
        memory_gib=24,
        memory_bandwidth_gbs=300,
        cache_mb=48,
        link_name="PCIe",
        link_gbs=32,
        pcie_gbs=32,
        tdp_w=72,
        price_usd=2500,
        price_source=f"{_NV_PRICE_NOTE} (reseller listings 2024)",
        price_date="2024",
        source="NVIDIA L4 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/l4/",
        source_date="2023-03",
    ),
    Hardware(
        name="mi300x",
        kind="gpu",
        description="AMD Instinct MI300X 192 GB",
        peak_tflops={"fp32": 163.4, "bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9, "int8": 2614.9},
        memory_gib=192,
        memory_bandwidth_gbs=5300,
        cache_mb=256,  # Infinity Cache
        link_name="Infinity Fabric (xGMI)",
        link_gbs=448,  # 7 links x 128 GB/s bidirectional, halved
        pcie_gbs=64,
        tdp_w=750,
        price_usd=15000,
        price_source="reported street price; AMD publishes no list price (US$10-15k, "
        "analyst estimates 2024)",
        price_date="2024",
        source="AMD Instinct MI300X accelerator datasheet, "
        "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html",
        source_date="2023-12",
    ),
    Hardware(
        name="tpu-v5e",
        kind="tpu",
        description="Google Cloud TPU v5e (per chip)",
        peak_tflops={"bf16": 197, "int8": 394},
        memory_gib=16,
        memory_bandwidth_gbs=819,
        cache_mb=0,
        link_name="ICI",
        link_gbs=100,  # 1,600 Gbps ICI per chip, halved per direction
        pcie_gbs=16,
        tdp_w=None,  # not published
        price_usd=None,  # cloud only: US$1.20 per chip-hour on demand (tco.py)
        price_source="not sold; Google Cloud TPU pricing page, on demand US$1.20/chip-hour",
        price_date="2024",
        source="Google Cloud TPU v5e documentation, https://cloud.google.com/tpu/docs/v5e",
        source_date="2023-11",
    ),
    Hardware(
        name="tpu-v5p",
        kind="tpu",
        description="Google Cloud TPU v5p (per chip)",
        peak_tflops={"bf16": 459, "int8": 918},
        memory_gib=95,
        memory_bandwidth_gbs=2765,
        cache_mb=0,
        link_name="ICI",
        link_gbs=300,  # 4,800 Gbps ICI per chip, halved per direction
        pcie_gbs=16,
        tdp_w=None,
        price_usd=None,
        price_source="not sold; Google Cloud TPU pricing page, on demand US$4.20/chip-hour",
        price_date="2024",
        source="Google Cloud TPU v5p documentation, https://cloud.google.com/tpu/docs/v5p",
        source_date="2023-12",
    ),
    Hardware(
        name="groq-lpu",
        kind="lpu",
        description="Groq LPU (GroqChip 1, per chip; weights in on-chip SRAM)",
        peak_tflops={"fp16": 188, "bf16": 188, "int8": 750},
        memory_gib=230 / 1024,  # 230 MB of SRAM per chip: a 70B model needs hundreds
        memory_bandwidth_gbs=80000,  # on-die SRAM bandwidth
        cache_mb=230,
        link_name="C2C",
        link_gbs=200,  # 16 chip-to-chip links per chip (approximate aggregate)
        pcie_gbs=32,
        tdp_w=375,  # GroqCard maximum
        price_usd=20000,
        price_source="GroqCard retail listing (about US$20k per card, 2023-24)",
        price_date="2024",
        source="Groq GroqChip / GroqCard product briefs, https://groq.com/",
        source_date="2022",
        weights_in_sram=True,
    ),
    Hardware(
        name="cerebras-wse3",
        kind="wafer",
        description="Cerebras WSE-3 (CS-3 system; weights in on-wafer SRAM)",
        peak_tflops={"fp16": 125000, "bf16": 125000},  # "125 PFLOPS peak AI" (vendor figure)
        memory_gib=44 * 1e9 / (1 << 30),  # 44 GB on-wafer SRAM
        memory_bandwidth_gbs=21e6,  # 21 PB/s
        cache_mb=44000,
        link_name="100 GbE (off-wafer)",
        link_gbs=150,  # 12 x 100 GbE per CS-3
        pcie_gbs=150,
        tdp_w=23000,  # CS-3 system
        price_usd=2500000,
        price_source="reported system price (CS-2 about US$2-3M, press reports; CS-3 not public)",
        price_date="2024",
        source="Cerebras WSE-3 announcement, https://www.cerebras.net/product-chip/ (2024-03-13)",
        source_date="2024-03",
        weights_in_sram=True,
    ),
    Hardware(
        name="xeon-8480",
        kind="cpu",
        description="Intel Xeon Platinum 8480+ (56 cores, AVX-512 + AMX, 8 x DDR5-4800)",
        peak_tflops={
            "fp32": cpu_peak_fp32_tflops(56, 512, 2, 2.0),
            # AMX-BF16: 1,024 FLOPs per cycle per core
            "bf16": 56 * 1024 * 2.0 / 1e3,
            "int8": 56 * 2048 * 2.0 / 1e3,
        },
        memory_gib=512,  # a typical 1-socket configuration (16 x 32 GiB DIMMs)
        memory_bandwidth_gbs=ddr_bandwidth_gbs(8, 4800),
        cache_mb=105,
        link_name="UPI",
        link_gbs=64,
        pcie_gbs=64,
        tdp_w=350,
        price_usd=10710,
        price_source="Intel recommended customer price, ark.intel.com",
        price_date="2023-01",
        source="Intel ARK, Xeon Platinum 8480+ (https://ark.intel.com), base clock 2.0 GHz",
        source_date="2023-01",
        cpu_cores=56,
        cpu_vector_bits=512,
        cpu_fma_units=2,
        cpu_clock_ghz=2.0,
    ),
    Hardware(
        name="epyc-9654",
        kind="cpu",
        description="AMD EPYC 9654 (96 cores, AVX-512 on 256-bit datapaths, 12 x DDR5-4800)",
        peak_tflops={
            "fp32": cpu_peak_fp32_tflops(96, 256, 2, 2.4),
            "bf16": 2 * cpu_peak_fp32_tflops(96, 256, 2, 2.4),  # AVX512-BF16 dot products
        },
        memory_gib=768,
        memory_bandwidth_gbs=ddr_bandwidth_gbs(12, 4800),
        cache_mb=384,
        link_name="Infinity Fabric",
        link_gbs=64,
        pcie_gbs=64,
        tdp_w=360,
        price_usd=11805,
        price_source="AMD list price at launch (1k-unit)",
        price_date="2022-11",
        source="AMD EPYC 9654 product page, https://www.amd.com/en/products/cpu/amd-epyc-9654, "
        "base clock 2.4 GHz",
        source_date="2022-11",
        cpu_cores=96,
        cpu_vector_bits=256,
        cpu_fma_units=2,
        cpu_clock_ghz=2.4,
    ),
)

CATALOGUE: dict[str, Hardware] = {h.name: h for h in _CATALOGUE}
# Names the CLI also accepts.
ALIASES = {"h100": "h100-sxm", "a100": "a100-80gb", "h200-sxm": "h200", "wse-3": "cerebras-wse3"}
CALIBRATED_NAMES = ("this-machine", "calibrated", "local")


def default_calibration_file() -> str:
    """Where ``--calibrate`` keeps this machine's entry: ``$KVASIR_PLAN_CALIBRATION``, or
    ``$XDG_CACHE_HOME/kvasir/plan-hardware.json`` (``~/.cache`` by default)."""
    env = os.environ.get("KVASIR_PLAN_CALIBRATION")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvasir", "plan-hardware.json")


def save_calibrated(hw: Hardware, path: str | None = None) -> str:
    path = path or default_calibration_file()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hw.as_dict(), f, indent=1)
        f.write("\n")
    return path


def load_calibrated(path: str | None = None) -> Hardware | None:
    path = path or default_calibration_file()
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return Hardware.from_dict(json.load(f))


def hardware_names() -> list[str]:
    return sorted(CATALOGUE) + [CALIBRATED_NAMES[0]]


def get_hardware(name: str, calibration_file: str | None = None) -> Hardware:
    """The catalogue entry ``name`` (or an alias), or this machine's calibrated entry
    for ``this-machine``. Raises ValueError naming ``--hardware`` and the choices."""
    key = name.strip().lower()
    if key in CALIBRATED_NAMES:
        hw = load_calibrated(calibration_file)
        if hw is None:
            raise ValueError(
                f"--hardware {name}: this machine is not calibrated yet "
                f"(no {calibration_file or default_calibration_file()}); "
                "run `kvasir plan --calibrate` first"
            )
        return hw
    key = ALIASES.get(key, key)
    if key not in CATALOGUE:
        raise ValueError(f"--hardware {name!r} is unknown; known: {', '.join(hardware_names())}")
    return CATALOGUE[key]
