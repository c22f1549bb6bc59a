"""``kvasir plan verify`` on this machine with the default model: it calibrates, runs
``kvasir bench latency`` and ``throughput``, and the predicted batch-1 decode tokens/s
and 32-request throughput must be within 25 % of the measured ones; the KV blocks the
engine allocated must be predicted exactly.

One thread (``--threads 1``) for the calibrations and both benchmarks: on a CI machine
shared with other jobs, a second thread's OpenMP barriers stall whenever another
process holds a core, which makes two-thread timings swing by integer factors. Each
benchmark sits between two calibrations (``--calibrate-each``) and is predicted for
their mean, so the prediction sees the machine the benchmark saw; a run disturbed
anyway (the load jumped within a benchmark) is repeated once; both attempts are
printed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TOLERANCE = 0.25
CHECKED = ("decode_tok_s_batch1", "throughput_32_requests")


def _verify(calibration_file: str) -> dict[str, dict]:
    cmd = [
        sys.executable, "-m", "kvasir.entrypoints.cli", "plan", "verify", "--threads", "1",
        "--recalibrate", "--calibrate-each", "--calibration-file", calibration_file, "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hardware"] == "this-machine" and result["model"] == "SmolLM2-135M-Instruct"
    return {r["metric"]: r for r in result["results"]}


def _report(rows: dict[str, dict], attempt: int) -> None:
    for name in (*CHECKED, "ttft_ms_batch1", "kv_usable_blocks"):
        r = rows[name]
        print(
            f"verify attempt {attempt}: {name}: predicted {r['predicted']} vs measured "
            f"{r['measured']} {r['unit']} (error {r['error']:+.1%})"
        )


@pytest.mark.slow
def test_verify_default_model_within_25_percent(tmp_path, record_property) -> None:  # noqa: ANN001
    rows = _verify(str(tmp_path / "calibration.json"))
    _report(rows, 1)
    if any(abs(rows[m]["error"]) > TOLERANCE for m in CHECKED):
        rows = _verify(str(tmp_path / "calibration.json"))
        _report(rows, 2)
    for m in (*CHECKED, "ttft_ms_batch1", "kv_usable_blocks"):
        record_property(m, {k: rows[m][k] for k in ("predicted", "measured", "error")})
    assert rows["kv_usable_blocks"]["predicted"] == rows["kv_usable_blocks"]["measured"]
    for m in CHECKED:
        assert abs(rows[m]["error"]) <= TOLERANCE, rows[m]
