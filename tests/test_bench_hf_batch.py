"""The HF continuous-batching comparison of ``kvasir bench throughput`` on a tiny random
Llama, on the CPU (and the GPU when there is one): every request must come back with its own requested length, also when
called under ``inference_mode`` as ``run_hf`` does (that is what made transformers 5.17
drop every request), and a request HF can't complete must raise, not be counted."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
ContinuousBatchingConfig = getattr(transformers, "ContinuousBatchingConfig", None)
pytestmark = pytest.mark.skipif(
    ContinuousBatchingConfig is None
    or not hasattr(transformers.GenerationMixin, "continuous_batching_context_manager"),
    reason="this transformers has no continuous batching manager",
)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _small_cache():
    # HF sizes its cache from free memory by default (system RAM on the CPU: slow to set up).
    return ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=256)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_hf_continuous_counts_every_requested_token(device):
    from kvasir.bench.throughput import _run_hf_continuous, make_workload

    model = _tiny_llama().to(device)
    work = make_workload(8, "10:60", "5:20", 1000, 0)
    assert len({o for _, o in work}) > 1  # per-request lengths are exercised
    with torch.inference_mode():  # as run_hf calls it
        elapsed, n = _run_hf_continuous(model, work, cb_config=_small_cache())
    assert n == sum(o for _, o in work)
    assert elapsed > 0
    assert model.config._attn_implementation == "sdpa"  # HF restores it afterwards


def test_hf_continuous_raises_when_a_request_cannot_complete():
    from kvasir.bench.throughput import _run_hf_continuous

    model = _tiny_llama()
    # One prompt longer than the whole paged cache: HF fails it (logging, not raising).
    cache = ContinuousBatchingConfig(num_blocks=1, max_batch_tokens=256)
    work = [(list(range(100, 130)), 5), (list(range(100, 1100)), 5)]
    with pytest.raises(RuntimeError, match="HF continuous batching did not complete"):
        _run_hf_continuous(model, work, cb_config=cache)
