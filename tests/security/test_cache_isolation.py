"""Prefix-cache isolation between tenants, and the timing channel it closes.

The salts are the server's own (``Tenant.cache_salt`` combined with a request's
``cache_salt`` by ``combine_salts``), driven through the engine in-process on a small
random model whose prefill time is dominated by compute, so a prefix hit is visibly
faster than a miss. The timing check is two-layered: the engine's own counters
(cached tokens, exact) and a rank test over interleaved trials with a false-alarm rate
of 1e-4 when the two distributions are the same.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest

from kvasir import LLM, SamplingParams
from kvasir.entrypoints.openai.tenancy import combine_salts
from kvasir.security.tenants import TenantRegistry

PROMPT_LEN = 512
NUM_TRIALS = 24


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    cfg = json.loads(
        (Path(__file__).parents[2] / "kvasir/models/configs/tiny-llama.json").read_text()
    )
    cfg.update(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
    )
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(cfg))
    return LLM(model=str(path), load_format="dummy", max_model_len=1024, kv_cache_gb=0.1, log=False)


@pytest.fixture(scope="module")
def tenants() -> TenantRegistry:
    return TenantRegistry.from_dict(
        {
            "tenants": [
                {"name": "victim", "keys": ["k-victim"]},
                {"name": "attacker", "keys": ["k-attacker"]},
                {"name": "team-a", "keys": ["k-a"], "shared_prefix": True},
                {"name": "team-b", "keys": ["k-b"], "shared_prefix": True},
            ]
        }
    )


def _salt(reg: TenantRegistry, key: str, request_salt: str | None = None) -> str | None:
    t = reg.lookup(key)
    assert t is not None
    return combine_salts(t.cache_salt, request_salt)


def _run(llm: LLM, ids: list[int], salt: str | None) -> tuple[float, int]:
    """TTFT of one request (max_tokens=1: the whole call is its prefill) as the CPU time
    this process spent on it: the work an attacker's clock would see, without the
    wall-clock noise of other processes on a shared machine."""
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    t0 = time.process_time()
    out = llm.generate([ids], sp, use_tqdm=False, cache_salt=salt)[0]
    return time.process_time() - t0, out.num_cached_tokens


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(3, 1000) for _ in range(PROMPT_LEN)]


def test_cached_tokens_never_cross_tenants(llm: LLM, tenants: TenantRegistry) -> None:
    rng = random.Random(1)
    p = _prompt(rng)
    v, a = _salt(tenants, "k-victim"), _salt(tenants, "k-attacker")
    assert _run(llm, p, v)[1] == 0
    assert _run(llm, p, v)[1] == PROMPT_LEN - 16  # within a tenant: all full blocks but the last
    assert _run(llm, p, a)[1] == 0
    # A request's own cache_salt cannot be used to reach another tenant's blocks: the
    # attacker sending the victim's derived salt string still gets its own namespace.
    assert _run(llm, p, _salt(tenants, "k-attacker", v))[1] == 0
    assert _run(llm, p, None)[1] == 0  # nor can an untenanted request
    # Opted-in tenants share (and still do not reach the isolated ones).
    q = _prompt(rng)
    assert _run(llm, q, _salt(tenants, "k-a"))[1] == 0
    assert _run(llm, q, _salt(tenants, "k-b"))[1] == PROMPT_LEN - 16
    assert _run(llm, q, v)[1] == 0


def _mann_whitney_z(xs: list[float], ys: list[float]) -> float:
    """z of the Mann-Whitney U statistic (normal approximation, no ties in practice):
    positive when xs tend to be larger than ys."""
    u = sum((x > y) + 0.5 * (x == y) for x in xs for y in ys)
    n1, n2 = len(xs), len(ys)
    mean = n1 * n2 / 2
    sd = math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    return (u - mean) / sd


def test_timing_of_guessed_prefix_is_a_miss(llm: LLM, tenants: TenantRegistry) -> None:
    """Per trial: the victim caches a fresh secret prompt; then, in random order, the
    attacker sends the secret (a guess of the victim's prefix), the attacker sends a
    fresh prompt (a miss), and the victim re-sends its secret (a hit). The attacker's
    guess must look like a miss, while a hit is plainly visible to the same clock (so
    the test would catch a leak)."""
    rng = random.Random(2)
    v, a = _salt(tenants, "k-victim"), _salt(tenants, "k-attacker")
    _run(llm, _prompt(rng), a)  # warm-up
    guess: list[float] = []
    miss: list[float] = []
    hit: list[float] = []
    for _ in range(NUM_TRIALS):
        secret = _prompt(rng)
        _run(llm, secret, v)
        jobs = [("guess", secret, a), ("miss", _prompt(rng), a), ("hit", secret, v)]
        rng.shuffle(jobs)
        for kind, ids, salt in jobs:
            dt, cached = _run(llm, ids, salt)
            if kind == "hit":
                assert cached > 0
                hit.append(dt)
            else:
                assert cached == 0, kind  # the engine computed every prompt token
                (guess if kind == "guess" else miss).append(dt)
    # One-sided tests, each with a false-alarm rate under 1e-4 when guess and miss come
    # from the same distribution: a rank test over all trials, and a sign test over the
    # per-trial pairs (robust to the machine's load drifting between trials).
    z_guess = _mann_whitney_z(miss, guess)
    p_guess = _sign_test_p(sum(g < m for g, m in zip(guess, miss, strict=True)), NUM_TRIALS)
    p_hit = _sign_test_p(sum(h < m for h, m in zip(hit, miss, strict=True)), NUM_TRIALS)
    med = [1e3 * sorted(x)[NUM_TRIALS // 2] for x in (miss, guess, hit)]
    stats = (
        f"median CPU ms: miss {med[0]:.1f}, guess {med[1]:.1f}, hit {med[2]:.1f}; "
        f"z(miss > guess) = {z_guess:.2f}, sign-test p(guess < miss) = {p_guess:.2g}, "
        f"p(hit < miss) = {p_hit:.2g}"
    )
    print(stats)
    assert z_guess < 3.72 and p_guess > 1e-4, stats
    assert p_hit < 1e-3, stats  # the same clock does see a real hit


def _sign_test_p(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n
