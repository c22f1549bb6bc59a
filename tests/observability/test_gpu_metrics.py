"""The NVML collector against the fake ``pynvml`` (fake_nvml/): every kvasir:gpu_*
series with the fake's values, queries a GPU does not support dropped for that GPU,
XID events counted, and a machine without the driver exporting nothing (said once)."""

from __future__ import annotations

import importlib.util
import logging
import time

import pytest
from conftest import FAKE_NVML_DIR
from prometheus_client import CollectorRegistry, generate_latest

from kvasir.metrics.gpu import GpuMetricsCollector

H100 = "GPU-11111111-2222-3333-4444-555555555555"


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("fake_pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("FAKE_NVML_NO_DRIVER", raising=False)
    monkeypatch.setenv("FAKE_NVML_XIDS", "79,48")
    return mod


def _series(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("kvasir:gpu"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _lab(gpu: int, uuid: str, **extra: str) -> str:
    labels = {"model_name": "m", "gpu": str(gpu), "uuid": uuid, **extra}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def test_collector_exports_the_fake_gpus(nvml) -> None:  # noqa: ANN001
    reg = CollectorRegistry()
    c = GpuMetricsCollector("m", interval_s=0.05, nvml=nvml)
    assert c.start(reg)
    try:
        deadline = time.monotonic() + 10
        while sum(c._samples[0].xid_errors.values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        s = _series(generate_latest(reg).decode())
    finally:
        c.stop()
    g0 = _lab(0, H100)
    assert s[f"kvasir:gpu_info{_lab(0, H100, name='NVIDIA H100 80GB HBM3')}"] == 1
    assert s[f"kvasir:gpu_utilization_ratio{g0}"] == 0.87
    assert s[f"kvasir:gpu_memory_utilization_ratio{g0}"] == 0.64
    assert s[f"kvasir:gpu_memory_used_bytes{g0}"] == 60 * 2**30
    assert s[f"kvasir:gpu_memory_total_bytes{g0}"] == 80 * 2**30
    assert s[f"kvasir:gpu_temperature_celsius{_lab(0, H100, sensor='gpu')}"] == 61
    assert s[f"kvasir:gpu_temperature_celsius{_lab(0, H100, sensor='memory')}"] == 70
    assert s[f"kvasir:gpu_power_watts{g0}"] == 512.0
    assert s[f"kvasir:gpu_power_limit_watts{g0}"] == 700.0
    assert s[f"kvasir:gpu_clock_hz{_lab(0, H100, clock='sm')}"] == 1980e6
    assert s[f"kvasir:gpu_clock_hz{_lab(0, H100, clock='memory')}"] == 2619e6
    assert s[f"kvasir:gpu_throttle_reason{_lab(0, H100, reason='sw_power_cap')}"] == 1
    assert s[f"kvasir:gpu_throttle_reason{_lab(0, H100, reason='hw_thermal_slowdown')}"] == 1
    assert s[f"kvasir:gpu_throttle_reason{_lab(0, H100, reason='gpu_idle')}"] == 0
    tx = s[f"kvasir:gpu_nvlink_bytes_total{_lab(0, H100, direction='tx')}"]
    rx = s[f"kvasir:gpu_nvlink_bytes_total{_lab(0, H100, direction='rx')}"]
    assert tx > 0 and rx == 2 * tx and tx % (1000 * 1024) == 0  # KiB -> bytes
    assert s[f"kvasir:gpu_ecc_errors_total{_lab(0, H100, type='corrected')}"] == 3
    assert s[f"kvasir:gpu_ecc_errors_total{_lab(0, H100, type='uncorrected')}"] == 0
    assert s[f"kvasir:gpu_retired_pages{_lab(0, H100, cause='single_bit_ecc')}"] == 2
    assert s[f"kvasir:gpu_retired_pages{_lab(0, H100, cause='double_bit_ecc')}"] == 1
    assert s[f"kvasir:gpu_retired_pages_pending{g0}"] == 0
    assert s[f"kvasir:gpu_xid_errors_total{_lab(0, H100, xid='79')}"] == 1
    assert s[f"kvasir:gpu_xid_errors_total{_lab(0, H100, xid='48')}"] == 1
    assert s[f"kvasir:gpu_last_xid{g0}"] == 48
    # The consumer card: what it supports, nothing of what it does not.
    g1 = _lab(1, "GPU-99999999-8888-7777-6666-555555555555")
    assert s[f"kvasir:gpu_power_watts{g1}"] == 80.0
    one = [k for k in s if 'gpu="1"' in k]
    for absent in ("nvlink", "ecc", "retired", "xid_errors", 'sensor="memory"'):
        assert not [k for k in one if absent in k], absent
    assert {"ecc", "retired"} <= c._unsupported[1]  # asked once, then never again


def test_no_driver_exports_nothing_and_says_so_once(nvml, monkeypatch, caplog) -> None:  # noqa: ANN001
    monkeypatch.setenv("FAKE_NVML_NO_DRIVER", "1")
    reg = CollectorRegistry()
    c = GpuMetricsCollector("m", interval_s=0.05, nvml=nvml)
    with caplog.at_level(logging.INFO, logger="kvasir.metrics.gpu"):
        assert not c.start(reg)
    assert "kvasir:gpu" not in generate_latest(reg).decode()
    assert list(c.collect()) == []
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "no NVIDIA driver/GPU" in msgs[0]
    c.stop()  # harmless


def test_real_nvml_on_this_machine_is_handled() -> None:
    # On CI's CPU machines the real nvidia-ml-py finds no driver; on a GPU it finds GPUs.
    reg = CollectorRegistry()
    c = GpuMetricsCollector("m", interval_s=1.0)
    started = c.start(reg)
    try:
        text = generate_latest(reg).decode()
        assert ("kvasir:gpu_info" in text) == started
    finally:
        c.stop()


def test_bad_interval_refused() -> None:
    with pytest.raises(ValueError, match="gpu_metrics_interval"):
        GpuMetricsCollector("m", interval_s=0)
