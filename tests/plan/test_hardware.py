"""The catalogue: every required device, every figure sourced, derived CPU peaks."""

from __future__ import annotations

import pytest

from kvasir.plan.hardware import (
    CATALOGUE,
    Hardware,
    cpu_peak_fp32_tflops,
    ddr_bandwidth_gbs,
    get_hardware,
    load_calibrated,
    save_calibrated,
)


def test_required_devices_with_sources() -> None:
    required = {"h100-sxm", "h100-pcie", "h200", "b200", "a100-80gb", "l40s", "l4", "mi300x"}
    roofline_only = {"tpu-v5e", "tpu-v5p", "groq-lpu", "cerebras-wse3"}
    assert required | roofline_only <= set(CATALOGUE)
    assert any(h.kind == "cpu" for h in CATALOGUE.values())
    for h in CATALOGUE.values():
        assert h.source and h.source_date and h.price_source and h.price_date, h.name
        assert "bf16" in h.peak_tflops or "fp16" in h.peak_tflops or "fp32" in h.peak_tflops
    for name in required:
        h = CATALOGUE[name]
        assert h.price_usd and h.tdp_w and h.link_gbs > 0 and h.cache_mb > 0, name
    assert CATALOGUE["groq-lpu"].weights_in_sram and CATALOGUE["cerebras-wse3"].weights_in_sram


def test_cpu_peaks_from_cores_vectors_and_clock() -> None:
    # 56 cores x 16 fp32 lanes x 2 FMA units x 2 FLOPs x 2.0 GHz = 7.168 TFLOP/s
    assert cpu_peak_fp32_tflops(56, 512, 2, 2.0) == pytest.approx(7.168)
    assert CATALOGUE["xeon-8480"].peak("fp32") == pytest.approx(7.168e12)
    # 12 channels x 4,800 MT/s x 8 bytes = 460.8 GB/s
    assert ddr_bandwidth_gbs(12, 4800) == pytest.approx(460.8)
    assert CATALOGUE["epyc-9654"].memory_bandwidth_gbs == pytest.approx(460.8)


def test_missing_dtype_falls_back_to_a_wider_unit() -> None:
    a100 = CATALOGUE["a100-80gb"]  # no FP8 tensor cores: FP8 weights run as bf16 GEMMs
    assert a100.peak("fp8") == a100.peak("bf16") == 312e12
    assert CATALOGUE["b200"].peak("fp4") == 9000e12


def test_calibration_round_trip(tmp_path) -> None:  # noqa: ANN001
    h = CATALOGUE["l4"]
    cal = Hardware.from_dict({**h.as_dict(), "name": "this-machine", "calibrated": True})
    path = save_calibrated(cal, str(tmp_path / "hw.json"))
    assert load_calibrated(path) == cal
    assert get_hardware("this-machine", path) == cal
    with pytest.raises(ValueError, match="--hardware"):
        get_hardware("h1000")
