"""Multi-LoRA on a CUDA GPU (skipped without one): the BGMV / SGMV kernels at full size
against the torch references, and the engine with CUDA graphs captured over the
persistent slot buffers against HF transformers + peft, adapters mixed in one batch."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_full_size(dtype):
    from kvasir.kernels import lora as k
    from kvasir.lora import ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    slots, rank, in_f, out_f = 8, 16, 4096, 6144  # an 8B qkv_proj, three sub-projections
    kk = 3 * rank
    a = (torch.randn(slots, kk, in_f, device=dev, generator=gen) / in_f**0.5).to(dtype)
    b = (torch.randn(slots, out_f, kk, device=dev, generator=gen) / kk**0.5).to(dtype)
    a[3, rank:] = 0  # a smaller rank in slot 3
    b[3, :, rank:] = 0
    lens = [300, 0, 17, 1, 129, 0, 64, 5]
    seg_slots = [0, 1, -1, 3, 7, 2, 5, 3]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    t = starts[-1]
    x = torch.randn(t, in_f, device=dev, generator=gen).to(dtype)
    y0 = torch.randn(t, out_f, device=dev, generator=gen).to(dtype)
    st = torch.tensor(starts, dtype=torch.int32, device=dev)
    ss = torch.tensor(seg_slots, dtype=torch.int32, device=dev)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    s_ref = ops.sgmv_shrink_ref(x, a, starts, seg_slots)
    torch.testing.assert_close(k.sgmv_shrink(x, a, st, ss, max(lens)), s_ref, **tol)
    y_ref = ops.sgmv_expand_ref(s_ref, b, starts, seg_slots, y0.float().clone())
    y = k.sgmv_expand(s_ref, b, st, ss, max(lens), y0.clone())
    torch.testing.assert_close(y.float(), y_ref, **tol)
    token_slots = torch.repeat_interleave(ss, torch.tensor(lens, device=dev))
    torch.testing.assert_close(k.bgmv_shrink(x, a, token_slots), s_ref, **tol)
    yb = k.bgmv_expand(s_ref, b, token_slots, y0.clone())
    torch.testing.assert_close(yb.float(), y_ref, **tol)


def test_engine_with_cuda_graphs_matches_hf_peft(tmp_path):
    import peft

    from kvasir import LLM, LoRARequest, SamplingParams
    from tests.lora.lora_utils import hf_greedy, save_random_adapter
    from tests.model_utils import save_tiny_llama

    torch.backends.cuda.matmul.allow_tf32 = False
    base = str(tmp_path / "base")
    save_tiny_llama(base, seed=7)
    cfgs = [
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
        peft.LoraConfig(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    ]  # fmt: skip
    loras = []
    for i, cfg in enumerate(cfgs):
        path = str(tmp_path / f"a{i}")
        save_random_adapter(base, path, cfg, seed=40 + i)
        loras.append(LoRARequest(f"a{i}", i + 1, path))
    prompts = [[5, 17, 33, 9, 100, 41, 7, 64], [11, 12, 13, 14, 15], [200, 3, 77, 8]]
    cases = [(None, prompts[0])] + [(lr, p) for lr in loras for p in prompts[:2]]
    refs = [hf_greedy(base, lr.lora_path if lr else None, p, 8)[0] for lr, p in cases]
    llm = LLM(model=base, enable_lora=True, max_loras=4, max_lora_rank=16, dtype="float32",
              max_model_len=128, kv_cache_gb=0.05, block_size=16, log=False)  # fmt: skip
    runner = llm.llm_engine.engine_core.runner
    assert runner.cuda_graph is not None  # captured with adapters' buffers in place
    replays = []
    replay = runner.cuda_graph.replay
    runner.cuda_graph.replay = lambda n: (replays.append(n), replay(n))[1]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([p for _, p in cases], sp, use_tqdm=False,
                        lora_request=[lr for lr, _ in cases])  # fmt: skip
    got = [o.outputs[0].token_ids for o in outs]
    assert replays, "no decode step replayed a CUDA graph"
    assert got == refs
