"""The metadata builder over the runner's input buffers: a hand-made step, CUDA-graph
padding and capture layouts (one padding writer for both), and the torch backend's
decode groups, derived once by its builder and read by every layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_utils import build_attn_metadata

from kvasir.attention import torch_backend
from kvasir.attention.backend import AttentionMetadata, AttentionMetadataBuilder
from kvasir.attention.torch_backend import (
    TorchAttentionBackend,
    TorchAttentionMetadata,
    TorchAttentionMetadataBuilder,
    decode_groups,
)
from kvasir.sampling_params import SamplingParams
from kvasir.worker.input_batch import InputBatch
from kvasir.worker.input_buffers import GraphSizes, InputBuffers, mixed_graph_num_reqs
from kvasir.worker.request_state import CachedRequestState

BS, MAX_REQS, MAX_LEN, SINK = 4, 4, 32, 9


def _buffers(builder_cls: type[AttentionMetadataBuilder] = AttentionMetadataBuilder):
    buf = InputBuffers(64, MAX_REQS, MAX_LEN // BS, BS, torch.device("cpu"))
    buf.metadata_builder = builder_cls(buf)
    buf.sink_block_id = SINK
    return buf


def _step(reqs, sched, builder_cls=AttentionMetadataBuilder, graphs=None):
    """``reqs``: (tokens known, tokens computed, block ids) per request, all running."""
    ib = InputBatch(MAX_REQS, MAX_LEN, MAX_LEN // BS, 100, False)
    states = []
    for i, (n, done, blocks) in enumerate(reqs):
        st = CachedRequestState(f"r{i}", SamplingParams(), n)
        ib.add(st, list(range(1, n + 1)), blocks, done)
        states.append(st)
    buf = _buffers(builder_cls)
    rows = np.arange(len(reqs))
    step = buf.prepare(ib, rows, np.array(sched), states, [s.req_id for s in states], True,
                       graphs, None)  # fmt: skip
    return step, buf


# A fresh 5-token prompt in blocks 3, 4; a decode at position 7 (blocks 1, 2); a 3-token
# chunk at positions 4..6 (blocks 5, 6).
REQS = [(5, 0, [3, 4]), (8, 7, [1, 2]), (7, 4, [5, 6])]
SCHED = [5, 1, 3]


def test_step_metadata_hand_computed() -> None:
    step, _ = _step(REQS, SCHED)
    md = step.attn_metadata
    assert type(md) is AttentionMetadata
    assert (md.num_reqs, md.num_actual_tokens, md.max_query_len, md.max_seq_len) == (3, 9, 5, 8)
    assert md.query_start_loc.tolist() == md.query_start_loc_cpu.tolist() == [0, 5, 6, 9]
    assert md.seq_lens.tolist() == md.seq_lens_cpu.tolist() == [5, 8, 7]
    assert md.block_table[:, :2].tolist() == [[3, 4], [1, 2], [5, 6]]
    # slot = block * 4 + position % 4
    assert md.slot_mapping.tolist() == [12, 13, 14, 15, 16, 11, 24, 25, 26]
    # The same step from the test helper, which builds it from lists independently.
    ref = build_attn_metadata([b for *_, b in REQS], [d for _, d, _ in REQS], SCHED, BS)
    for name in ("query_start_loc", "seq_lens", "slot_mapping", "query_start_loc_cpu"):
        assert getattr(md, name).tolist() == getattr(ref, name).tolist(), name
    assert (md.num_reqs, md.max_query_len, md.max_seq_len) == (
        ref.num_reqs, ref.max_query_len, ref.max_seq_len,
    )  # fmt: skip


def test_decode_graph_padding_and_its_capture_layout() -> None:
    reqs = [(8, 7, [1, 2]), (3, 2, [3]), (6, 5, [4, 5])]
    step, buf = _step(reqs, [1, 1, 1], graphs=GraphSizes([1, 2, 4], []))
    assert step.graph_size == 4 and step.attn_metadata.num_reqs == 3
    # Padding row 3: one token at position 0 of the sink block.
    assert buf.query_start_loc[:5].tolist() == [0, 1, 2, 3, 4]
    assert buf.seq_lens[:4].tolist() == [8, 3, 6, 1]
    assert buf.slot_mapping[:4].tolist() == [11, 14, 21, SINK * BS]
    assert buf.positions[:4].tolist() == [7, 2, 5, 0]
    assert int(buf.block_table[3, 0]) == SINK
    meta = buf.graph_metadata(4, mixed=False, max_seq_len=MAX_LEN)
    assert (meta.num_reqs, meta.num_actual_tokens, meta.max_query_len) == (4, 4, 1)
    assert meta.max_seq_len == MAX_LEN  # a bound for every replay
    # The capture's batch is padding alone, laid out by the same writer.
    cap = _buffers().prepare_capture(4, mixed=False, max_seq_len=MAX_LEN)
    assert cap.query_start_loc.tolist() == cap.query_start_loc_cpu.tolist() == [0, 1, 2, 3, 4]
    assert cap.seq_lens.tolist() == cap.seq_lens_cpu.tolist() == [1, 1, 1, 1]
    assert cap.slot_mapping.tolist() == [SINK * BS] * 4
    assert cap.block_table[:, 0].tolist() == [SINK] * 4


def test_mixed_graph_capture_layout() -> None:
    buf = _buffers()
    cap = buf.prepare_capture(16, mixed=True, max_seq_len=MAX_LEN)
    num_reqs = mixed_graph_num_reqs(16, MAX_REQS)
    assert num_reqs == MAX_REQS + 1
    assert (cap.num_reqs, cap.num_actual_tokens, cap.max_query_len) == (num_reqs, 16, 16)
    # Request 0 owns all 16 tokens (position 0, the sink block); the others are empty.
    assert cap.query_start_loc.tolist() == [0] + [16] * num_reqs
    assert cap.seq_lens.tolist() == [16] + [0] * (num_reqs - 1)
    assert cap.block_table[0, :4].tolist() == [SINK] * 4
    assert cap.slot_mapping.tolist() == [SINK * BS] * 16
    assert buf.input_ids[:16].tolist() == buf.positions[:16].tolist() == [0] * 16


def test_profile_batch_goes_through_the_builder() -> None:
    buf = _buffers(TorchAttentionMetadataBuilder)
    table = np.array([[1, 2], [3, 0]])
    md = buf.prepare_prompts(np.array([5, 6, 7, 8, 9, 4, 3]), np.array([5, 2]), table)
    assert isinstance(md, TorchAttentionMetadata)
    assert md.query_start_loc.tolist() == [0, 5, 7] and md.seq_lens.tolist() == [5, 2]
    assert md.slot_mapping.tolist() == [4, 5, 6, 7, 8, 12, 13]
    assert buf.positions[:7].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert buf.input_ids[:7].tolist() == [5, 6, 7, 8, 9, 4, 3]
    assert md.decode_groups == []  # no single-token requests


def test_torch_builder_derives_decode_groups_once() -> None:
    # Three decodes (flat rows 0, 4, 5) and a 3-token query over a cached prefix (rows
    # 1..3, as a speculative step verifies): decodes in one batched group, the longer
    # query in another (a decode padded to 3 queries would triple its work).
    reqs = [(8, 7, [1, 2]), (7, 4, [5, 6]), (3, 2, [3]), (6, 5, [4, 7])]
    step, buf = _step(reqs, [1, 3, 1, 1], TorchAttentionMetadataBuilder)
    md = step.attn_metadata
    assert isinstance(md, TorchAttentionMetadata) and md.block_size == BS
    decodes, verify = md.decode_groups  # too few requests to split by length
    assert decodes.max_q == 1 and decodes.rows.tolist() == [0, 4, 5]
    # Blocks of each request up to the longest (2 blocks); request 2 has one own block,
    # so its padded entry re-reads its first.
    assert decodes.blocks.tolist() == [1, 2, 3, 3, 4, 7]
    assert decodes.mask[:, 0].sum(1).tolist() == [8, 3, 6]
    assert verify.max_q == 3 and verify.rows.tolist() == [1, 2, 3]
    assert verify.out_rows.tolist() == [1, 2, 3] and verify.blocks.tolist() == [5, 6]
    assert verify.mask[0].sum(1).tolist() == [5, 6, 7]  # causal within the query
    with pytest.raises(RuntimeError, match="no CUDA graphs"):
        buf.metadata_builder.build_for_capture(4, 4, 1, MAX_LEN)
    assert not TorchAttentionMetadataBuilder.supports_cuda_graphs
    assert TorchAttentionBackend.get_builder_cls() is TorchAttentionMetadataBuilder


def test_torch_backend_reads_the_builders_decode_groups(monkeypatch) -> None:
    """Every layer reads the groups the builder derived; none derives them again."""
    reqs = [(8, 7, [1, 2]), (3, 2, [3]), (6, 5, [4, 5])]
    step, _ = _step(reqs, [1, 1, 1], TorchAttentionMetadataBuilder)
    md = step.attn_metadata
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 10, BS, 2, 16, generator=g)
    q, k, v = (torch.randn(3, h, 16, generator=g) for h in (4, 2, 2))
    backend = TorchAttentionBackend(4, 16, 2, 0.25)
    expected = backend.forward(q, k, v, cache.clone(), md)

    def fail(*args: object) -> None:
        raise AssertionError("decode groups derived inside a layer")

    monkeypatch.setattr(torch_backend, "decode_groups", fail)
    for _ in range(2):  # two layers, one metadata
        torch.testing.assert_close(backend.forward(q, k, v, cache.clone(), md), expected)
    # The groups are what the decode rows are computed from.
    md.decode_groups = []
    assert not backend.forward(q, k, v, cache.clone(), md).any()
    monkeypatch.undo()
    assert len(decode_groups(md, BS)) == 1


def test_torch_backend_refuses_metadata_without_its_fields() -> None:
    step, _ = _step(REQS, SCHED)  # the common builder
    backend = TorchAttentionBackend(4, 16, 2, 0.25)
    q, k = torch.zeros(9, 4, 16), torch.zeros(9, 2, 16)
    with pytest.raises(TypeError, match="TorchAttentionMetadata"):
        backend.forward(q, k, k, torch.zeros(2, 10, BS, 2, 16), step.attn_metadata)
