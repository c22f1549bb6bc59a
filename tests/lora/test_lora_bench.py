"""``kvasir bench throughput --num-loras``: random PEFT adapters that the engine accepts,
the uniform / Zipf spread, and one short run's cache counters (each adapter read from
disk once, every request finished)."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from kvasir.bench import lora, throughput
from kvasir.lora.adapter import inspect_adapter, load_adapter
from tests.model_utils import save_tiny_llama


def test_assign_adapters_uniform_and_zipf():
    z = Counter(lora.assign_adapters(4000, 8, "zipf", 1.0, 0))
    u = Counter(lora.assign_adapters(4000, 8, "uniform", 1.0, 0))
    assert set(z) == set(u) == set(range(8))
    # Zipf(1): adapter k gets ~1/(k+1) of adapter 0's share.
    assert 1.6 < z[0] / z[1] < 2.4 and 5.5 < z[0] / z[7] < 11
    assert max(u.values()) / min(u.values()) < 1.3


def test_random_adapter_is_a_valid_peft_adapter(tmp_path):
    shapes = {
        "model.layers.0.self_attn.q_proj": (64, 64),
        "model.layers.0.mlp.down_proj": (128, 64),
    }
    lora.write_random_adapter(str(tmp_path), shapes, 8, seed=0)
    info = inspect_adapter(str(tmp_path), shapes, 16)
    assert info.rank == 8 and set(info.lora) == set(shapes)
    a, b = load_adapter(info).lora["model.layers.0.mlp.down_proj"]
    assert a.shape == (8, 128) and b.shape == (64, 8)
    assert abs(info.lora["model.layers.0.mlp.down_proj"][3] - 2.0) < 1e-9  # alpha 2r / r


@pytest.mark.slow  # a benchmark run (~25 s on a loaded 2-core VM): make test-slow
def test_bench_lora_run(tmp_path):
    model = str(tmp_path / "base")
    save_tiny_llama(model, seed=1)
    p = argparse.ArgumentParser()
    throughput.add_cli_args(p)
    out = tmp_path / "out.json"
    args = p.parse_args([
        "--model", model, "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "3",
        "--max-lora-rank", "8", "--num-loras", "3", "--random-lora-dir", str(tmp_path / "l"),
        "--random-lora-rank", "8", "--num-prompts", "9", "--input-len", "8:12",
        "--output-len", "4", "--max-model-len", "64", "--kv-cache-gb", "0.01",
        "--output-json", str(out),
    ])  # fmt: skip
    assert throughput.main(args) == 0
    r = json.loads(out.read_text())
    assert r["bench"] == "throughput_lora" and r["num_loras"] == 3
    assert r["disk_loads"] == 3 and r["cold_starts"] == 3  # each adapter read once
    assert r["device_loads"] >= 3 and r["host_hit_rate"] == 1.0
    assert r["base_output_tok_s"] > 0 and r["lora_output_tok_s"] > 0
