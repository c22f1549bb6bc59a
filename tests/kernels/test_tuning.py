"""``kvasir tune``'s search and table (kvasir.kernels.tuning), on the CPU under Triton's
interpreter with a fake timer: the fastest *correct* config wins, a config that fails
the kernel's reference check is never kept, and the kernels read the table."""

from __future__ import annotations

import json

import pytest
from kvtest_utils import DEVICE

from kvasir.kernels import gemv as gemv_mod
from kvasir.kernels import quant_gemm, tuning
from kvasir.kernels.tuning import ConfigTable, TimingContext, TunableKernel


def fake_timer(times):
    """Seconds per config from ``times(ctx)``; the callable is run once (it must work)."""

    def timer(fn, ctx: TimingContext) -> float:
        fn()
        return times(ctx)

    return timer


@pytest.fixture(autouse=True)
def _no_table():
    yield
    tuning.set_table(None)


def test_gemv_search_picks_fastest_correct_and_the_kernel_uses_it():
    kern = tuning.registry()["gemv"]
    shape = (48, 96, 1, 2)  # [gate; up] of 24 rows each, K = 96, bf16 weights
    space = kern.space(shape)[:6]  # (the interpreter is slow: a few candidates)
    want = space[-1]  # the fake timer makes the last candidate fastest
    assert want != kern.default(shape)
    timer = fake_timer(lambda ctx: 1e-6 if ctx.config == want else 5e-6)
    table = ConfigTable("Fake GPU")
    few = TunableKernel(
        "gemv", lambda s: space, kern.default, kern.make_inputs, kern.run,
        kern.reference, kern.key, kern.bytes_moved, kern.tol,
    )  # fmt: skip
    (r,) = tuning.tune([(few, shape)], DEVICE, timer, table)
    assert r.best == want and r.speedup == pytest.approx(5.0) and not r.rejected
    assert table.lookup("gemv", r.key) == want
    tuning.set_table(table)
    # The kernel's own config choice now returns the tuned config for that shape only.
    assert gemv_mod.gemv_config(48, 96, 1, 2, device=DEVICE) == want
    other = gemv_mod.gemv_config(48, 96, 0, 2, device=DEVICE)
    assert other == gemv_mod.default_gemv_config(48, 96, 132, False, 2)


def test_a_wrong_config_is_never_kept_even_if_fastest():
    kern = tuning.registry()["gemv"]
    shape = (40, 96, 0, 1)  # FP8 weights with row scales
    good = kern.default(shape)
    bad = (8, 64, 4, 2)

    def run(inp, cfg):  # a "config" that computes the wrong thing
        out = kern.run(inp, good)
        return out * 1.5 if cfg == bad else out

    broken = TunableKernel(
        "gemv", lambda s: [bad, (4, 64, 2, 2)], kern.default, kern.make_inputs, run,
        kern.reference, kern.key, kern.bytes_moved, kern.tol,
    )  # fmt: skip
    timer = fake_timer(
        lambda ctx: 1e-9 if ctx.config == bad else 1e-6 * (2 if ctx.is_default else 1)
    )
    table = ConfigTable("Fake GPU")
    (r,) = tuning.tune([(broken, shape)], DEVICE, timer, table)
    assert r.best == (4, 64, 2, 2)
    assert [c for c, _ in r.rejected] == [bad] and "relative error" in r.rejected[0][1]
    assert table.lookup("gemv", r.key) != bad


def test_raising_config_is_rejected_and_default_kept_when_nothing_beats_it():
    kern = tuning.registry()["gemv"]
    shape = (40, 96, 0, 2)
    default = kern.default(shape)
    raising = (3, 64, 4, 2)  # BLOCK_N must be a power of two: Triton refuses it
    odd = TunableKernel(
        "gemv", lambda s: [raising, (4, 64, 2, 2)], kern.default, kern.make_inputs, kern.run,
        kern.reference, kern.key, kern.bytes_moved, kern.tol,
    )  # fmt: skip
    timer = fake_timer(lambda ctx: 1e-6 if ctx.is_default else 2e-6)
    (r,) = tuning.tune([(odd, shape)], DEVICE, timer, ConfigTable("x"))
    assert r.best == default and r.speedup == 1.0
    assert [c for c, _ in r.rejected] == [raising]


