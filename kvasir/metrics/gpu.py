"""GPU hardware metrics through NVML (``nvidia-ml-py``), exported as ``kvasir:gpu_*``.

A daemon thread samples every GPU each ``--gpu-metrics-interval`` seconds into a
snapshot; the Prometheus collector renders the latest snapshot on scrape, so a scrape
never waits on the driver. XID events are waited for between samples (the event wait
is the thread's sleep). Every series carries ``gpu`` (index), ``uuid`` (to join with
NVIDIA's DCGM exporter, whose label is ``UUID``) and ``model_name``.

A query the GPU does not support (``NVMLError_NotSupported``: no NVLink, no ECC on a
consumer card, ...) is dropped for that GPU after its first failure. Without an NVIDIA
driver or GPU the collector logs that once and exports nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

logger = logging.getLogger(__name__)

# NVML's clock-event (throttle) reason bits (nvml.h: nvmlClocksEventReason*).
THROTTLE_REASONS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}
_NVML_FI_DEV_MEMORY_TEMP = 82
_NVML_FI_NVLINK_TX_KIB = 138  # NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, KiB, all links
_NVML_FI_NVLINK_RX_KIB = 139
_ALL_LINKS = 0xFFFFFFFF  # scopeId: the sum over every link
_XID_EVENT = 0x8  # nvmlEventTypeXidCriticalError
# c_nvmlFieldValue_t.valueType -> member of its value union.
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}


@dataclass
class GpuSample:
    """One GPU at one time; None where the GPU does not support the query."""

    index: int
    uuid: str
    name: str
    sm_util: float | None = None  # 0..1
    mem_util: float | None = None  # memory controller busy, 0..1
    mem_used: float | None = None  # bytes
    mem_total: float | None = None
    temp_gpu: float | None = None  # Celsius
    temp_mem: float | None = None
    power: float | None = None  # W
    power_limit: float | None = None
    clocks: dict[str, float] = field(default_factory=dict)  # Hz by clock
    throttle: dict[str, int] = field(default_factory=dict)  # reason -> 0/1
    nvlink_tx: float | None = None  # bytes, cumulative
    nvlink_rx: float | None = None
    ecc_corrected: float | None = None  # volatile (since the driver loaded)
    ecc_uncorrected: float | None = None
    retired_pages_sbe: float | None = None
    retired_pages_dbe: float | None = None
    retired_pages_pending: float | None = None
    xid_errors: dict[int, int] = field(default_factory=dict)  # xid -> count seen
    last_xid: int = 0


def _load_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        logger.info("GPU metrics: nvidia-ml-py (pynvml) is not installed; none exported")
        return None
    return pynvml


class GpuMetricsCollector(Collector):
    """Samples NVML on a thread; ``collect()`` yields the latest snapshot."""

    def __init__(
        self,
        model_name: str,
        interval_s: float = 5.0,
        nvml: ModuleType | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"gpu_metrics_interval must be > 0, got {interval_s}")
        self.model_name = model_name
        self.interval_s = interval_s
        self.nvml = nvml
        self.available = False
        self._handles: list[Any] = []
        self._samples: list[GpuSample] = []
        self._unsupported: list[set[str]] = []
        self._event_set: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- life cycle

    def start(self, registry: CollectorRegistry | None = None) -> bool:
        """Initialise NVML, take a first sample, start the thread and register on
        ``registry``. Returns False (and logs once) when there is no NVIDIA GPU."""
        nv = self.nvml if self.nvml is not None else _load_nvml()
        if nv is None:
            return False
        self.nvml = nv
        try:
            nv.nvmlInit()
            count = nv.nvmlDeviceGetCount()
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            logger.info("GPU metrics: no NVIDIA driver/GPU (%s); none exported", e)
            return False
        if count == 0:
            logger.info("GPU metrics: NVML found no GPU; none exported")
            nv.nvmlShutdown()
            return False
        self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._unsupported = [set() for _ in self._handles]
        base = []
        for i, h in enumerate(self._handles):
            base.append(
                GpuSample(i, _text(nv.nvmlDeviceGetUUID(h)), _text(nv.nvmlDeviceGetName(h)))
            )
        self._samples = base
        self._init_events()
        self.sample()
        self.available = True
        if registry is not None:
            registry.register(self)
        self._thread = threading.Thread(target=self._run, name="kvasir-gpu-metrics", daemon=True)
        self._thread.start()
        logger.info("GPU metrics: %d GPU(s) every %.1fs", count, self.interval_s)
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 1.0)
        if self.available and self.nvml is not None:
            try:
                if self._event_set is not None:
                    self.nvml.nvmlEventSetFree(self._event_set)
                self.nvml.nvmlShutdown()
            except Exception:  # pragma: no cover - best effort at exit
                pass
            self.available = False

    def _init_events(self) -> None:
        nv = self.nvml
        assert nv is not None
        try:
            self._event_set = nv.nvmlEventSetCreate()
        except Exception:
            self._event_set = None
            return
        for i, h in enumerate(self._handles):
            try:
                nv.nvmlDeviceRegisterEvents(h, _XID_EVENT, self._event_set)
            except Exception:
                self._unsupported[i].add("xid")

    def _run(self) -> None:
        while not self._stop.is_set():
            deadline = time.monotonic() + self.interval_s
            self._wait_events(deadline)
            if self._stop.is_set():
                return
            try:
                self.sample()
            except Exception:  # a driver hiccup must not kill the thread
                logger.exception("GPU metrics: sampling failed")

    def _wait_events(self, deadline: float) -> None:
        """Sleep until ``deadline``, counting XID events as they arrive."""
        nv = self.nvml
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._event_set is None:
                self._stop.wait(left)
                return
            try:
                data = nv.nvmlEventSetWait_v2(self._event_set, int(min(left, 1.0) * 1000))  # type: ignore[union-attr]
            except Exception:  # NVMLError_Timeout: nothing happened
                continue
            self._record_xid(data)

    def _record_xid(self, data: Any) -> None:
        if not (getattr(data, "eventType", 0) & _XID_EVENT):
            return
        xid = int(data.eventData)
        for i, h in enumerate(self._handles):
            if _same_handle(h, data.device):
                with self._lock:
                    s = self._samples[i]
                    s.xid_errors[xid] = s.xid_errors.get(xid, 0) + 1
                    s.last_xid = xid
                logger.warning("GPU %d: XID %d", i, xid)
                return

    # ---------------------------------------------------------------- sampling

    def _q(self, i: int, key: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, or None once the GPU said the query is not supported."""
        if key in self._unsupported[i]:
            return None
        try:
            return fn(*args)
        except Exception as e:
            if "Not Supported" in str(e) or type(e).__name__.endswith("NotSupported"):
                self._unsupported[i].add(key)
            return None

    def sample(self) -> list[GpuSample]:
        nv = self.nvml
        assert nv is not None
        new = []
        for i, h in enumerate(self._handles):
            old = self._samples[i]
            s = GpuSample(old.index, old.uuid, old.name)
            util = self._q(i, "util", nv.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                s.sm_util, s.mem_util = util.gpu / 100.0, util.memory / 100.0
            mem = self._q(i, "mem", nv.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                s.mem_used, s.mem_total = float(mem.used), float(mem.total)
            s.temp_gpu = self._q(i, "temp", nv.nvmlDeviceGetTemperature, h, 0)
            power = self._q(i, "power", nv.nvmlDeviceGetPowerUsage, h)
            s.power = None if power is None else power / 1000.0
            limit = self._q(i, "power_limit", nv.nvmlDeviceGetEnforcedPowerLimit, h)
            s.power_limit = None if limit is None else limit / 1000.0
            for clock, cid in (("graphics", 0), ("sm", 1), ("memory", 2)):
                mhz = self._q(i, f"clock_{clock}", nv.nvmlDeviceGetClockInfo, h, cid)
                if mhz is not None:
                    s.clocks[clock] = mhz * 1e6
            reasons = self._q(i, "throttle", _throttle_fn(nv), h)
            if reasons is not None:
                s.throttle = {k: int(bool(reasons & bit)) for k, bit in THROTTLE_REASONS.items()}
            fields = self._q(
                i,
                "fields",
                nv.nvmlDeviceGetFieldValues,
                h,
                [
                    (_NVML_FI_DEV_MEMORY_TEMP, 0),
                    (_NVML_FI_NVLINK_TX_KIB, _ALL_LINKS),
                    (_NVML_FI_NVLINK_RX_KIB, _ALL_LINKS),
                ],
            )
            if fields is not None:
                temp_mem, tx, rx = (_field_value(v) for v in fields)
                s.temp_mem = temp_mem
                s.nvlink_tx = None if tx is None else tx * 1024.0
                s.nvlink_rx = None if rx is None else rx * 1024.0
            s.ecc_corrected = self._q(i, "ecc", nv.nvmlDeviceGetTotalEccErrors, h, 0, 0)
            s.ecc_uncorrected = self._q(i, "ecc", nv.nvmlDeviceGetTotalEccErrors, h, 1, 0)
            sbe = self._q(i, "retired", nv.nvmlDeviceGetRetiredPages, h, 0)
            dbe = self._q(i, "retired", nv.nvmlDeviceGetRetiredPages, h, 1)
            s.retired_pages_sbe = None if sbe is None else float(len(sbe))
            s.retired_pages_dbe = None if dbe is None else float(len(dbe))
            pending = self._q(i, "retired", nv.nvmlDeviceGetRetiredPagesPendingStatus, h)
            s.retired_pages_pending = None if pending is None else float(pending)
            new.append(s)
        with self._lock:
            for s, old in zip(new, self._samples, strict=True):
                s.xid_errors, s.last_xid = old.xid_errors, old.last_xid
            self._samples = new
        return new

    # ---------------------------------------------------------------- export

    def collect(self) -> Iterator[Any]:
        with self._lock:
            samples = [(s, dict(s.xid_errors)) for s in self._samples]
        if not self.available:
            return
        base = ["model_name", "gpu", "uuid"]

        def fam(kind: type, name: str, doc: str, extra: list[str] | None = None) -> Any:
            return kind(name, doc, labels=base + (extra or []))

        info = fam(GaugeMetricFamily, "kvasir:gpu_info", "GPU identity (value 1).", ["name"])
        gauges = {
            "sm_util": fam(
                GaugeMetricFamily, "kvasir:gpu_utilization_ratio", "SM utilisation (0..1)."
            ),
            "mem_util": fam(
                GaugeMetricFamily,
                "kvasir:gpu_memory_utilization_ratio",
                "Memory-controller utilisation (0..1): the share of time device memory "
                "was read or written, a memory-bandwidth proxy.",
            ),
            "mem_used": fam(GaugeMetricFamily, "kvasir:gpu_memory_used_bytes", "Memory used."),
            "mem_total": fam(
                GaugeMetricFamily, "kvasir:gpu_memory_total_bytes", "Memory in total."
            ),
            "power": fam(GaugeMetricFamily, "kvasir:gpu_power_watts", "Power draw."),
            "power_limit": fam(
                GaugeMetricFamily, "kvasir:gpu_power_limit_watts", "Enforced power limit."
            ),
            "retired_pages_pending": fam(
                GaugeMetricFamily,
                "kvasir:gpu_retired_pages_pending",
                "1 when retired pages wait for a reboot/reset.",
            ),
        }
        temp = fam(GaugeMetricFamily, "kvasir:gpu_temperature_celsius", "Temperature.", ["sensor"])
        clock = fam(GaugeMetricFamily, "kvasir:gpu_clock_hz", "Current clocks.", ["clock"])
        throttle = fam(
            GaugeMetricFamily,
            "kvasir:gpu_throttle_reason",
            "1 while the clocks are held down for this reason.",
            ["reason"],
        )
        nvlink = fam(
            CounterMetricFamily,
            "kvasir:gpu_nvlink_bytes",
            "NVLink data bytes over all links.",
            ["direction"],
        )
        ecc = fam(
            CounterMetricFamily,
            "kvasir:gpu_ecc_errors",
            "Volatile ECC errors (since the driver loaded).",
            ["type"],
        )
        retired = fam(
            GaugeMetricFamily, "kvasir:gpu_retired_pages", "Retired memory pages.", ["cause"]
        )
        xid = fam(CounterMetricFamily, "kvasir:gpu_xid_errors", "XID events seen.", ["xid"])
        last_xid = fam(GaugeMetricFamily, "kvasir:gpu_last_xid", "Last XID seen (0: none).")
        for s, xids in samples:
            lv = [self.model_name, str(s.index), s.uuid]
            info.add_metric([*lv, s.name], 1.0)
            for key, f in gauges.items():
                v = getattr(s, key)
                if v is not None:
                    f.add_metric(lv, v)
            for sensor, v in (("gpu", s.temp_gpu), ("memory", s.temp_mem)):
                if v is not None:
                    temp.add_metric([*lv, sensor], v)
            for k, v in s.clocks.items():
                clock.add_metric([*lv, k], v)
            for k, v in s.throttle.items():
                throttle.add_metric([*lv, k], v)
            for d, v in (("tx", s.nvlink_tx), ("rx", s.nvlink_rx)):
                if v is not None:
                    nvlink.add_metric([*lv, d], v)
            for t, v in (("corrected", s.ecc_corrected), ("uncorrected", s.ecc_uncorrected)):
                if v is not None:
                    ecc.add_metric([*lv, t], v)
            for c, v in (
                ("single_bit_ecc", s.retired_pages_sbe),
                ("double_bit_ecc", s.retired_pages_dbe),
            ):
                if v is not None:
                    retired.add_metric([*lv, c], v)
            for x, n in sorted(xids.items()):
                xid.add_metric([*lv, str(x)], n)
            last_xid.add_metric(lv, s.last_xid)
        yield info
        yield from gauges.values()
        yield from (temp, clock, throttle, nvlink, ecc, retired, xid, last_xid)


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _throttle_fn(nv: ModuleType) -> Any:
    # Renamed "clocks event reasons" in NVML 12.x; the old name stays for old drivers.
    fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
    return fn if fn is not None else nv.nvmlDeviceGetCurrentClocksThrottleReasons


def _field_value(v: Any) -> float | None:
    if getattr(v, "nvmlReturn", 0) != 0:
        return None
    member = _VALUE_MEMBERS.get(int(v.valueType))
    return None if member is None else float(getattr(v.value, member))


def _same_handle(a: Any, b: Any) -> bool:
    if a is b or a == b:
        return True
    try:  # ctypes pointers: compare addresses
        import ctypes

        return ctypes.addressof(a.contents) == ctypes.addressof(b.contents)
    except (TypeError, ValueError, AttributeError):
        return False
