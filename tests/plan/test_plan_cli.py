"""``kvasir plan`` on the command line: tables, one JSON object on the last line,
figures, and bad input answered with errors that name the parameter."""

from __future__ import annotations

import json

import pytest

from kvasir.entrypoints.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:  # noqa: ANN001
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(capsys, *argv: str) -> dict:  # noqa: ANN001
    rc, out, err = _run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_capacity_json_has_engine_blocks(capsys) -> None:  # noqa: ANN001
    d = _json(
        capsys, "capacity", "--model", "llama-3-8b", "--hardware", "h100", "--kv-cache-gb", "10"
    )
    assert d["num_blocks"] == 5120 and d["num_blocks_exact"] is True
    assert d["hardware"] == "h100-sxm" and d["kv_bytes_per_block"] == 2 << 20


def test_roofline_json_table_and_plot(capsys, tmp_path) -> None:  # noqa: ANN001
    d = _json(capsys, "roofline", "--model", "qwen3-0.6b", "--hardware", "l4", "--batch-size", "4")
    ops = {o["op"]: o for o in d["operators"]}
    assert {"qkv_proj", "qk_norm", "attention_decode", "gate_up_proj", "lm_head", "sampler"} <= set(
        ops
    )
    assert ops["gate_up_proj"]["bound"] == "memory"  # 4 rows: far below the ridge
    assert ops["qkv_proj"]["intensity"] < d["ridge_flops_per_byte"]
    rc, out, _ = _run(capsys, "roofline", "--model", "llama-3-8b", "--prompt-len", "4096")
    assert rc == 0 and "compute" in out and "ridge" in out  # the table, by default
    pytest.importorskip("matplotlib")
    png = tmp_path / "roofline.png"
    d = _json(
        capsys, "roofline", "--model", "llama-3-8b", "--prompt-len", "512", "--plot", str(png)
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_throughput_tco_compare_study(capsys) -> None:  # noqa: ANN001
    lat = _json(
        capsys,
        "latency",
        "--model",
        "llama-3-8b",
        "--hardware",
        "h200",
        "--max-num-batched-tokens",
        "8192",
    )
    assert lat["decode_tok_s"] == pytest.approx(250.4, rel=1e-3)  # the measured H200 decode
    thr = _json(
        capsys, "throughput", "--model", "llama-3-8b", "--hardware", "h100", "--num-prompts", "64",
        "--input-len", "512", "--output-len", "128", "--tpot-slo-ms", "20",
    )  # fmt: skip
    assert thr["output_tok_s"] > 0 and thr["best_batch_under_slo"]["tpot_s"] <= 0.020
    tco = _json(
        capsys, "tco", "--model", "llama-3-8b", "--hardware", "h100", "--num-prompts", "64",
        "--input-len", "512", "--output-len", "128", "--num-accelerators", "8",
    )  # fmt: skip
    assert tco["on_prem_usd_per_mtok"] > 0 and tco["on_demand_usd_per_mtok"] > 0
    sens = [r["on_prem_usd_per_mtok"] for r in tco["sensitivity"]]
    assert sens == sorted(sens, reverse=True)  # fixed costs spread over more tokens
    cmp_ = _json(
        capsys, "compare", "--model", "llama-3.1-70b", "--tp", "4", "--num-prompts", "32",
        "--input-len", "512", "--output-len", "64", "--hardware-list", "h100-sxm,l4,mi300x",
    )  # fmt: skip
    by = {r["hardware"]: r for r in cmp_["results"]}
    assert by["h100-sxm"]["fits"] and by["mi300x"]["fits"] and not by["l4"]["fits"]
    assert "short by" in by["l4"]["error"]
    for study in ("block-size", "chunk-size", "kv-memory", "batch", "ssm"):
        d = _json(capsys, "study", study, "--model", "llama-3-8b")
        assert d["rows"], study


def test_list_hardware(capsys) -> None:  # noqa: ANN001
    d = _json(capsys, "--list-hardware")
    names = {h["name"] for h in d["hardware"]}
    assert {"h100-sxm", "h100-pcie", "h200", "b200", "a100-80gb", "l40s", "l4", "mi300x"} <= names
    assert {"tpu-v5e", "tpu-v5p", "groq-lpu", "cerebras-wse3"} <= names


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["latency", "--hardware", "h900"], "--hardware 'h900' is unknown"),
        (["latency", "--model", "no-such-model"], "--model 'no-such-model' is unknown"),
        (["capacity", "--model", "llama-3.1-70b", "--hardware", "l40s"], "short by 88.2 GiB"),
        (["latency", "--model", "llama-3-8b", "--tp", "3"], "--tensor-parallel-size 3"),
        (["latency", "--model", "tiny-llama", "--pp", "4"], "--pipeline-parallel-size 4"),
        (["latency", "--model", "llama-3-8b", "--quantization", "int3"], "--quantization"),
        (["latency", "--model", "llama-3-8b", "--kv-cache-dtype", "fp6"], "--kv-cache-dtype"),
        (["latency", "--model", "llama-3-8b", "--block-size", "24"], "--block-size"),
        (["latency", "--model", "llama-3-8b", "--hardware", "this-machine",
          "--calibration-file", "/nonexistent/cal.json"], "kvasir plan --calibrate"),
    ],
)  # fmt: skip
def test_bad_input_names_the_parameter(capsys, argv: list[str], needle: str) -> None:  # noqa: ANN001
    rc, out, err = _run(capsys, *argv)
    assert rc == 2
    assert needle in err, err


def test_roofline_devices_tpu_lpu_wafer(capsys) -> None:  # noqa: ANN001
    """The seed's accelerator comparison: TPU, LPU and WSE-3 are bare rooflines (no
    kvasir measurement), and a 70B model fits them only split as their memory allows."""
    base = ["latency", "--model", "llama-3-70b", "--max-model-len", "8192", "--input-len", "512"]
    tpu = _json(capsys, *base, "--hardware", "tpu-v5p", "--tp", "4")
    assert tpu["efficiency_source"].startswith("roofline (ideal)")
    # 0.23 GB of SRAM a chip: 16-way tensor x 80-way pipeline of int8 weights
    groq = _json(capsys, *base, "--hardware", "groq-lpu", "--tp", "16", "--pp", "80", "-q", "int8",
                 "--max-num-batched-tokens", "256", "--max-num-seqs", "16")  # fmt: skip
    wse = _json(capsys, *base, "--hardware", "cerebras-wse3", "--pp", "4")
    gpu = _json(capsys, *base, "--hardware", "h100", "--tp", "8")
    # weights streamed from SRAM: the wafer's bandwidth bound is far beyond HBM's
    assert wse["decode_tok_s"] > 10 * gpu["decode_tok_s"]
    assert groq["decode_tok_s"] > 0 and tpu["decode_tok_s"] > 0
    rc, _, err = _run(capsys, *base, "--hardware", "groq-lpu", "--tp", "8", "--pp", "80")
    assert rc == 2 and "short by" in err
