"""Adaptive speculation length: k per request from acceptance and the step-cost model."""

from __future__ import annotations

import numpy as np

from kvasir.sampling_params import SamplingParams
from kvasir.spec_decode.adaptive import AdaptiveSpeculation, StepCostModel
from kvasir.worker.request_state import CachedRequestState


def _states(n: int) -> list[CachedRequestState]:
    return [CachedRequestState(f"r{i}", SamplingParams(), 4) for i in range(n)]


def _teach(a: AdaptiveSpeculation, states, rates: list[float], k: int = 4, steps: int = 30) -> None:
    rng = np.random.default_rng(0)
    for _ in range(steps):
        acc = []
        for r in rates:  # a run of accepted drafts, each with probability r
            n = 0
            while n < k and rng.random() < r:
                n += 1
            acc.append(n)
        a.record(states, np.full(len(states), k), np.array(acc))


def test_memory_bound_step_takes_every_draft_that_is_likely_accepted() -> None:
    # A step costs little more at 9 tokens than at 1 (memory-bound): a draft costs 5 %
    # of a step.
    a = AdaptiveSpeculation(6, StepCostModel(base=10e-3, per_token=5e-4))
    states = _states(2)
    _teach(a, states, [0.9, 0.02])
    k = a.choose(states, batch_size=2)
    assert k[0] == 6  # accepted almost always: the longest k pays
    assert k[1] == 0  # almost never accepted: no speculation for it
    assert a.acceptance["r0"] > 0.8 and a.acceptance["r1"] < 0.1


def test_k_shrinks_as_the_batch_becomes_compute_bound() -> None:
    # Each token costs as much as 1/8 of the fixed step cost: a big batch is compute-bound.
    a = AdaptiveSpeculation(6, StepCostModel(base=8e-3, per_token=1e-3))
    ks = []
    for batch in (1, 8, 64):
        states = _states(batch)
        _teach(a, states, [0.7] * batch, steps=10)
        ks.append(int(a.choose(states, batch).sum()) / batch)
    assert ks[0] > ks[1] > ks[2]
    assert ks[2] < 0.1 * ks[0]  # nearly off: a draft costs about what it is worth


def test_expensive_draft_passes_are_counted() -> None:
    cheap = AdaptiveSpeculation(6, StepCostModel(10e-3, 1e-5))
    dear = AdaptiveSpeculation(6, StepCostModel(10e-3, 1e-5), draft_cost=StepCostModel(6e-3, 0))
    states = _states(1)
    _teach(cheap, states, [0.6])
    _teach(dear, states, [0.6])
    assert cheap.choose(states, 1)[0] > dear.choose(states, 1)[0] >= 0


def test_a_request_off_speculation_is_probed_again() -> None:
    a = AdaptiveSpeculation(4, StepCostModel(10e-3, 1e-5))
    states = _states(1)
    _teach(a, states, [0.0])
    ks = [int(a.choose(states, 1)[0]) for _ in range(40)]
    assert ks.count(0) > 30 and 1 in ks  # mostly off, but tried now and then
    # Once its drafts are accepted again, it speculates again.
    _teach(a, states, [0.95], steps=20)
    assert a.choose(states, 1)[0] >= 3


def test_cost_model_fit_recovers_a_line() -> None:
    sizes = [1, 2, 4, 8, 16, 32]
    m = StepCostModel.fit(sizes, [0.01 + 0.002 * n for n in sizes])
    assert abs(m.base - 0.01) < 1e-9 and abs(m.per_token - 0.002) < 1e-9
