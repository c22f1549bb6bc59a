"""The tensor-parallel layers' weight loaders, one simulated rank at a time.

Each rank's layer is built with a ``ParallelState`` that says "rank r of tp"; every
parameter's ``weight_loader`` gets the full checkpoint tensor (as the checkpoint loaders
give it) and must keep exactly this rank's rows or columns. The ranks' outputs are then
put together by hand, the way the collectives would (concatenated for column-parallel
layers, summed for row-parallel ones), and compared with the whole layer in float64.

For tp > 1 a group's collectives would call ``torch.distributed``, so the tests call the
loaders and the layers' methods, never a forward that reduces or gathers; the
multi-process runs are in test_parallel.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from kvasir.attention.backend import get_backend_cls
from kvasir.distributed.parallel_state import GroupCoordinator, ParallelState
from kvasir.layers.context import LayerContext
from kvasir.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from kvasir.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from kvasir.models.loader import process_weights_after_loading

HIDDEN = 24


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ctx(tp: int, rank: int) -> LayerContext:
    """Rank ``rank`` of a tensor-parallel group of ``tp`` (one pipeline stage)."""
    state = ParallelState(
        GroupCoordinator(list(range(tp)), rank, None),
        GroupCoordinator([rank], rank, None),
        torch.device("cpu"),
        rank,
    )
    return LayerContext(get_backend_cls("torch"), parallel=state)


def _load(
    layer: torch.nn.Module, name: str, full: torch.Tensor, shard_id: int | str | None = None
) -> None:
    param = getattr(layer, name)
    param.weight_loader(param, full, shard_id)


def _processed(layer: torch.nn.Module) -> torch.nn.Module:
    process_weights_after_loading(layer)
    return layer


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_parallel_shards_concatenate_to_the_full_layer(tp: int) -> None:
    out = 48
    w, b, x = _rand(out, HIDDEN, seed=0), _rand(out, seed=1), _rand(5, HIDDEN, seed=2)
    n = out // tp
    outs = []
    for r in range(tp):
        layer = ColumnParallelLinear(HIDDEN, [out], True, _ctx(tp, r))
        _load(layer, "weight", w)
        _load(layer, "bias", b)
        assert torch.equal(layer.weight, w[r * n : (r + 1) * n])
        assert torch.equal(layer.bias, b[r * n : (r + 1) * n])
        _processed(layer)
        outs.append(layer.method.apply(layer, x, layer.bias))
    ref = F.linear(x.double(), w.double(), b.double())
    assert _rel(torch.cat(outs, dim=-1), ref) < 1e-6


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merged_gate_up_shards(tp: int) -> None:
    """The local weight is [gate shard; up shard]; the ranks' SiLU-and-mul outputs
    concatenate to the full MLP activation (also at >= 64 rows, the fused CPU path)."""
    d = 40
    gate, up = _rand(d, HIDDEN, seed=3), _rand(d, HIDDEN, seed=4)
    n = d // tp
    for rows in (3, 70):
        x = _rand(rows, HIDDEN, seed=rows)
        outs = []
        for r in range(tp):
            layer = MergedColumnParallelLinear(HIDDEN, [d, d], False, _ctx(tp, r))
            _load(layer, "weight", gate, 0)
            _load(layer, "weight", up, 1)
            shard = slice(r * n, (r + 1) * n)
            assert torch.equal(layer.weight, torch.cat([gate[shard], up[shard]]))
            outs.append(_processed(layer).silu_and_mul(x))
        xd = x.double()
        ref = F.silu(F.linear(xd, gate.double())) * F.linear(xd, up.double())
        assert _rel(torch.cat(outs, dim=-1), ref) < 1e-6


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "tp"),
    [(8, 2, 1), (8, 2, 2), (8, 2, 4), (8, 2, 8), (9, 3, 3), (6, 2, 6)],
)
def test_qkv_shards_split_or_replicate_kv_heads(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Query heads split evenly; KV heads split when tp divides them, else the
    ``tp / num_kv_heads`` consecutive ranks that share a KV head load the same rows."""
    head_dim = 4
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    wq, wk, wv = (_rand(s, HIDDEN, seed=i) for i, s in enumerate([q_size, kv_size, kv_size]))
    bq, bk, bv = (_rand(s, seed=10 + i) for i, s in enumerate([q_size, kv_size, kv_size]))
    x = _rand(5, HIDDEN, seed=20)
    heads_per_rank = num_heads // tp
    kv_per_rank = max(num_kv_heads // tp, 1)
    replicas = max(tp // num_kv_heads, 1)
    q_outs, k_outs, v_outs = [], [], []
    for r in range(tp):
        layer = QKVParallelLinear(HIDDEN, head_dim, num_heads, num_kv_heads, True, _ctx(tp, r))
        assert (layer.num_heads, layer.num_kv_heads) == (heads_per_rank, kv_per_rank)
        assert layer.num_kv_head_replicas == replicas
        for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            _load(layer, "weight", w, sid)
            _load(layer, "bias", b, sid)
        q = slice(r * heads_per_rank * head_dim, (r + 1) * heads_per_rank * head_dim)
        kv_rank = r // replicas
        kv = slice(kv_rank * kv_per_rank * head_dim, (kv_rank + 1) * kv_per_rank * head_dim)
        assert torch.equal(layer.weight, torch.cat([wq[q], wk[kv], wv[kv]]))
        assert torch.equal(layer.bias, torch.cat([bq[q], bk[kv], bv[kv]]))
        out = _processed(layer).method.apply(layer, x, layer.bias)
        # [num_tokens, (heads_per_rank + 2 * kv_per_rank) * head_dim]
        qo, ko, vo = out.split([q.stop - q.start, kv.stop - kv.start, kv.stop - kv.start], -1)
        q_outs.append(qo)
        if r % replicas == 0:  # one rank per distinct KV shard
            k_outs.append(ko)
            v_outs.append(vo)
        else:  # a replica: the same K and V as the first rank of its group
            assert torch.equal(ko, k_outs[-1]) and torch.equal(vo, v_outs[-1])
    xd = x.double()
    for outs, w, b in ((q_outs, wq, bq), (k_outs, wk, bk), (v_outs, wv, bv)):
        assert _rel(torch.cat(outs, dim=-1), F.linear(xd, w.double(), b.double())) < 1e-6


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_partial_products_sum_to_the_full_layer(tp: int) -> None:
    in_size, out = 48, HIDDEN
    w, b, x = _rand(out, in_size, seed=0), _rand(out, seed=1), _rand(5, in_size, seed=2)
    k = in_size // tp
    total = torch.zeros(5, out, dtype=torch.float64)
    for r in range(tp):
        layer = RowParallelLinear(in_size, out, True, _ctx(tp, r))
        _load(layer, "weight", w)
        _load(layer, "bias", b)
        assert torch.equal(layer.weight, w[:, r * k : (r + 1) * k])
        assert torch.equal(layer.bias, b)  # whole on every rank, added by rank 0 only
        _processed(layer)
        # Rank r's input is the r-th column block (the column-parallel layer's output).
        part = layer.method.apply(layer, x[:, r * k : (r + 1) * k], layer.bias if r == 0 else None)
        total += part.double()
    ref = F.linear(x.double(), w.double(), b.double())
    assert _rel(total, ref) < 1e-6
    if tp == 1:  # forward: the all-reduce of one rank is the identity
        assert _rel(layer(x), ref) < 1e-6


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_embedding_and_lm_head_shards(tp: int) -> None:
    vocab = 64
    table, head_w = _rand(vocab, HIDDEN, seed=0), _rand(vocab, HIDDEN, seed=1)
    h = _rand(5, HIDDEN, seed=2)
    n = vocab // tp
    emb_rows, logits = [], []
    for r in range(tp):
        emb = VocabParallelEmbedding(vocab, HIDDEN, _ctx(tp, r))
        _load(emb, "weight", table)
        assert (emb.vocab_start, emb.vocab_end) == (r * n, (r + 1) * n)
        assert torch.equal(emb.weight, table[r * n : (r + 1) * n])
        emb_rows.append(emb.weight)
        head = ParallelLMHead(vocab, HIDDEN, _ctx(tp, r))
        _load(head, "weight", head_w)
        assert torch.equal(head.weight, head_w[r * n : (r + 1) * n])
        logits.append(_processed(head).method.apply(head, h))
        tied = ParallelLMHead(vocab, HIDDEN, _ctx(tp, r), tied_to=emb)
        assert tied.weight is emb.weight  # one parameter, loaded once, same rows
    assert torch.equal(torch.cat(emb_rows), table)
    assert _rel(torch.cat(logits, dim=-1), F.linear(h.double(), head_w.double())) < 1e-6
    if tp == 1:  # forward: the collectives of one rank are the identity
        ids = torch.tensor([0, 63, 17, 17])
        assert torch.equal(emb(ids), table[ids])
        got = head(h)
        assert (
            got.dtype == torch.float32 and _rel(got, F.linear(h.double(), head_w.double())) < 1e-6
        )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda c: ColumnParallelLinear(HIDDEN, [30], False, c), r"output size \(30\)"),
        (lambda c: MergedColumnParallelLinear(HIDDEN, [40, 30], False, c), r"output size \(30\)"),
        (lambda c: QKVParallelLinear(HIDDEN, 4, 9, 1, False, c), r"num_attention_heads \(9\)"),
        (lambda c: QKVParallelLinear(HIDDEN, 4, 12, 6, False, c), r"num_key_value_heads \(6\)"),
        (lambda c: RowParallelLinear(50, HIDDEN, False, c), r"input size \(50\)"),
        (lambda c: VocabParallelEmbedding(66, HIDDEN, c), r"vocab_size \(66\)"),
        (lambda c: ParallelLMHead(66, HIDDEN, c), r"vocab_size \(66\)"),
    ],
)
def test_sizes_not_divisible_by_tp_are_refused_naming_the_size(
    build: Callable[[LayerContext], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message + r".*tensor_parallel_size \(4\)"):
        build(_ctx(4, 0))


def test_kv_heads_neither_divisible_nor_a_divisor_of_tp_are_refused() -> None:
    # 6 query heads split over 3 ranks, but 2 KV heads can be neither split nor replicated.
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\).*num_key_value_heads \(2\)"):
        QKVParallelLinear(HIDDEN, 4, 6, 2, False, _ctx(3, 1))


def test_column_loader_refuses_a_tensor_of_the_wrong_size() -> None:
    layer = ColumnParallelLinear(HIDDEN, [48], False, _ctx(2, 1))
    with pytest.raises(ValueError, match="47 rows, expected 48"):
        _load(layer, "weight", torch.zeros(47, HIDDEN))


def test_every_parameter_carries_a_weight_loader() -> None:
    """The checkpoint loaders call ``param.weight_loader`` and never know the rank."""
    ctx = _ctx(2, 1)
    layers: list[torch.nn.Module] = [
        ColumnParallelLinear(HIDDEN, [48], True, ctx),
        MergedColumnParallelLinear(HIDDEN, [40, 40], False, ctx),
        QKVParallelLinear(HIDDEN, 4, 8, 2, True, ctx),
        RowParallelLinear(48, HIDDEN, True, ctx),
        VocabParallelEmbedding(64, HIDDEN, ctx),
        ParallelLMHead(64, HIDDEN, ctx),
    ]
    for layer in layers:
        for name, param in layer.named_parameters():
            assert callable(getattr(param, "weight_loader", None)), f"{type(layer).__name__}.{name}"
