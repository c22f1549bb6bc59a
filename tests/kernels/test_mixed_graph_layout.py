"""A mixed (prefill + decode) step laid out for its CUDA graph: the runner's buffers
padded to the graph's token and request counts must give the real rows the same
attention output and KV cache as the unpadded step (Triton backend; interpreted on the
CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvtest_utils import DEVICE, rel_err

from kvasir.attention.backend import get_backend_cls
from kvasir.attention.torch_backend import TorchAttentionMetadata
from kvasir.sampling_params import SamplingParams
from kvasir.worker.input_batch import InputBatch
from kvasir.worker.input_buffers import GraphSizes, InputBuffers, mixed_graph_num_reqs
from kvasir.worker.request_state import CachedRequestState

BS, MAX_REQS, MAX_LEN, HEADS, KV_HEADS, HD = 8, 4, 64, 4, 2, 32


def _step(dense: bool, graphs: GraphSizes):
    # (prompt tokens, tokens already computed): a fresh prompt chunk, two decode rows,
    # a prefix-cache hit; four requests = max_num_reqs, so the padding request needs the
    # spare block-table row.
    reqs = [(20, 0), (30, 29), (9, 8), (16, 10)]
    sched = [12, 1, 1, 6] if dense else [12, 1, 6]
    ib = InputBatch(MAX_REQS, MAX_LEN, MAX_LEN // BS, 100, False)
    buf = InputBuffers(64, MAX_REQS, MAX_LEN // BS, BS, DEVICE)
    num_blocks = sum(-(-n // BS) for n, _ in reqs)
    buf.sink_block_id = num_blocks
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
    states = []
    for i, (n, done) in enumerate(reqs):
        st = CachedRequestState(f"r{i}", SamplingParams(), n)
        nb = -(-n // BS)
        ib.add(st, list(range(1, n + 1)), perm[:nb], done)
        perm = perm[nb:]
        states.append(st)
    rows = np.arange(4) if dense else np.array([0, 1, 3])
    run = [states[r] for r in rows]
    step = buf.prepare(ib, rows, np.array(sched), run, [s.req_id for s in run], dense,
                       graphs, None)  # fmt: skip
    return step, buf, num_blocks


@pytest.mark.parametrize("dense", [True, False])
def test_mixed_graph_padding_matches_unpadded(dense):
    step, buf, num_blocks = _step(dense, GraphSizes([1, 2, 4], [16, 32]))
    total = step.num_tokens
    assert step.mixed_graph_tokens == 32 and step.graph_size is None
    meta = buf.graph_metadata(32, mixed=True, max_seq_len=MAX_LEN)
    n = len(step.rows)
    assert meta.num_reqs == mixed_graph_num_reqs(32, MAX_REQS) == MAX_REQS + 1
    qsl = buf.query_start_loc[: meta.num_reqs + 1].tolist()
    assert qsl[: n + 1] == step.query_start_loc.tolist() and set(qsl[n + 1 :]) == {32}
    assert int(buf.seq_lens[n]) == 32 - total  # the padding request owns the padding

    g = torch.Generator().manual_seed(0)
    shape = (2, num_blocks + 1, BS, KV_HEADS, HD)
    cache = torch.randn(shape, generator=g).to(DEVICE)
    q = torch.randn(32, HEADS, HD, generator=g).to(DEVICE)
    k = torch.randn(32, KV_HEADS, HD, generator=g).to(DEVICE)
    v = torch.randn(32, KV_HEADS, HD, generator=g).to(DEVICE)
    backend = get_backend_cls("triton")(HEADS, HD, KV_HEADS, HD**-0.5)
    ref_backend = get_backend_cls("torch")(HEADS, HD, KV_HEADS, HD**-0.5)
    c_graph, c_ref = cache.clone(), cache.clone()
    out = backend.forward(q, k, v, c_graph, meta)
    ref_meta = TorchAttentionMetadata.from_common(step.attn_metadata, BS)
    ref = ref_backend.forward(q[:total], k[:total], v[:total], c_ref, ref_meta)
    assert rel_err(out[:total], ref) < 1e-5
    assert out[total:].isfinite().all()  # padding rows are defined, not garbage
    torch.testing.assert_close(c_graph[:, :num_blocks], c_ref[:, :num_blocks], rtol=0, atol=0)


def test_mixed_step_past_the_largest_graph_runs_eager():
    step, _, _ = _step(True, GraphSizes([1, 2, 4], [16]))
    assert step.num_tokens == 20 and step.mixed_graph_tokens is None
    step, _, _ = _step(True, GraphSizes([1, 2, 4], []))
    assert step.mixed_graph_tokens is None


def test_mixed_capture_sizes():
    from kvasir.worker.cuda_graph import mixed_capture_sizes

    assert mixed_capture_sizes(512, 2048) == [16, 32, 64, 128, 256, 384, 512]
    assert mixed_capture_sizes(512, 100) == [16, 32, 64, 100]  # the step budget caps
    assert mixed_capture_sizes(1000, 8192)[-3:] == [768, 896, 1000]
    assert mixed_capture_sizes(0, 2048) == [] and mixed_capture_sizes(8, 2048) == [8]
