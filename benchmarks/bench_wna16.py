"""Packed-weight kernels on a CUDA GPU: the W4A16 GEMV / GEMM (``kvasir.kernels.wna16``,
group 128) and the GGUF Q4_1 dequantising GEMV / GEMM (``kvasir.kernels.gguf``) against
bf16 ``F.linear``, Llama-3-8B projection shapes, batch 1 and 16. Microseconds per call
(``triton.testing.do_bench``) and the GEMVs' bandwidth over the bytes they read.

    PYTHONPATH=. python benchmarks/bench_wna16.py
"""

from __future__ import annotations

import functools
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kvasir.kernels.gguf import gguf_gemv, gguf_matmul
from kvasir.kernels.wna16 import pack_along_k, wna16_gemv, wna16_matmul

SHAPES = {"qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _us(fn, *args) -> float:  # noqa: ANN001
    return do_bench(functools.partial(fn, *args)) * 1e3


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    from gguf.constants import GGMLQuantizationType as Q

    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        q = pack_along_k(torch.randint(0, 16, (k, n), device="cuda"), 4)
        s = torch.rand(k // 128, n, device="cuda") * 0.01
        z = torch.full_like(s, 8.0)
        q41 = torch.randint(0, 256, (n, k // 32 * 20), device="cuda", dtype=torch.uint8)
        q41.view(-1, 20)[:, :4] = torch.tensor([0, 0x20, 0, 0], dtype=torch.uint8, device="cuda")
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = _us(F.linear, x, w)
            if m == 1:
                t_w4 = _us(wna16_gemv, x, q, s, z, 128, 4)
                t_g = _us(gguf_gemv, x, q41, Q.Q4_1)
            else:
                t_w4 = _us(wna16_matmul, x, q, s, z, 128, 4)
                t_g = _us(gguf_matmul, x, q41, Q.Q4_1)
            w4_bytes = q.numel() * 4 + s.numel() * 8
            rows.append({
                "shape": name, "m": m, "bf16_us": round(t_bf16, 1), "w4a16_us": round(t_w4, 1),
                "gguf_q4_1_us": round(t_g, 1),
                "w4a16_GBps": round(w4_bytes / t_w4 / 1e3, 1),
                "q4_1_GBps": round(q41.numel() / t_g / 1e3, 1),
                "bf16_GBps": round(w.numel() * 2 / t_bf16 / 1e3, 1),
            })  # fmt: skip
            print(rows[-1])
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
