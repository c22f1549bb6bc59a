"""Adaptive speculation length: k per request and per step from acceptance and cost.

With per-draft acceptance probability ``a`` a request that verifies k drafts yields
``1 + a + a^2 + ... + a^k`` tokens in expectation (drafts are accepted left to right),
so its j-th draft is worth ``a^j`` tokens. A step's cost is the target's forward over
its ``B + sum(k_i)`` tokens, ``t(n) = base + per_token * n`` (a line fitted to forward
times the runner measures at start-up, ``StepCostModel``), plus the proposer's draft
steps (``draft_cost`` of a target step per draft position, 0 for n-gram lookup).

``choose`` maximises expected tokens per second of the step: candidate drafts (i, j)
are taken in descending order of worth ``a_i^j`` while each raises
``tokens / cost``; the worth of a request's drafts falls with j, so this greedy
order is optimal for the linear cost. A request whose acceptance is poor ends with
k = 0 (no speculation); so does the whole step when the batch is compute-bound (a
draft token costs more than it is worth). A request that is not speculating has no
new observations, so its estimate relaxes toward the running mean acceptance of the
others; when that is good again, it speculates again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kvasir.worker.request_state import CachedRequestState

_PRIOR = 0.6  # acceptance assumed for a request with no history
_EMA = 0.3  # weight of a step's observation
_RELAX = 0.05  # pull of an idle request's estimate toward the mean per step
_PROBE_EVERY = 16  # a request without drafts this many steps gets one


@dataclass
class StepCostModel:
    """Seconds of a target forward over ``n`` flat-batch tokens: ``base + per_token * n``."""

    base: float
    per_token: float

    def __call__(self, n: float) -> float:
        return self.base + self.per_token * n

    @classmethod
    def fit(cls, sizes: list[int], seconds: list[float]) -> StepCostModel:
        a = np.vstack([np.ones(len(sizes)), np.asarray(sizes, dtype=np.float64)]).T
        (base, slope), *_ = np.linalg.lstsq(a, np.asarray(seconds, dtype=np.float64), rcond=None)
        return cls(max(float(base), 1e-6), max(float(slope), 0.0))

    @classmethod
    def measure(
        cls, forward: Callable[[int], None], sizes: tuple[int, ...], repeats: int = 3
    ) -> StepCostModel:
        """Fit the line to ``forward(n)`` timings (best of ``repeats``, after a warm-up)."""
        times = []
        for n in sizes:
            forward(n)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                forward(n)
                best = min(best, time.perf_counter() - t0)
            times.append(best)
        return cls.fit(list(sizes), times)


class AdaptiveSpeculation:
    """Per-request acceptance estimates and the k each request gets in a step."""

    def __init__(
        self,
        max_k: int,
        cost: StepCostModel | None = None,
        draft_cost: StepCostModel | None = None,
    ) -> None:
        self.max_k = max_k
        # Until the runner measures its own: a memory-bound step (cost barely grows).
        self.cost = cost or StepCostModel(1.0, 0.01)
        # Seconds of one draft pass over a batch of n requests (None: free, n-gram).
        self.draft_cost = draft_cost
        self.acceptance: dict[str, float] = {}
        self.mean = _PRIOR
        self.last_k: dict[str, int] = {}
        self._idle: dict[str, int] = {}  # steps in a row without drafts

    def remove(self, req_id: str) -> None:
        self.acceptance.pop(req_id, None)
        self.last_k.pop(req_id, None)
        self._idle.pop(req_id, None)

    def record(
        self,
        states: list[CachedRequestState],
        num_drafts: np.ndarray,
        num_accepted: np.ndarray,
    ) -> None:
        """One step's verification: request i accepted ``num_accepted[i]`` of
        ``num_drafts[i]`` (the first rejection ends a run, so a run of a accepted out
        of k is a + (a < k) Bernoulli trials with a successes)."""
        obs = []
        for st, k, a in zip(states, num_drafts.tolist(), num_accepted.tolist(), strict=True):
            rid = st.req_id
            est = self.acceptance.get(rid, self.mean)
            if k:
                trials = a + (a < k)
                rate = a / trials
                w = 1 - (1 - _EMA) ** trials
                est = (1 - w) * est + w * rate
                obs.append(rate)
            else:
                est += _RELAX * (self.mean - est)
            self.acceptance[rid] = est
        if obs:
            self.mean = (1 - _EMA) * self.mean + _EMA * float(np.mean(obs))

    def choose(self, states: list[CachedRequestState], batch_size: int) -> np.ndarray:
        """k per request for the next step of a batch of ``batch_size`` requests."""
        a = np.array([self.acceptance.get(st.req_id, self.mean) for st in states])
        a = np.clip(a, 0.0, 0.999)
        n = len(states)
        ks = np.zeros(n, dtype=np.int64)
        if n == 0:
            return ks
        # Candidates (i, j), j = 1..max_k, worth a_i ** j; best first.
        j = np.arange(1, self.max_k + 1)
        worth = a[:, None] ** j[None, :]  # [n, max_k]
        order = np.argsort(-worth, axis=None, kind="stable")
        tokens = float(batch_size)  # every request yields one token without drafts
        num_tok = float(batch_size)
        max_depth = 0
        draft_pass = self.draft_cost(batch_size) if self.draft_cost is not None else 0.0
        best_rate = tokens / self.cost(num_tok)
        for flat in order.tolist():
            i, jj = divmod(flat, self.max_k)
            if ks[i] != jj:  # a request's drafts are taken in order
                continue
            depth = max(max_depth, jj + 1)  # draft passes the proposer will run
            t = self.cost(num_tok + 1) + depth * draft_pass
            rate = (tokens + worth[i, jj]) / t
            if rate <= best_rate:
                continue
            ks[i] += 1
            tokens += worth[i, jj]
            num_tok += 1
            max_depth = depth
            best_rate = rate
        for i, st in enumerate(states):
            rid = st.req_id
            if ks[i]:
                self._idle[rid] = 0
            else:
                idle = self._idle.get(rid, 0) + 1
                if idle >= _PROBE_EVERY:  # try again now and then: conditions change
                    ks[i], idle = 1, 0
                self._idle[rid] = idle
            self.last_k[rid] = int(ks[i])
        return ks


def calibrate(runner, proposer) -> tuple[StepCostModel, StepCostModel | None]:  # type: ignore[no-untyped-def]
    """The target's step cost against flat-batch tokens, and a draft pass's against
    requests, measured on the runner's own KV cache before any request arrives (one
    request of n tokens at positions 0..n-1 in blocks 1..; nothing is cached yet)."""
    bs = runner.block_size
    cap = max(min(runner.max_num_tokens, runner.max_model_len, 64), 1)
    sizes = tuple(n for n in (1, 2, 4, 8, 16, 32, 64) if n <= cap)

    def prepare(n: int):  # type: ignore[no-untyped-def]
        nb = -(-n // bs)
        table = np.arange(1, nb + 1, dtype=np.int64)[None, :]
        ids = np.zeros(n, dtype=np.int64)
        return runner.buffers.prepare_prompts(ids, np.array([n]), table)

    def target(n: int) -> None:
        meta = prepare(n)
        runner.model(runner.input_ids[:n], runner.positions[:n], runner.kv_caches, meta)

    import torch

    def sync() -> None:
        if runner.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        cost = StepCostModel.measure(lambda n: (target(n), sync()), sizes)
        draft = None
        forward = getattr(proposer, "_forward", None)
        if forward is not None:
            draft = StepCostModel.measure(lambda n: (forward(n, prepare(n)), sync()), sizes)
    return cost, draft