def test_quant_matmul_tuned_config_is_used():
    kern = tuning.registry()["quant_matmul"]
    shape = (5, 40, 64, 1, "int8")  # 5 rows -> the m<=16 bucket, INT8 W8A8
    space = [c for c in kern.space(shape) if c[2] == 64][:3]
    narrowed = TunableKernel(
        "quant_matmul", lambda s: space, kern.default, kern.make_inputs, kern.run,
        kern.reference, kern.key, kern.bytes_moved, kern.tol,
    )  # fmt: skip
    want = space[1]
    timer = fake_timer(lambda ctx: 1e-6 if ctx.config == want else 3e-6)
    table = ConfigTable("Fake GPU")
    (r,) = tuning.tune([(narrowed, shape)], DEVICE, timer, table)
    assert r.best == want and r.key.startswith("m<=16,n=40,k=64,a=1,w=int8")
    tuning.set_table(table)
    seen = {}
    real = quant_gemm._quant_matmul_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.update(kw)
                return real[grid](*args, **kw)

            return launch

    quant_gemm._quant_matmul_kernel = Spy()
    try:
        inp = kern.make_inputs((3, 40, 64, 1, "int8"), DEVICE, 7)
        out = quant_gemm.quant_matmul(inp["a"], inp["w"], inp["ws"], inp["as"])
    finally:
        quant_gemm._quant_matmul_kernel = real
    assert (seen["BLOCK_M"], seen["BLOCK_N"], seen["BLOCK_K"], seen["num_warps"]) == want
    assert tuning.rel_error(out, kern.reference(inp)) < 2e-2


def test_table_round_trip_and_bad_files(tmp_path, monkeypatch):
    t = ConfigTable("NVIDIA H200")
    t.put("gemv", "rows=8,k=8,fusion=0,wbytes=2", (8, 256, 4, 3), 10.0, 12.0)
    path = tmp_path / tuning.device_file_name("NVIDIA H200")
    assert path.name == "NVIDIA_H200.json"
    t.save(path)
    back = ConfigTable.load(path)
    assert back.lookup("gemv", "rows=8,k=8,fusion=0,wbytes=2") == (8, 256, 4, 3)
    assert back.device == "NVIDIA H200"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kernels": {"gemv": {"k": {"config": [8, "x"]}}}}))
    with pytest.raises(ValueError, match=r"gemv\[k\]\.config"):
        ConfigTable.load(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="not a kernel-config table"):
        ConfigTable.load(bad)
    # The environment variable's file is the first one read for a device.
    monkeypatch.setenv("KVASIR_KERNEL_CONFIGS", str(path))
    tuning._table_for.cache_clear()
    assert tuning._table_for("Any GPU").lookup("gemv", "rows=8,k=8,fusion=0,wbytes=2")
    tuning._table_for.cache_clear()


def test_model_jobs_cover_the_projections():
    jobs = tuning.model_jobs(64, 128, 64, 16, ["gemv", "quant_matmul"], tp=2)
    shapes = {(k.name, s) for k, s in jobs}
    assert ("gemv", (48, 64, 0, 2)) in shapes  # qkv: (64 + 2 * 16) / 2 rows
    assert ("gemv", (128, 64, 1, 1)) in shapes  # gate_up, FP8
    assert ("quant_matmul", (16, 64, 64, 0, "fp8")) in shapes  # down at m <= 16
    with pytest.raises(ValueError, match="unknown kernel"):
        tuning.model_jobs(64, 128, 64, 16, ["nope"])


def test_shipped_tables_are_valid():
    for path in tuning.SHIPPED_DIR.glob("*.json"):
        table = ConfigTable.load(path)
        assert table.kernels, path
