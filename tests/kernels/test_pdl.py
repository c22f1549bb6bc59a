"""Programmatic dependent launch: a decode step's kernel chain (norm -> GEMV -> RoPE +
cache write -> split decode attention + reduce -> GEMV -> add + norm -> GEMV -> fused
SiLU GEMV, several layers, a torch add between layers) gives bit-identical results with
PDL on, replayed from a CUDA graph over several steps, and with PDL off, eager. The
kernels are the same, so any difference is a read or write racing across a kernel
boundary."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import DEVICE, ON_GPU

import kvasir.kernels.pdl as pdl_mod
from kvasir.kernels.decode_attention import paged_decode_attention
from kvasir.kernels.gemv import FUSE_SILU_MUL_OUT, gemv
from kvasir.kernels.kv_cache import rotary_embedding_and_cache
from kvasir.kernels.rmsnorm import fused_add_rms_norm, rms_norm

HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] >= 9


def test_pdl_off_where_unsupported():
    assert not pdl_mod.use_pdl(torch.zeros(1))  # CPU tensors never
    assert pdl_mod.launch_kwargs(False) == {}  # the interpreter's launcher takes no keyword
    assert pdl_mod.launch_kwargs(True) == {"launch_pdl": True}
    if not ON_GPU:
        return
    # The switch is the caller's (KernelConfig.pdl); no environment variable is read here.
    assert pdl_mod.use_pdl(torch.zeros(1, device=DEVICE)) == HOPPER
    assert not pdl_mod.use_pdl(torch.zeros(1, device=DEVICE), requested=False)


@pytest.mark.skipif(not HOPPER, reason="PDL needs a GPU of compute capability >= 9.0")
def test_decode_chain_pdl_graph_matches_eager():
    hidden, heads, kv_heads, head_dim, inter, layers = 512, 8, 2, 64, 1024, 4
    page, num_blocks, ctx0, steps = 16, 64, 100, 6
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, torch.bfloat16)

    weights = [
        dict(
            n1=rnd(hidden, scale=0.1) + 1,
            qkv=rnd((heads + 2 * kv_heads) * head_dim, hidden, scale=hidden**-0.5),
            o=rnd(hidden, heads * head_dim, scale=(heads * head_dim) ** -0.5),
            n2=rnd(hidden, scale=0.1) + 1,
            gu=rnd(2 * inter, hidden, scale=hidden**-0.5),
            down=rnd(hidden, inter, scale=inter**-0.5),
        )
        for _ in range(layers)
    ]
    pos = torch.arange(4096, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = pos[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1).to(DEVICE)
    cache0 = rnd(layers, 2, num_blocks, page, kv_heads, head_dim)
    block_table = torch.randperm(num_blocks, generator=g)[None, :].to(DEVICE, torch.int32)
    x0 = rnd(1, hidden)
    # Static inputs of one step (a CUDA graph reads them in place).
    x_in = torch.empty_like(x0)
    positions = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    slots = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    seq_lens = torch.zeros(1, dtype=torch.int32, device=DEVICE)

    def step(cache: torch.Tensor, pdl: bool) -> torch.Tensor:
        x = x_in
        res = None
        for li, w in enumerate(weights):
            if res is None:
                h, res = rms_norm(x, w["n1"], 1e-5, pdl=pdl), x
            else:
                h, res = fused_add_rms_norm(x, res, w["n1"], 1e-5, pdl=pdl)
            qkv = gemv(h, w["qkv"], pdl=pdl).view(1, heads + 2 * kv_heads, head_dim)
            q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
            rotary_embedding_and_cache(positions, q, k, v, cos_sin, cache[li], slots, pdl=pdl)
            attn = paged_decode_attention(
                q, cache[li], block_table, seq_lens, head_dim**-0.5, pdl=pdl
            )
            o = gemv(attn.reshape(1, heads * head_dim), w["o"], pdl=pdl)
            h2, res = fused_add_rms_norm(o, res, w["n2"], 1e-5, pdl=pdl)
            gu = gemv(h2, w["gu"], fusion=FUSE_SILU_MUL_OUT, pdl=pdl)
            x = gemv(gu, w["down"], pdl=pdl)
            x = x + res  # a torch kernel (no PDL) between PDL kernels
        return x

    def set_step(s: int, x: torch.Tensor) -> None:
        x_in.copy_(x)
        p = ctx0 + s
        positions.fill_(p)
        slots.fill_(int(block_table[0, p // page]) * page + p % page)
        seq_lens.fill_(p + 1)

    def run(use_graph: bool, pdl: bool) -> list[torch.Tensor]:
        cache = cache0.clone()
        outs, x = [], x0
        if use_graph:
            set_step(0, x0)
            warm = cache.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step(warm, pdl)  # compile outside the capture
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(cache, pdl)
        for i in range(steps):
            set_step(i, x)
            if use_graph:
                graph.replay()
                x = out.clone()
            else:
                x = step(cache, pdl)
            outs.append(x)
        torch.cuda.synchronize()
        return outs + [cache]

    ref = run(use_graph=False, pdl=False)
    got = run(use_graph=True, pdl=True)
    assert torch.isfinite(ref[-2]).all()
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert torch.equal(a, b), f"step {i} differs with PDL"
